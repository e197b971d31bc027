"""PixArt-Σ, Sana and Chroma end to end: a tiny pipeline saved the diffusers way is calibrated by
``calibri run`` (the CLI, the pipeline family found through the hook, a cfg ensemble), and the
calibration file it writes applies to the pipeline loaded again."""
from __future__ import annotations

import json

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from calibri.plugins.dit import tiny_extra  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

PROMPTS = ["a red circle", "a blue square", "a green cross", "a white triangle"]
#: name → (builder, architecture, pipeline options)
ARCHITECTURES = {
    "pixart": (tiny_extra.tiny_pixart_pipeline, "pixart", {"use_resolution_binning": False}),
    "sana": (tiny_extra.tiny_sana_pipeline, "sana", {"use_resolution_binning": False}),
    "chroma": (tiny_extra.tiny_chroma_pipeline, "chroma", {}),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_calibri_run_calibrates_the_tiny_pipeline(name, cli_inproc, tmp_path):
    from calibri.plugins.dit.calibration_file import apply_calibration
    from calibri.plugins.dit.models import load_pipeline

    build, architecture, pipeline_options = ARCHITECTURES[name]
    build(0).save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    config = {
        "name": name, "seed": 0,
        "objective": {"name": "calibri", "options": {
            "model": str(tmp_path / "model"), "granularity": "layer", "copies": 2, "form": "cfg",
            "guidance_scale": 3.0, "steps": 2, "height": 32, "width": 32, "bucket_size": 2, "batch_size": 2,
            "reward": "brightness", "prompts": str(tmp_path / "prompts.txt"),
            "validation_prompts": str(tmp_path / "prompts.txt"), "pipeline_options": pipeline_options}},
        "optimizer": {"name": "pycma", "popsize": 3}, "budget": {"rounds": 2}, "validation": {"every": 2},
        "callbacks": [{"name": "calibration_report", "options": {"nfe": [2], "guidance": [3.0]}}],
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = cli_inproc("run", "run.yaml", "-o", "run")
    assert result.returncode == 0, result.stderr[-2000:]
    trials = [json.loads(line) for line in (tmp_path / "run" / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 6 and all(0.0 <= t["value"] <= 1.0 for t in trials)
    assert len({json.dumps(t["params"], sort_keys=True) for t in trials}) > 1  # candidates differ
    document = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert document["architecture"] == architecture and document["form"] == "cfg"
    pipe = load_pipeline(str(tmp_path / "model"))
    calibrator = apply_calibration(pipe, tmp_path / "run" / "calibration.json")
    assert calibrator.values() == pytest.approx(document["values"])
    images = pipe(prompt=PROMPTS[0], num_inference_steps=2, height=32, width=32, guidance_scale=3.0,
                  output_type="pt", **pipeline_options).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_a_pipeline_without_a_family_names_the_hook(tmp_path):
    """A pipeline class no plugin registered a family for is refused before any weights load."""
    from calibri.core.errors import ConfigError
    from calibri.plugins.dit.objective import CalibriOptions, check_pipeline_arguments

    class LuminaLikePipeline:  # a class of its own: no family registered for it or its bases
        def __call__(self, prompt=None, height=None, width=None):
            pass

    with pytest.raises(ConfigError) as caught:
        check_pipeline_arguments(LuminaLikePipeline, CalibriOptions(), None)
    assert caught.value.field == "objective.options.model"
    assert "calibri_register_pipeline_families" in caught.value.message and "\n" not in str(caught.value)
