"""``calibri flowgrpo export``: a calibration made on top of a Flow-GRPO LoRA, written as a
pipeline folder Flow-GRPO starts from — the base transformer with the calibration baked in, plus
the LoRA byte for byte — that reloads as the very model the calibration was hooked onto."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from test_flowgrpo_lora import FLUX_TARGETS, SD3_TARGETS, _toy_run_args, forward, write_lora  # noqa: E402

from calibri.plugins.dit.calibration import Calibrator  # noqa: E402
from calibri.plugins.dit.calibration_file import apply_calibration, save_calibration  # noqa: E402
from calibri.plugins.dit.models import load_model_config, load_pipeline, load_transformer  # noqa: E402
from calibri.plugins.flow_grpo.lora import load_flowgrpo_lora, merged_lora  # noqa: E402

FIELD = "objective.options.lora"
#: Exported (base with the calibration baked in, then PEFT's unmerged LoRA) against the LoRA-merged
#: model with the calibration hooked, float32: scaling weight rows instead of outputs and adding
#: the LoRA unmerged instead of merged only round differently (measured ~1e-7 on outputs of ~1).
TOLERANCE = 1e-5


def invoke(*args: str):
    """``calibri flowgrpo ...`` through calibri's own top-level group: one-line errors, exit 2."""
    from click.testing import CliRunner

    from calibri.core.cli import _CalibriGroup
    from calibri.plugins.flow_grpo.commands import flowgrpo

    group = _CalibriGroup(name="calibri", commands={"flowgrpo": flowgrpo})
    return CliRunner().invoke(group, ["flowgrpo", *map(str, args)], catch_exceptions=False)


def _pipeline(arch: str) -> torch.nn.Module:
    from calibri.plugins.dit.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

    return {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[arch]()


def calibrate(pipeline_dir: Path, lora: Path | None, out: Path, seed: int = 0, **calibrator_options) -> Path:
    """A calibration file made on the base transformer (with ``lora`` merged first, if given),
    random scales and ω: what a run would have found, hooked on the adapted model."""
    folder = pipeline_dir / "transformer"
    model = load_transformer(folder, load_model_config(folder))
    if lora is not None:
        model = load_flowgrpo_lora(model, lora, FIELD)
    calibrator = Calibrator(model, "gate", **calibrator_options).attach()
    generator = torch.Generator().manual_seed(seed)
    names = calibrator.parameter_names()
    values = {n: 1.0 + 0.4 * (torch.rand((), generator=generator).item() - 0.5) for n in names}
    calibrator.set_values(values)
    settings = {"steps": [4]} | ({"lora": merged_lora(model)} if lora is not None else {})
    save_calibration(calibrator, out, settings)
    calibrator.detach()
    return out


@pytest.fixture(scope="module", params=["sd3", "flux"])
def calibrated(request, tmp_path_factory):
    """(pipeline folder, LoRA folder, calibration file) of a tiny SD3 or FLUX pipeline."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    pipe = _pipeline(request.param)
    pipe.save_pretrained(root / "pipeline")
    lora = write_lora(pipe.transformer, root / "training", SD3_TARGETS if request.param == "sd3" else FLUX_TARGETS)
    return root / "pipeline", lora, calibrate(root / "pipeline", lora, root / "calibration.json")


def hooked_reference(pipeline_dir: Path, lora: Path, calibration: Path) -> torch.Tensor:
    """The model the calibration was made for: base + LoRA merged, the calibration hooked on."""
    model = load_transformer(pipeline_dir / "transformer", load_model_config(pipeline_dir / "transformer"))
    model = load_flowgrpo_lora(model, lora, FIELD)
    calibrator = apply_calibration(model, calibration)
    try:
        return forward(model)
    finally:
        calibrator.detach()


def test_the_export_reloads_as_the_lora_model_with_the_calibration_hooked(calibrated, tmp_path, one_torch_thread):
    pipeline_dir, lora, calibration = calibrated
    out = tmp_path / "for-flow-grpo"
    result = invoke("export", calibration, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"train.lora_path = {out / 'lora'}" in result.output
    reference = hooked_reference(pipeline_dir, lora, calibration)
    pipe = load_pipeline(str(out))  # a whole pipeline folder, as Flow-GRPO's pretrained.model
    exported = forward(peft.PeftModel.from_pretrained(pipe.transformer, str(out / "lora")))
    assert (exported - reference).abs().max() <= TOLERANCE
    base = load_transformer(pipeline_dir / "transformer", load_model_config(pipeline_dir / "transformer"))
    unbaked = forward(peft.PeftModel.from_pretrained(base, str(out / "lora")))
    assert (unbaked - reference).abs().max() > 1e3 * TOLERANCE  # the bake matters: the check above means something
    for name in sorted(p.name for p in lora.iterdir()):
        assert (out / "lora" / name).read_bytes() == (lora / name).read_bytes(), name
    assert sorted(p.name for p in (out / "lora").iterdir()) == sorted(p.name for p in lora.iterdir())
    for name in ("model_index.json", "scheduler/scheduler_config.json", "vae/diffusion_pytorch_model.safetensors"):
        assert (out / name).read_bytes() == (pipeline_dir / name).read_bytes(), name
    assert not any("lora" in key for key in json.loads((out / "transformer" / "config.json").read_text()))


def test_the_bake_and_the_lora_touch_different_linears(calibrated):
    """Why base + bake + LoRA is the hooked model: baking scales the modulation Linears and
    proj_out; Flow-GRPO's LoRA adapts none of them."""
    from calibri.plugins.flow_grpo.lora import read_lora

    pipeline_dir, lora, _ = calibrated
    model = load_transformer(pipeline_dir / "transformer", load_model_config(pipeline_dir / "transformer"))
    calibrator = Calibrator(model, "gate")
    baked = {gate.ref.linear for gate in calibrator.gates} | {calibrator.adapter.output_linear}
    adapted = set(read_lora(lora, FIELD).shapes)
    assert baked and adapted and not baked & adapted


def test_a_run_directory_exports_too(tmp_path, one_torch_thread):
    """The whole workflow on the shipped toy model: a run with ``lora``, then its run directory exported."""
    from calibri.core.config import load_config
    from calibri.core.run import start_run

    lora = write_lora(load_pipeline("toy").transformer, tmp_path / "training")
    config, overrides = _toy_run_args(tmp_path, lora)
    start_run(load_config(config, overrides), tmp_path / "run", quiet=True)
    result = invoke("export", tmp_path / "run", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    toy = Path(load_pipeline("toy").transformer.config._name_or_path).parent
    reference = hooked_reference(toy, lora, tmp_path / "run" / "calibration.json")
    exported = forward(peft.PeftModel.from_pretrained(load_pipeline(str(tmp_path / "out")).transformer,
                                                      str(tmp_path / "out" / "lora")))
    assert (exported - reference).abs().max() <= TOLERANCE


def _refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calibri: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("kind, options, fragments", [
    ("ensemble", {"copies": 2, "form": "cfg", "guidance_scale": 4.0}, ("an ensemble of 2 copies", "copies: 1")),
    ("time-buckets", {"time_buckets": 2}, ("2 time buckets", "time_buckets: 1")),
])
def test_calibrations_that_cannot_be_baked_are_refused(kind, options, fragments, calibrated, tmp_path):
    pipeline_dir, lora, _ = calibrated
    calibration = calibrate(pipeline_dir, lora, tmp_path / f"{kind}.json", **options)
    result = invoke("export", calibration, "-o", tmp_path / "out")
    _refused(result, str(calibration), *fragments)
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_and_left_as_it_was(calibrated, tmp_path):
    _, _, calibration = calibrated
    for out in (tmp_path / "empty", tmp_path / "full"):
        out.mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for out in (tmp_path / "empty", tmp_path / "full"):
        _refused(invoke("export", calibration, "-o", out), f"-o/--output: {out} already exists")
    assert not any((tmp_path / "empty").iterdir())
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_a_changed_or_missing_lora_and_other_mistakes_are_one_line(calibrated, tmp_path):
    pipeline_dir, lora, calibration = calibrated
    targets = json.loads((lora / "adapter_config.json").read_text())["target_modules"]
    base = load_transformer(pipeline_dir / "transformer", load_model_config(pipeline_dir / "transformer"))
    other = write_lora(base, tmp_path / "other", targets, seed=1)  # the same LoRA's shapes, other values
    _refused(invoke("export", calibration, "-o", tmp_path / "out", "--lora", other),
             "--lora", "not the LoRA the calibration was made on")
    _refused(invoke("export", tmp_path / "nothing.json", "-o", tmp_path / "out"), "no such run directory or calibration file")
    _refused(invoke("export", calibration, "-o", pipeline_dir / "exported"), "which the export copies")
    assert not (pipeline_dir / "exported").exists()
    document = json.loads(calibration.read_text())
    document["calibrated_for"]["lora"]["path"] = str(tmp_path / "moved")
    (tmp_path / "moved.json").write_text(json.dumps(document))
    _refused(invoke("export", tmp_path / "moved.json", "-o", tmp_path / "out"), "calibrated_for.lora", "no such folder")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("objective: {name: calibri}\n")
    _refused(invoke("export", run_dir, "-o", tmp_path / "out"), "no calibration.json")
    assert not (tmp_path / "out").exists()


def test_a_lora_on_a_linear_the_bake_scales_is_refused(calibrated, tmp_path):
    """Were a LoRA to adapt a modulation Linear, base + bake + LoRA would differ from the hooked
    model (the bake would not scale the LoRA's part): refused, never exported wrong."""
    pipeline_dir, _, _ = calibrated
    base = load_transformer(pipeline_dir / "transformer", load_model_config(pipeline_dir / "transformer"))
    lora = write_lora(base, tmp_path / "training", targets=["norm1.linear", "attn.to_q"])
    calibration = calibrate(pipeline_dir, lora, tmp_path / "calibration.json")
    _refused(invoke("export", calibration, "-o", tmp_path / "out"), "which baking the calibration scales")
    assert not (tmp_path / "out").exists()


def test_the_command_is_registered_as_a_group_others_can_extend():
    import click

    from calibri.plugins.flow_grpo.commands import calibri_register_commands, flowgrpo

    registered = []
    calibri_register_commands(registered.append)
    assert registered == [flowgrpo] and isinstance(flowgrpo, click.Group) and "export" in flowgrpo.commands


def test_a_calibration_without_a_lora_exports_the_baked_pipeline_alone(calibrated, tmp_path, one_torch_thread):
    pipeline_dir, _, _ = calibrated
    calibration = calibrate(pipeline_dir, None, tmp_path / "plain.json")
    result = invoke("export", calibration, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out" / "lora").exists() and "no LoRA" in result.output
    model = load_transformer(pipeline_dir / "transformer", load_model_config(pipeline_dir / "transformer"))
    calibrator = apply_calibration(model, calibration)
    reference = forward(model)
    calibrator.detach()
    exported = forward(load_pipeline(str(tmp_path / "out")).transformer)
    assert (exported - reference).abs().max() <= TOLERANCE
