"""``calibri flowgrpo evaluate`` and the toy LoRA trainer, on a small untrained toy pipeline.

The matrix must give every row the same prompts and seeds (its base and +LoRA rows equal images
made directly, without calibri's evaluation), apply the calibration to both models, and write the
table, the JSON record and the grid; the trainer must write Flow-GRPO's checkpoint layout, be a
pure function of its seed, and change what the model draws.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from calibri.plugins.flow_grpo.toy_lora import SD3_TARGET_MODULES, LoraSettings, advantages, rwr_weights  # noqa: E402

TINY = dict(iterations=1, prompts_per_iteration=4, samples_per_prompt=2, epochs=1, batch_size=8, sample_steps=2, lr=1e-2)
PROMPTS = 5


@pytest.fixture(scope="module")
def lora(toy_dir, tmp_path_factory, one_torch_thread) -> Path:
    from calibri.plugins.flow_grpo.toy_lora import train_lora

    return train_lora(tmp_path_factory.mktemp("lora"), LoraSettings(model=str(toy_dir), **TINY), progress=None)


@pytest.fixture(scope="module")
def calibration(toy_dir, tmp_path_factory) -> Path:
    """A cfg-ensemble calibration at guidance 4, away from identity, saved through calibri's API."""
    from calibri.plugins.dit.calibration import Calibrator
    from calibri.plugins.dit.calibration_file import save_calibration
    from calibri.plugins.dit.models import load_pipeline

    calibrator = Calibrator(load_pipeline(str(toy_dir)).transformer, "layer", 2, "cfg", 4.0).attach()
    values = calibrator.values()
    names = calibrator.parameter_names(with_omega=False)
    calibrator.set_values({name: 0.8 + 0.05 * (i % 5) for i, name in enumerate(names)} | {"omega.0": 3.0,
                                                                                          "omega.1": -2.0})
    assert calibrator.values() != values
    path = tmp_path_factory.mktemp("calibration") / "calibration.json"
    return save_calibration(calibrator, path, {"steps": [2], "guidance_scale": 4.0})


def invoke(*args: str):
    """The command in calibri's own group (one-line errors, exit 2), as ``calibri flowgrpo evaluate``."""
    from click.testing import CliRunner

    from calibri.core import plugins
    from calibri.core.cli import build_cli
    from calibri.plugins.flow_grpo.evaluate import evaluate

    plugins.reset_registry()
    cli = build_cli()
    cli.add_command(evaluate, "flowgrpo-evaluate")
    try:
        return CliRunner().invoke(cli, ["flowgrpo-evaluate", *map(str, args)])
    finally:
        plugins.reset_registry()


def direct_images(model: str, lora: Path | None, seed: int) -> tuple[torch.Tensor, list[str], list]:
    """Images the pipeline makes with no calibri evaluation code (2 steps, guidance 4), and their prompts."""
    from calibri.plugins.dit.generation import ImageGenerator
    from calibri.plugins.dit.models import load_pipeline
    from calibri.plugins.dit.prompts import load_prompts
    from calibri.plugins.flow_grpo.lora import load_flowgrpo_lora

    pipe = load_pipeline(model)
    if lora is not None:
        load_flowgrpo_lora(pipe.transformer, lora)
    prompts = load_prompts("toy/validation", "prompts")
    texts, metadata = list(prompts.prompts[:PROMPTS]), list(prompts.metadata[:PROMPTS])
    return ImageGenerator(pipe, 2, 4.0).generate(texts, seed), texts, metadata


def direct_scores(model: str, lora: Path | None, seeds: list[int]) -> np.ndarray:
    """The toy oracle's scores of :func:`direct_images`, seed after seed."""
    from calibri.rewards.combine import build_reward

    reward = build_reward("toy_oracle")
    return np.concatenate([np.asarray(reward(*direct_images(model, lora, seed))) for seed in seeds])


def test_the_matrix_runs_every_row_on_the_same_prompts_and_seeds(toy_dir, lora, calibration, tmp_path, one_torch_thread):
    out = tmp_path / "out"
    result = invoke("--model", toy_dir, "--lora", lora.parent, "--calibration", calibration, "--reward", "toy_oracle",
                    "--prompts", "toy/validation", "--max-prompts", PROMPTS, "--seeds", "0,7", "--steps", 2,
                    "--guidance", 4, "-o", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "evaluation.json").read_text())
    rows = {row["variant"]: row for row in record["rows"]}
    assert list(rows) == ["baseline", "+LoRA", "+calibration", "LoRA+calibration"]
    assert all(row["n"] == 2 * PROMPTS and len(row["scores"]) == 2 * PROMPTS for row in rows.values())
    # the base and +LoRA rows are the images the pipeline makes directly, seed for seed
    assert rows["baseline"]["scores"] == direct_scores(str(toy_dir), None, [0, 7]).tolist()
    assert rows["+LoRA"]["scores"] == direct_scores(str(toy_dir), lora, [0, 7]).tolist()
    assert rows["+calibration"]["scores"] != rows["baseline"]["scores"]
    assert rows["LoRA+calibration"]["scores"] != rows["+LoRA"]["scores"]
    for name, row in rows.items():  # paired differences from the base row
        if name != "baseline":
            delta = np.array(row["scores"]) - np.array(rows["baseline"]["scores"])
            assert row["diff"] == pytest.approx(delta.mean())
    assert record["lora"]["path"] == str(lora.resolve())
    assert record["calibration"]["made_on_lora"] is None
    assert record["protocol"]["seeds"] == [0, 7] and record["protocol"]["height"] is None  # the toy's own size
    assert (out / "grid.png").stat().st_size > 0 and (out / "evaluation.csv").is_file()
    table = (out / "evaluation.md").read_text()
    assert "LoRA+calibration" in table and "made on the base model; applied to base and base+LoRA" in table
    assert "LoRA+calibration" in result.output


def test_a_calibration_made_on_the_lora_says_so(toy_dir, lora, calibration, tmp_path, one_torch_thread):
    from calibri.plugins.dit.calibration_file import load_calibration
    from calibri.plugins.flow_grpo.lora import lora_record, read_lora

    document = load_calibration(calibration)
    document["calibrated_for"]["lora"] = lora_record(read_lora(lora, "lora"))
    on_lora = tmp_path / "on-lora.json"
    on_lora.write_text(json.dumps(document))
    out = tmp_path / "out"
    result = invoke("--model", toy_dir, "--calibration", on_lora, "--reward", "toy_oracle", "--prompts",
                    "toy/validation", "--max-prompts", 2, "--steps", 2, "--guidance", 4, "-o", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "evaluation.json").read_text())
    assert [row["variant"] for row in record["rows"]] == ["baseline", "+calibration"]  # no --lora: no LoRA rows
    assert record["calibration"]["made_on_lora"] == str(lora.resolve())
    assert f"made on the LoRA {lora.resolve()}; applied to base." in (out / "evaluation.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--model", "toy", "--size", "64"], "--size: ToyFlowPipeline makes images of a fixed size"),
    (["--model", "toy", "--max-sequence-length", "64"], "--max-sequence-length: ToyFlowPipeline takes no text length"),
    (["--prompts", "x.txt"], "--reward: give the reward"),
    (["--model", "toy", "--seeds", "1,x"], "--seeds"),
    (["--model", "toy", "--steps", "1001"], "--steps"),
    (["--model", "toy", "--guidance", "nan"], "--guidance"),
    (["--model", "toy", "--lora", "missing-folder"], "--lora: missing-folder: no such folder"),
    (["--model", "toy", "--calibration", "missing.json"], "--calibration: missing.json: no such calibration"),
    (["--model", "toy", "--reward", "no_such_reward"], "--reward"),
    (["--model", "no/such/folder"], "--model"),
    (["--model", "toy", "-o", "evaluate.py"], "-o/--output"),
])
def test_mistakes_are_one_line_errors_naming_the_option(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evaluate.py").write_text("a file, not a folder")
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output


# -- the toy LoRA trainer ------------------------------------------------------------------------
def test_toy_lora_is_saved_in_flow_grpos_layout_and_fits_the_model(toy_dir, lora):
    from safetensors.torch import load_file

    from calibri.plugins.dit.models import load_pipeline
    from calibri.plugins.flow_grpo.lora import check_lora

    assert lora.name == "lora" and lora.parent.name == "checkpoint-1"
    config = json.loads((lora / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 16, "LORA")
    assert sorted(config["target_modules"]) == sorted(SD3_TARGET_MODULES)
    keys = load_file(str(lora / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.transformer_blocks.") and
                        k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert any(k.endswith("attn.add_q_proj.lora_B.weight") for k in keys)
    assert check_lora(lora.parent, "lora", load_pipeline(str(toy_dir)).transformer).rank == 8
    history = json.loads((lora.parent.parent / "history.json").read_text())
    assert len(history) == 1 and 0.0 <= history[0]["sample_reward"] <= 1.0


def test_toy_lora_is_a_function_of_its_seed_and_changes_the_images(toy_dir, lora, tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    from calibri.plugins.flow_grpo.toy_lora import train_lora

    state = torch.get_rng_state()
    again = train_lora(tmp_path / "again", LoraSettings(model=str(toy_dir), **TINY), progress=None)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    other = train_lora(tmp_path / "other", LoraSettings(model=str(toy_dir), seed=1, **TINY), progress=None)
    first, second, third = (load_file(str(p / "adapter_model.safetensors")) for p in (lora, again, other))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], third[k]) for k in first)
    assert any(k.endswith("lora_B.weight") and first[k].abs().max() > 0 for k in first)  # trained, not at init
    base, adapted = direct_images(str(toy_dir), None, 3)[0], direct_images(str(toy_dir), lora, 3)[0]
    assert (base - adapted).abs().max() > 1e-3  # the LoRA changes what the model draws


def test_advantages_and_weights_follow_flow_grpo_per_prompt():
    rewards = np.array([0.1, 0.3, 0.5, 0.9, 0.9, 0.9])  # two prompts, three samples each
    adv = advantages(rewards, 3)
    assert adv[:3].mean() == pytest.approx(0.0) and np.all(np.diff(adv[:3]) > 0)
    assert np.allclose(adv[3:], 0.0)  # a prompt whose samples all score the same teaches nothing
    weights = rwr_weights(adv, 3, 0.5)
    assert weights[:3].mean() == pytest.approx(1.0) and np.all(np.diff(weights[:3]) > 0)
    assert np.allclose(weights[3:], 1.0) and weights.max() <= 3.0
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0)


def test_toy_lora_trains_the_guided_velocity_when_sampling_with_guidance(toy_dir, tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    from calibri.plugins.flow_grpo.toy_lora import train_lora

    guided = train_lora(tmp_path, LoraSettings(model=str(toy_dir), **{**TINY, "guidance_scale": 3.0}), progress=None)
    weights = load_file(str(guided / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and weights[k].abs().max() > 0 for k in weights)
    assert json.loads((tmp_path / "settings.json").read_text())["guidance_scale"] == 3.0


def test_the_table_4_example_plans_the_papers_stacking_set_up(tmp_path):
    """examples/flowgrpo/sd3.5m-pickscore-lora.yaml: SD3.5-Medium, gate granularity, the cfg
    ensemble (216 parameters), Flow-GRPO's PickScore reward, prompts and guidance, a LoRA."""
    from calibri.core.config import apply_overrides, read_yaml, validate
    from calibri.core.run import plan

    data = read_yaml(Path(__file__).resolve().parents[1] / "examples" / "flowgrpo" / "sd3.5m-pickscore-lora.yaml")
    options = data["objective"]["options"]
    assert options["lora"].endswith("/lora") and options["validation_prompts"].endswith(":test")
    (tmp_path / "train.txt").write_text("a photo of a cat\na red bicycle\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text("a bowl of fruit\n", encoding="utf-8")
    data = apply_overrides(data, [f"objective.options.prompts=flowgrpo:{tmp_path}",
                                  f"objective.options.validation_prompts=flowgrpo:{tmp_path}:test",
                                  "objective.options.lora=null"])  # no checkpoint here: checked elsewhere
    planned = plan(validate(data))
    assert len(planned.space) == 216
    resolved = planned.recipe.options
    assert resolved["reward"] == {"name": "flowgrpo", "options": {"reward_fn": {"pickscore": 1.0}}}
    assert (resolved["granularity"], resolved["copies"], resolved["form"], resolved["guidance_scale"]) == \
        ("gate", 2, "cfg", 4.5)
    assert (resolved["steps"], resolved["height"], resolved["width"]) == (15, 512, 512)
