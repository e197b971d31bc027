"""Calibration files, ``calibri bake``, ``calibri sites`` errors, and the ``dit`` named space in a run config.

A calibration file round-trips exactly; a file made for another architecture or site set is refused
with a one-line :class:`CalibrationMismatch`; another config of the same architecture only warns;
unreadable files are :class:`UserError` s naming the file.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from calibri.core.errors import UserError  # noqa: E402
from calibri.plugins.dit import tiny  # noqa: E402
from calibri.plugins.dit.calibration import Calibrator  # noqa: E402
from calibri.plugins.dit.calibration_file import (  # noqa: E402
    FORMAT,
    CalibrationMismatch,
    apply_calibration,
    load_calibration,
    save_calibration,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _file_digests(folder) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _close(a, b, rel=1e-5) -> bool:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    return float((a - b).abs().max()) <= rel * scale


def _calibrated(model, granularity="gate", seed=0, **kwargs) -> Calibrator:
    calibrator = Calibrator(model, granularity, **kwargs).attach()
    rng = np.random.default_rng(seed)
    names = calibrator.parameter_names(with_omega=False)
    values = {n: float(v) for n, v in zip(names, rng.uniform(0.3, 1.7, len(names)))}
    calibrator.set_values(values)
    calibrator.set_values({calibrator.parameter_names()[-1]: 1.0 + 1e-3 if calibrator.copies == 1 else -1.37})
    return calibrator


def _flux_file(tmp_path, name="flux.json", **kwargs):
    model = tiny.tiny_flux_transformer()
    calibrator = _calibrated(model, **kwargs)
    path = save_calibration(calibrator, tmp_path / name)
    calibrator.detach()
    return path


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def calibri_cli(tmp_path):
    """The ``calibri`` command in this process (no third-party plugins), run from ``tmp_path``."""
    from click.testing import CliRunner

    from calibri.core import plugins
    from calibri.core.cli import build_cli

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CALIBRI_PLUGINS", "")
        mp.chdir(tmp_path)
        plugins.reset_registry()
        cli = build_cli()

        def run(*args) -> CliResult:
            result = CliRunner().invoke(cli, [str(a) for a in args])
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise result.exception
            return CliResult(result.exit_code, result.stdout, result.stderr)

        yield run
        plugins.reset_registry()


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# --------------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["block", "layer", "gate"])
def test_round_trip_restores_values_and_output_exactly(tmp_path, granularity):
    model = tiny.tiny_flux_transformer()
    inputs = tiny.dummy_transformer_inputs(model)
    calibrator = _calibrated(model, granularity)
    values = calibrator.values()
    calibrated = _run(model, inputs)
    path = save_calibration(calibrator, tmp_path / "sub" / "calibration.json")
    calibrator.detach()

    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["format"] == FORMAT and document["version"] == 1
    assert document["architecture"] == "flux" and document["model_class"] == "FluxTransformer2DModel"
    assert document["granularity"] == granularity and document["copies"] == 1 and document["form"] == "single"
    assert document["sites"] == calibrator.site_names
    assert document["values"] == values
    assert load_calibration(path) == document

    fresh = tiny.tiny_flux_transformer()
    applied = apply_calibration(fresh, path)
    assert applied.values() == values
    assert torch.equal(_run(fresh, inputs), calibrated)
    applied.detach()
    assert torch.equal(_run(fresh, inputs), _run(tiny.tiny_flux_transformer(), inputs))


def test_round_trip_of_a_cfg_ensemble_through_a_pipeline(tmp_path):
    pipe = tiny.tiny_sd3_pipeline()
    calibrator = _calibrated(pipe.transformer, "layer", copies=2, form="cfg", guidance_scale=5.0)

    def generate():
        return pipe(prompt="a cat", num_inference_steps=2, height=32, width=32, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    calibrated = generate()
    values = calibrator.values()
    path = save_calibration(calibrator, tmp_path / "sd3.json")
    calibrator.detach()
    plain = generate()
    assert not np.allclose(plain, calibrated, atol=1e-3)
    document = load_calibration(path)
    assert (document["copies"], document["form"], document["guidance_scale"]) == (2, "cfg", 5.0)

    applied = apply_calibration(pipe, path)  # a pipeline: its transformer is calibrated
    assert applied.transformer is pipe.transformer
    assert applied.values() == values and applied.omega == [values["omega.0"], values["omega.1"]]
    assert np.array_equal(generate(), calibrated)
    applied.detach()
    assert np.array_equal(generate(), plain)


# --------------------------------------------------------------------------------------------------
# Mismatches
# --------------------------------------------------------------------------------------------------


def test_a_flux_file_on_sd3_is_refused(tmp_path):
    path = _flux_file(tmp_path)
    model = tiny.tiny_sd3_transformer()
    with pytest.raises(CalibrationMismatch) as exc_info:
        apply_calibration(model, path)
    message = _one_line(exc_info)
    assert str(path) in message and "'flux'" in message and "'sd3'" in message
    assert isinstance(exc_info.value, UserError)
    assert _hook_count(model) == 0  # nothing attached


@pytest.mark.parametrize(("builder", "overrides"), [
    (tiny.tiny_flux_transformer, {"num_single_layers": 3}),
    (tiny.tiny_flux_transformer, {"num_layers": 1}),
])
def test_a_file_for_another_number_of_blocks_is_refused(tmp_path, builder, overrides):
    path = _flux_file(tmp_path)
    model = builder(**overrides)
    with pytest.raises(CalibrationMismatch) as exc_info:
        apply_calibration(model, path)
    message = _one_line(exc_info)
    assert str(path) in message and "sites" in message
    assert _hook_count(model) == 0


def test_an_sd3_file_for_another_block_layout_is_refused(tmp_path):
    model = tiny.tiny_sd3_transformer()
    calibrator = _calibrated(model)
    path = save_calibration(calibrator, tmp_path / "sd3.json")
    calibrator.detach()
    for other in (tiny.tiny_sd3_transformer(num_layers=3), tiny.tiny_sd3_transformer(dual_attention_layers=(0, 1))):
        with pytest.raises(CalibrationMismatch) as exc_info:
            apply_calibration(other, path)
        assert str(path) in _one_line(exc_info)


def test_a_file_whose_sites_are_of_another_granularity_is_refused(tmp_path):
    path = _flux_file(tmp_path, granularity="gate")
    document = json.loads(path.read_text(encoding="utf-8"))
    document["granularity"] = "layer"  # the header says layer, the sites and values are gate ones
    path.write_text(json.dumps(document), encoding="utf-8")
    model = tiny.tiny_flux_transformer()
    with pytest.raises(CalibrationMismatch) as exc_info:
        apply_calibration(model, path)
    assert str(path) in _one_line(exc_info)
    assert _hook_count(model) == 0


def test_reordered_sites_are_refused(tmp_path):
    path = _flux_file(tmp_path)
    document = json.loads(path.read_text(encoding="utf-8"))
    document["sites"] = list(reversed(document["sites"]))
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(CalibrationMismatch, match="another order"):
        apply_calibration(tiny.tiny_flux_transformer(), path)


def test_another_config_of_the_same_architecture_warns_and_applies(tmp_path):
    path = _flux_file(tmp_path)
    values = load_calibration(path)["values"]
    other = tiny.tiny_flux_transformer(guidance_embeds=False)  # same sites, another config
    with pytest.warns(UserWarning, match="another config") as record:
        calibrator = apply_calibration(other, path)
    assert len(record) == 1 and str(path) in str(record[0].message) and "\n" not in str(record[0].message)
    assert calibrator.values() == values
    calibrator.detach()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same config: no warning
        apply_calibration(tiny.tiny_flux_transformer(), path).detach()


# --------------------------------------------------------------------------------------------------
# Unreadable files
# --------------------------------------------------------------------------------------------------


def _valid_document(tmp_path) -> dict:
    return json.loads(_flux_file(tmp_path, "valid.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(("case", "content"), [
    ("missing", None),
    ("directory", None),
    ("empty", b""),
    ("truncated", None),
    ("not json", b"format: calibri.calibration\n"),
    ("not utf-8", b"\xff\xfe\x00{"),
    ("a list", b"[1, 2, 3]"),
    ("wrong format", b'{"format": "something.else", "version": 1}'),
    ("no format", b'{"version": 1}'),
    ("future version", None),
    ("missing sites", None),
    ("missing values", None),
])
def test_unreadable_files_are_user_errors_naming_the_file(tmp_path, case, content):
    path = tmp_path / f"{case.replace(' ', '_')}.json"
    if case == "directory":
        path.mkdir()
    elif case == "truncated":
        text = json.dumps(_valid_document(tmp_path))
        path.write_text(text[: len(text) // 2], encoding="utf-8")
    elif case == "future version":
        path.write_text(json.dumps({**_valid_document(tmp_path), "version": 2}), encoding="utf-8")
    elif case.startswith("missing "):
        document = _valid_document(tmp_path)
        del document[case.split()[1]]
        path.write_text(json.dumps(document), encoding="utf-8")
    elif content is not None:
        path.write_bytes(content)
    model = tiny.tiny_flux_transformer()
    for call in (lambda: load_calibration(path), lambda: apply_calibration(model, path)):
        with pytest.raises(UserError) as exc_info:
            call()
        assert not isinstance(exc_info.value, CalibrationMismatch)
        assert str(path) in _one_line(exc_info)
    assert _hook_count(model) == 0



@pytest.mark.parametrize(("case", "change"), [
    pytest.param("unknown granularity", {"granularity": "xyz"}),
    pytest.param("copies not a number", {"copies": "two"}),
    pytest.param("unknown form", {"form": "weird"}),
    pytest.param("sites not a list", {"sites": None}),
    pytest.param("values not a mapping", {"values": [1.0, 2.0]}),
    pytest.param("a value not a number", {"values": {"omega": "abc"}}),
    pytest.param("a value not finite", {"values": {"omega": float("nan")}}),
    pytest.param("an unknown value name", {"values": {"double.9.img.attn": 1.0}}),
    pytest.param("model not a mapping", {"model": "flux"}),
    ("version not a number", {"version": "1"}),
])
def test_corrupt_fields_are_user_errors_naming_the_file(tmp_path, case, change):
    document = _valid_document(tmp_path)
    for key, value in change.items():
        if key == "values":
            document["values"] = {**document["values"], **value} if isinstance(value, dict) else value
        else:
            document[key] = value
    path = tmp_path / "corrupt.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    model = tiny.tiny_flux_transformer()
    raised = None
    try:
        apply_calibration(model, path).detach()
    except Exception as exc:  # noqa: BLE001 - the type is what is checked
        raised = exc
    assert isinstance(raised, UserError), f"{case}: {type(raised).__name__}: {raised}"
    assert str(path) in str(raised) and "\n" not in str(raised)
    assert _hook_count(model) == 0


# --------------------------------------------------------------------------------------------------
# The command line: calibri bake, calibri sites errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["transformer folder", "pipeline folder"])
def test_bake_command_writes_a_plain_diffusers_model(tmp_path, calibri_cli, layout):
    model = tiny.tiny_flux_transformer()
    inputs = tiny.dummy_transformer_inputs(model)
    plain = _run(model, inputs)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir / "transformer" if layout == "pipeline folder" else model_dir)
    source_digests = _file_digests(model_dir)
    calibrator = _calibrated(model, "layer", seed=3)
    calibrated = _run(model, inputs)
    calibration = save_calibration(calibrator, tmp_path / "calibration.json")
    calibrator.detach()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = calibri_cli("bake", model_dir, calibration, "-o", tmp_path / "baked")
    assert result.returncode == 0, result.stderr
    assert not [w for w in caught if "another config" in str(w.message)]  # saved and reloaded: same config
    assert "baked" in result.stdout
    assert (tmp_path / "baked" / "config.json").is_file()
    loaded = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "baked").eval()
    assert type(loaded) is diffusers.FluxTransformer2DModel and _hook_count(loaded) == 0
    out = _run(loaded, inputs)
    assert _close(out, calibrated, 1e-5)
    assert not _close(out, plain, 1e-3)
    # the source folder is untouched: calibri promises that byte for byte (a reloaded model's
    # outputs are not bit-exact across diffusers versions, its files are)
    assert _file_digests(model_dir) == source_digests


def test_bake_command_errors_are_one_line(tmp_path, calibri_cli):
    model_dir = tmp_path / "sd3"
    tiny.tiny_sd3_transformer().save_pretrained(model_dir)
    flux_file = _flux_file(tmp_path)
    cases = [
        (("bake", model_dir, flux_file, "-o", tmp_path / "out1"), "flux"),  # another architecture
        (("bake", tmp_path / "nowhere", flux_file, "-o", tmp_path / "out2"), "nowhere"),  # no model
        (("bake", model_dir, tmp_path / "missing.json", "-o", tmp_path / "out3"), "missing.json"),  # no file
    ]
    for args, needle in cases:
        result = calibri_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("calibri: error:") and needle in lines[0], result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / args[-1]).exists()


@pytest.mark.parametrize("case", ["no such file", "not json", "no class name", "unknown class"])
def test_sites_on_a_bad_config_exits_2_with_one_line(tmp_path, calibri_cli, case):
    path = tmp_path / "config.json"
    if case == "not json":
        path.write_text("{not json", encoding="utf-8")
    elif case == "no class name":
        path.write_text(json.dumps({"num_layers": 2}), encoding="utf-8")
    elif case == "unknown class":
        path.write_text(json.dumps({"_class_name": "NoSuchTransformer2DModel"}), encoding="utf-8")
    target = tmp_path / "nowhere" / "config.json" if case == "no such file" else path
    result = calibri_cli("sites", "--model-config", target)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calibri: error:"), result.stderr
    assert str(target) in lines[0] or "NoSuchTransformer2DModel" in lines[0]
    assert result.stdout == ""


def test_sites_on_a_saved_tiny_model_folder(tmp_path, calibri_cli):
    tiny.tiny_qwen_transformer().save_pretrained(tmp_path / "qwen")
    result = calibri_cli("sites", "--model-config", tmp_path / "qwen", "--granularity", "layer", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["architecture"] == "qwenimage" and summary["sites_per_copy"] == 4
    assert [s["name"] for s in summary["sites"]] == ["block.0.attn", "block.0.mlp", "block.1.attn", "block.1.mlp"]


# --------------------------------------------------------------------------------------------------
# The ``dit`` named space in a run config
# --------------------------------------------------------------------------------------------------

RUN_YAML = """\
objective: {name: sphere}
optimizer: pycma
budget: {rounds: 1}
space:
  name: dit
  options: {model_config: sd3.5-medium, granularity: gate, copies: 2, form: cfg, guidance_scale: 7}
"""


def test_dit_named_space_plans_to_216_dimensions(tmp_path):
    from calibri.core.config import read_yaml, validate
    from calibri.core.run import plan

    path = tmp_path / "run.yaml"
    path.write_text(RUN_YAML, encoding="utf-8")
    space = plan(validate(read_yaml(path))).space
    assert space is not None and len(space) == 216
    groups = space.groups
    assert sorted(groups) == ["block.attn", "block.attn2", "block.mlp", "omega"]
    assert len(groups["block.attn"]) == 2 * (24 + 23)
    assert len(groups["block.attn2"]) == 2 * 13
    assert len(groups["block.mlp"]) == 2 * (24 + 23)
    assert groups["omega"] == ["omega.0", "omega.1"]
    init = space.init_params()
    assert (init["omega.0"], init["omega.1"]) == (7.0, -6.0)
    assert space.names[:3] == ["c0.block.0.img.attn", "c0.block.0.txt.attn", "c0.block.0.img.attn2"]
    assert space.names[107] == "c1.block.0.img.attn"
    assert all(init[n] == 1.0 for n in space.names[:214])
    assert space["c1.block.23.img.mlp"].low == -1.0 and space["c1.block.23.img.mlp"].high == 2.0


@pytest.mark.parametrize(("options", "field"), [
    ({"model_config": "sd3.5-medium", "granularity": "row"}, "space.options.granularity"),
    ({"model_config": "sd3.5-medium", "copies": 2, "form": "cfg"}, "space.options"),
    ({"model_config": "no-such-model"}, "no-such-model"),
])
def test_dit_named_space_errors_are_config_errors(options, field):
    from calibri.core.config import validate
    from calibri.core.run import plan

    config = validate({"objective": "sphere", "optimizer": "pycma", "budget": {"rounds": 1},
                       "space": {"name": "dit", "options": options}})
    with pytest.raises(UserError) as exc_info:
        plan(config)
    assert field in _one_line(exc_info)
