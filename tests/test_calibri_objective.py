"""The Calibri objective: prompt sources, the prompt stream, cached generation, validation, runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calibri.core.config import validate
from calibri.core.errors import ConfigError
from calibri.core.run import resume_run, start_run
from calibri.plugins.dit.generation import ImageGenerator
from calibri.plugins.dit.prompts import PromptSet, PromptStream, image_seed, load_prompts

PROMPTS = ["a small red circle on the left", "a large blue square at the top", "a small green cross in the center",
           "a large white triangle at the bottom", "a small cyan circle on the right"]


def run_config(toy_dir: Path, prompt_files, **changes) -> dict:
    train, val = prompt_files
    options = {"model": str(toy_dir), "granularity": "layer", "steps": 2, "guidance_scale": 3.0, "bucket_size": 2,
               "reward": "colorfulness", "prompts": str(train), "validation_prompts": str(val), "batch_size": 4}
    options.update(changes.pop("options", {}))
    config = {"name": "t", "seed": 3, "objective": {"name": "calibri", "options": options},
              "optimizer": {"name": "pycma", "popsize": 4}, "budget": {"rounds": 3}, "validation": {"every": 2},
              "callbacks": []}
    config.update(changes)
    return config


# -- prompt sources ------------------------------------------------------------------------------
def test_prompt_files_txt_jsonl_inline_and_shipped(prompt_files):
    train, val = prompt_files
    txt = load_prompts(str(train), "f")
    assert txt.prompts == tuple(PROMPTS) and txt.metadata == ({},) * 5
    jsonl = load_prompts(val, "f")
    assert jsonl.prompts == tuple(PROMPTS[:3]) and jsonl.metadata[2] == {"id": 2}
    assert load_prompts(["x", "y"], "f").prompts == ("x", "y")
    shipped = load_prompts("toy/validation", "f")
    assert len(shipped) == 80 and set(shipped.metadata[0]) == {"size", "colour", "shape", "position"}


@pytest.mark.parametrize("content, name, message", [
    (None, "missing.txt", "no such prompt file"),
    ("\n# only a comment\n\n", "empty.txt", "holds no prompts"),
    ('{"prompt": "a"}\nnot json\n', "bad.jsonl", r"bad.jsonl:2: not valid JSON"),
    ('{"text": "a"}\n', "nofield.jsonl", r"nofield.jsonl:1: expected an object with a non-empty string 'prompt'"),
])
def test_bad_prompt_sources_name_the_field_and_file(tmp_path, content, name, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as info:
        load_prompts(str(path), "objective.options.prompts")
    assert info.value.field == "objective.options.prompts"
    with pytest.raises(ConfigError, match="non-empty strings"):
        load_prompts([], "objective.options.prompts")


# -- the stream ------------------------------------------------------------------------------------
def test_stream_buckets_are_a_pure_function_of_the_round_and_cover_each_epoch():
    prompts = PromptSet(tuple(f"p{i}" for i in range(10)), ({},) * 10, "inline")
    stream = PromptStream(prompts, bucket_size=4, seed=1)
    again = PromptStream(prompts, bucket_size=4, seed=1)
    rounds = [stream.indices(r) for r in range(5)]
    assert [again.indices(r) for r in (4, 0, 2, 1, 3)] == [rounds[i] for i in (4, 0, 2, 1, 3)]
    flat = [i for bucket in rounds for i in bucket]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert PromptStream(prompts, 4, seed=2).indices(0) != rounds[0] or PromptStream(prompts, 4, 2).indices(1) != rounds[1]
    assert stream.next_round(3)["prompts"] == [f"p{i}" for i in rounds[3]]
    assert not stream.has_validation


def test_image_seeds_differ_per_index_and_seed():
    seeds = {image_seed(s, j) for s in range(5) for j in range(20)}
    assert len(seeds) == 100 and image_seed(3, 7) == image_seed(3, 7)


# -- generation --------------------------------------------------------------------------------------
def test_generator_encodes_each_prompt_once_and_matches_the_plain_pipeline(toy_dir):
    from calibri.plugins.dit.models import load_pipeline

    pipe = load_pipeline(str(toy_dir))
    generator = ImageGenerator(pipe, steps=3, guidance_scale=3.0, batch_size=2)
    calls = []
    original = pipe.encode_prompt

    def counting(*args, **kwargs):
        calls.append(kwargs.get("prompt"))
        return original(*args, **kwargs)

    pipe.encode_prompt = counting
    first = generator.generate(PROMPTS[:3], seed=11)
    second = generator.generate(PROMPTS[:3], seed=11)
    assert calls == PROMPTS[:3] and generator.encoded == 3
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    gens = [torch.Generator().manual_seed(image_seed(11, j)) for j in range(3)]
    plain = original.__self__(PROMPTS[:3], num_inference_steps=3, guidance_scale=3.0, generator=gens, output_type="pt").images
    torch.testing.assert_close(first, plain, rtol=0, atol=1e-5)  # prompts encoded alone vs together
    assert first.shape == (3, 3, 32, 32) and 0 <= first.min() and first.max() <= 1


def test_images_do_not_depend_on_batch_size(toy_dir):
    from calibri.plugins.dit.models import load_pipeline

    pipe = load_pipeline(str(toy_dir))
    one = ImageGenerator(pipe, steps=2, guidance_scale=3.0, batch_size=1).generate(PROMPTS, seed=5)
    many = ImageGenerator(pipe, steps=2, guidance_scale=3.0, batch_size=5).generate(PROMPTS, seed=5)
    torch.testing.assert_close(one, many, rtol=0, atol=1e-5)


# -- runs -----------------------------------------------------------------------------------------------
def test_a_calibration_run_validates_and_selects_on_validation(toy_dir, prompt_files, tmp_path):
    summary = start_run(validate(run_config(toy_dir, prompt_files)), tmp_path / "run", quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert lines[0]["source"] == "baseline" and lines[0]["after_round"] == 0
    assert {line["after_round"] for line in lines} == {0, 2, 3}
    assert all(line["seed"] == 0 for line in lines)
    best_value = max(line["value"] for line in lines)
    assert summary["validation"]["selected"]["value"] == best_value
    assert summary["validation"]["baseline"] == lines[0]["value"]
    trials = [json.loads(line) for line in (tmp_path / "run" / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 12 and "reward_sem" in trials[0]["metrics"]
    rounds = {}
    for t in trials:
        rounds.setdefault(t["round"], set()).add(t["seed"])
    assert all(len(seeds) == 1 for seeds in rounds.values())  # common random numbers within a round


def test_resume_continues_prompts_seeds_and_validation_exactly(toy_dir, prompt_files, tmp_path):
    start_run(validate(run_config(toy_dir, prompt_files, budget={"rounds": 4})), tmp_path / "full", quiet=True)
    start_run(validate(run_config(toy_dir, prompt_files, budget={"rounds": 2})), tmp_path / "part", quiet=True)
    resume_run(tmp_path / "part", {"rounds": 4}, quiet=True)
    for name in ("trials.jsonl", "validation.jsonl"):
        full = [json.loads(x) for x in (tmp_path / "full" / name).read_text().splitlines()]
        part = [json.loads(x) for x in (tmp_path / "part" / name).read_text().splitlines()]
        for record in full + part:
            record.pop("wall_time", None)
            record.get("metrics", {}).pop("wall_time", None)
        if name == "validation.jsonl":  # the 2-round run also validated at its end (round 2)
            part = [r for r in part if r["after_round"] != 2 or r in full]
        assert part == full


def test_validation_values_do_not_depend_on_the_number_of_workers(toy_dir, prompt_files, tmp_path):
    """Bit for bit at the same torch thread count per evaluation (on a CPU, a matrix product's
    last bits depend on how many threads split it), which the workers are given explicitly."""
    import torch

    serial = start_run(validate(run_config(toy_dir, prompt_files, budget={"rounds": 2})), tmp_path / "s", quiet=True)
    parallel = start_run(validate(run_config(toy_dir, prompt_files, budget={"rounds": 2},
                                             executor={"name": "process", "workers": 2,
                                                       "options": {"threads": torch.get_num_threads()}})),
                         tmp_path / "p", quiet=True)
    assert serial["validation"] == parallel["validation"]
    values = [[json.loads(x)["value"] for x in (tmp_path / d / "trials.jsonl").read_text().splitlines()] for d in "sp"]
    assert values[0] == values[1]


def test_bad_options_are_one_line_errors_with_exit_status_2(toy_dir, prompt_files, tmp_path):
    import yaml

    config = run_config(toy_dir, prompt_files, options={"prompts": str(tmp_path / "nope.txt")})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "calibri.core.cli", "run", str(path), "-o", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "objective.options.prompts" in proc.stderr and "nope.txt" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    config = run_config(toy_dir, prompt_files, options={"form": "cfg", "copies": 2, "guidance_scale": None})
    with pytest.raises(ConfigError, match="guidance"):
        from calibri.core.run import plan
        plan(validate(config))


def test_a_negative_validation_seed_is_a_config_error(toy_dir, prompt_files):
    from calibri.core.run import plan

    with pytest.raises(ConfigError, match="must be at least 0") as info:
        plan(validate(run_config(toy_dir, prompt_files, options={"validation_seed": -1})))
    assert info.value.field == "objective.options.validation_seed"


# -- the options: declared once, validated once ------------------------------------------------------
def test_the_options_are_declared_once_by_the_options_model():
    import inspect

    from calibri.core.options import option_names
    from calibri.core.plugins import get_registry
    from calibri.plugins.dit.objective import CalibriOptions, calibri_objective

    registration = get_registry().get("objectives", "calibri")
    assert registration.factory is calibri_objective and calibri_objective.options_model is CalibriOptions
    assert set(inspect.signature(calibri_objective).parameters) == {"device", "options"}  # nothing repeated
    assert "model_config" in option_names(CalibriOptions) and "device" in option_names(CalibriOptions)


def test_a_run_validates_the_options_once_and_builds_them_without_validating_again(toy_dir, prompt_files,
                                                                                    monkeypatch):
    from calibri.core.run import plan
    from calibri.plugins.dit.objective import CalibriOptions

    calls = {"validate": 0, "init": 0}
    validate_model, init = CalibriOptions.model_validate.__func__, CalibriOptions.__init__

    def counting_validate(cls, *args, **kwargs):
        calls["validate"] += 1
        return validate_model(cls, *args, **kwargs)

    def counting_init(self, **values):
        calls["init"] += 1
        init(self, **values)

    monkeypatch.setattr(CalibriOptions, "model_validate", classmethod(counting_validate))
    monkeypatch.setattr(CalibriOptions, "__init__", counting_init)
    resolved = plan(validate(run_config(toy_dir, prompt_files, options={"steps": "1", "pipeline_options": None})))
    assert resolved.recipe.options["steps"] == 1 and resolved.recipe.options["pipeline_options"] == {}
    objective = resolved.recipe.build("cpu")
    from calibri.plugins.dit.objective import calibri_stream

    calibri_stream(3, **resolved.recipe.options)
    assert calls == {"validate": 1, "init": 0}  # plan: once; check, space, stream and the factory: never
    assert objective.options.steps == 1 and objective.options.device == "cpu"
    assert objective.options.model == str(toy_dir) and objective.options.transformer_config is None
    objective.close()


@pytest.mark.parametrize(("options", "field", "message"), [
    ({"copies": 0}, "objective.options.copies", "must be at least 1, got 0"),
    ({"time_buckets": 0}, "objective.options.time_buckets", "must be at least 1, got 0"),
    ({"bucket_size": 0}, "objective.options.bucket_size", "must be at least 1, got 0"),
    ({"steps": -2}, "objective.options.steps", "must be at least 1, got -2"),
    ({"batch_size": 0}, "objective.options.batch_size", "must be at least 1, got 0"),
    ({"validation_seed": -1}, "objective.options.validation_seed", "must be at least 0, got -1"),
    ({"form": "cfg", "copies": 2, "guidance_scale": 1.0}, "objective.options.guidance_scale", "the cfg form needs"),
    ({"form": "cfg", "copies": 2, "guidance_scale": None}, "objective.options.guidance_scale", "the cfg form needs"),
    ({"granularity": "row"}, "objective.options.granularity", "Input should be 'block', 'layer' or 'gate'"),
    ({"steps": "many"}, "objective.options.steps", "expected a step count, a list of them or a range FIRST..LAST"),
    ({"steps": [2, 2]}, "objective.options.steps", "lists 2 more than once"),
    ({"stepz": 3}, "objective.options.stepz", "unknown option (known: batch_size, bucket_size, copies, dtype, form"),
    ({"device": "cuda:0"}, "objective.options.device", "unknown option"),
])
def test_bad_options_name_the_option(toy_dir, prompt_files, options, field, message):
    from calibri.core.run import plan

    with pytest.raises(ConfigError) as info:
        plan(validate(run_config(toy_dir, prompt_files, options=options)))
    assert info.value.field == field and message in info.value.message
    assert "\n" not in str(info.value)


def test_options_built_directly_are_validated():
    import pydantic

    from calibri.plugins.dit.objective import CalibriOptions

    options = CalibriOptions(model="toy", copies=2, form="cfg", guidance_scale=4.5, device="cpu")
    assert (options.copies, options.guidance_scale, options.pipeline_options) == (2, 4.5, {})
    with pytest.raises(pydantic.ValidationError, match="must be at least 1, got 0"):
        CalibriOptions(copies=0)
    with pytest.raises(pydantic.ValidationError, match="the cfg form needs"):
        CalibriOptions(form="cfg")
