"""The paper's configs: each validates as written (prompt files aside), builds the paper's space,
and runs end to end when its hub model is replaced by a tiny local model of the same class."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibri.core.config import apply_overrides, read_yaml, validate
from calibri.core.run import plan, start_run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "calibri"
#: config → (pipeline class, searched parameters as in the paper: sites per copy × copies + ω)
EXPECTED = {
    "flux-dev-block.yaml": ("FluxPipeline", 57 + 1),
    "flux-dev-layer.yaml": ("FluxPipeline", 76 + 1),
    "flux-dev-gate.yaml": ("FluxPipeline", 114 + 1),
    "sd3.5-medium-cfg.yaml": ("StableDiffusion3Pipeline", 216),
    "qwen-image-cfg.yaml": ("QwenImagePipeline", 2 * 238 + 2),
}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a photo of a cat\na red bicycle\na bowl of fruit\n", encoding="utf-8")
    return path


def test_every_paper_config_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_config_validates_with_the_papers_settings(name, prompt_file):
    data = read_yaml(EXAMPLES / name)
    data = apply_overrides(data, [f"objective.options.prompts={prompt_file}",
                                  f"objective.options.validation_prompts={prompt_file}"])
    config = validate(data)
    plan_ = plan(config)
    options = plan_.recipe.options
    assert plan_.space is not None and len(plan_.space) == EXPECTED[name][1]
    assert options["sigma"] == 0.25 and options["bucket_size"] == 16 and options["steps"] == 15
    assert options["height"] == options["width"] == 512
    assert options["reward"]["name"] == "hpsv3"
    assert config.optimizer.sigma == 0.25 and config.optimizer.popsize is None  # λ = 4 + ⌊3 ln d⌋
    assert config.validation.every == 10
    scales = [d for d in plan_.space if d.group != "omega"]
    omegas = [d for d in plan_.space if d.group == "omega"]
    assert all((d.low, d.high, d.init) == (-1.0, 2.0, 1.0) for d in scales)
    assert all((d.low, d.high) == (-10.0, 10.0) for d in omegas)
    if options.get("form") == "cfg":
        g = options["guidance_scale"]
        assert [d.init for d in omegas] == [g, 1.0 - g]


def test_paper_config_without_its_prompt_files_is_a_clear_error():
    with pytest.raises(Exception, match="objective.options.prompts"):
        plan(validate(read_yaml(EXAMPLES / "flux-dev-layer.yaml")))


def _tiny_pipeline(class_name: str):
    from calibri.plugins.dit import tiny

    return {"FluxPipeline": tiny.tiny_flux_pipeline, "StableDiffusion3Pipeline": tiny.tiny_sd3_pipeline,
            "QwenImagePipeline": tiny.tiny_qwen_pipeline}[class_name](seed=0)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_config_runs_end_to_end_on_a_tiny_local_model(name, prompt_file, tmp_path):
    class_name, _ = EXPECTED[name]
    model_dir = tmp_path / "model"
    _tiny_pipeline(class_name).save_pretrained(model_dir)
    assert json.loads((model_dir / "model_index.json").read_text())["_class_name"] == class_name
    data = apply_overrides(read_yaml(EXAMPLES / name), [
        f"objective.options.model={model_dir}", "objective.options.model_config=null",
        f"objective.options.prompts={prompt_file}", f"objective.options.validation_prompts={prompt_file}",
        "objective.options.reward=colorfulness", "objective.options.height=32", "objective.options.width=32",
        "objective.options.steps=2", "objective.options.bucket_size=2", "objective.options.dtype=float32",
        "executor.name=serial", "executor.devices=null", "budget.rounds=1", "validation.every=1",
        "optimizer.popsize=3", "callbacks=[]"])
    summary = start_run(validate(data), tmp_path / "run", quiet=True)
    assert summary["evaluations"] == 3 and summary["failures"] == 0
    validation = [json.loads(x) for x in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert validation[0]["source"] == "baseline" and validation[0]["value"] is not None
    assert validation[0]["metrics"]["reward_sem"] >= 0
