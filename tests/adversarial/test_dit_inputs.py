"""Adversarial inputs to the DiT plugin's commands and options: each is a user mistake, and each
must end with exit status 2 and one ``calibri: error:`` line naming the option, field or file —
no traceback, no hang, no silent no-op, nothing already written lost.

Cases that never returned before their fix run in a subprocess with a generous timeout (the fix
makes them return at once); the rest run in-process for speed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from calibri.plugins.dit import tiny  # noqa: E402
from calibri.plugins.dit.calibration import Calibrator  # noqa: E402
from calibri.plugins.dit.calibration_file import save_calibration  # noqa: E402
from helpers_cli import error_line  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

TOY_PROMPTS = "a small red circle on the left\na large blue square at the top\n"
TOY_MODEL = Path(__file__).resolve().parents[2] / "plugins" / "toy" / "model"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def calibri(tmp_path):
    """The ``calibri`` command in this process (no third-party plugins), run from ``tmp_path``."""
    from click.testing import CliRunner

    from calibri.core import plugins
    from calibri.core.cli import build_cli

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CALIBRI_PLUGINS", "")
        mp.chdir(tmp_path)
        plugins.reset_registry()
        cli = build_cli()

        def run(*args) -> Result:
            result = CliRunner().invoke(cli, [str(a) for a in args])
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise result.exception
            return Result(result.exit_code, result.stdout, result.stderr)

        yield run
        plugins.reset_registry()


def calibri_subprocess(*args, cwd: Path) -> Result:
    """The ``calibri`` command in a fresh interpreter, for inputs that once never returned."""
    env = dict(os.environ, CALIBRI_PLUGINS="")
    proc = subprocess.run([sys.executable, "-m", "calibri.core.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    return Result(proc.returncode, proc.stdout, proc.stderr)




def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# Shared inputs: a saved tiny FLUX transformer and calibrations of it; a calibration of the
# shipped toy model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Path:
    """A folder with ``model/`` (a tiny FLUX transformer) and calibrations: plain, timestep-
    dependent, ensemble."""
    root = tmp_path_factory.mktemp("flux")
    model = tiny.tiny_flux_transformer()
    model.save_pretrained(root / "model")
    for name, kwargs in (("plain", {}), ("buckets", {"time_buckets": 2}), ("copies", {"copies": 2, "form": "distilled"})):
        calibrator = Calibrator(model, "layer", **kwargs).attach()
        save_calibration(calibrator, root / f"{name}.json")
        calibrator.detach()
    return root


@pytest.fixture(scope="module")
def toy_calibration(tmp_path_factory) -> Path:
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(TOY_MODEL / "transformer")
    path = tmp_path_factory.mktemp("toycal") / "toy.json"
    calibrator = Calibrator(transformer, "layer").attach()
    save_calibration(calibrator, path)
    calibrator.detach()
    return path


# --------------------------------------------------------------------------------------------------
# calibri bake
# --------------------------------------------------------------------------------------------------

def _truncated_weights(tmp_path: Path, flux: Path) -> Path:
    folder = tmp_path / "truncated"
    shutil.copytree(flux / "model", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def _mismatched_config(tmp_path: Path, flux: Path) -> Path:
    folder = tmp_path / "mismatched"
    shutil.copytree(flux / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(attention_head_dim=32, axes_dims_rope=[8, 12, 12])  # twice the width of the weights
    (folder / "config.json").write_text(json.dumps(config))
    return folder


BAKE_CASES = [
    # setup(tmp_path, flux) -> (model folder, calibration, output, extra arguments); needles of the error line
    pytest.param(lambda t, f: (f / "model", f / "plain.json", _file(t / "out.txt"), ()),
                 ("-o/--output", "out.txt", "not a folder"), id="output-is-an-existing-file"),
    pytest.param(lambda t, f: (f / "model", f / "plain.json", _folder(t / "out"), ()),
                 ("-o/--output", "--overwrite"), id="output-is-a-folder-with-content"),
    pytest.param(lambda t, f: (f / "model", f / "plain.json", _file(t / "file") / "sub", ()),
                 ("-o/--output", "is a file"), id="output-under-a-file"),
    pytest.param(lambda t, f: (f / "model", f / "plain.json", f / "model", ("--overwrite",)),
                 ("-o/--output", "baking reads"), id="output-is-the-model-folder"),
    pytest.param(lambda t, f: (f / "model", f / "buckets.json", t / "out", ()),
                 ("buckets.json", "cannot be baked"), id="time-bucketed-calibration"),
    pytest.param(lambda t, f: (f / "model", f / "copies.json", t / "out", ()),
                 ("copies.json", "cannot be baked"), id="ensemble-calibration"),
    pytest.param(lambda t, f: (_truncated_weights(t, f), f / "plain.json", t / "out", ()),
                 ("diffusion_pytorch_model.safetensors",), id="truncated-weights"),
    pytest.param(lambda t, f: (_mismatched_config(t, f), f / "plain.json", t / "out", ()),
                 ("config.json", "does not match the weights"), id="config-does-not-match-weights"),
    pytest.param(lambda t, f: (_empty(t / "empty"), f / "plain.json", t / "out", ()),
                 ("empty", "no config.json"), id="model-folder-without-config"),
]


def _file(path: Path) -> Path:
    path.write_text("keep me", encoding="utf-8")
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("keep me", encoding="utf-8")
    return path


def _empty(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize(("setup", "needles"), BAKE_CASES)
def test_bake_refuses(setup, needles, tmp_path, flux, calibri):
    model, calibration, output, extra = setup(tmp_path, flux)
    before = {p: digests(p) if p.is_dir() else p.read_bytes() for p in (model, flux, output)
              if p.exists()}
    leftovers = set(output.parent.iterdir()) if output.parent.is_dir() else set()
    error_line(calibri("bake", model, calibration, "-o", output, *extra), *needles)
    after = {p: digests(p) if p.is_dir() else p.read_bytes() for p in before}
    assert after == before  # nothing already written is lost or changed
    assert output.exists() == (output in before)  # and nothing new appears
    if output.parent.is_dir():
        assert set(output.parent.iterdir()) == leftovers  # no partial output left behind


def test_bake_overwrite_replaces_a_folder_and_reports_only_what_it_wrote(tmp_path, flux, calibri):
    out = _folder(tmp_path / "out")
    result = calibri("bake", flux / "model", flux / "plain.json", "-o", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert "baked" in result.stdout and (out / "config.json").is_file() and not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


# --------------------------------------------------------------------------------------------------
# calibri sites: model configs that are not models
# --------------------------------------------------------------------------------------------------

def _toy_config(**changes) -> dict:
    config = json.loads((TOY_MODEL / "transformer" / "config.json").read_text())
    config.update(changes)
    return config


SITES_CASES = [
    pytest.param(_toy_config(num_layers=-3), (), ("num_layers", "between 1 and 1000"), id="negative-layers"),
    pytest.param(_toy_config(num_layers=0), (), ("num_layers",), id="zero-layers"),
    pytest.param(_toy_config(num_layers=1e6), (), ("num_layers", "whole number"), id="float-layers"),
    pytest.param(_toy_config(num_layers="five"), (), ("num_layers",), id="text-layers"),
    pytest.param(_toy_config(num_layers=True), (), ("num_layers",), id="boolean-layers"),
    pytest.param({**tiny.TINY_FLUX_CONFIG, "_class_name": "FluxTransformer2DModel", "num_single_layers": -1}, (),
                 ("num_single_layers",), id="negative-single-layers"),
    pytest.param(_toy_config(num_attention_heads=-1), (), ("config.json", "cannot build"), id="negative-heads"),
    pytest.param(_toy_config(_class_name=["SD3Transformer2DModel"]), (), ("config.json", "_class_name"),
                 id="class-name-not-a-string"),
    pytest.param(_toy_config(), ("--form", "distilled", "--copies", "1000"), ("copies", "16"), id="too-many-copies"),
    pytest.param(_toy_config(), ("--form", "cfg", "--copies", "2", "--guidance-scale", "nan"),
                 ("--guidance-scale",), id="guidance-nan"),
    pytest.param(_toy_config(), ("--form", "cfg", "--copies", "2", "--guidance-scale", "1e308"),
                 ("--guidance-scale",), id="guidance-huge"),
]


@pytest.mark.parametrize(("config", "extra", "needles"), SITES_CASES)
def test_sites_refuses_a_config_that_is_not_a_model(config, extra, needles, tmp_path, calibri):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    error_line(calibri("sites", "--model-config", path, *extra), *needles)


@pytest.mark.parametrize("case", ["device-file", "million-layers", "huge-file"])
def test_sites_returns_on_inputs_that_never_returned(case, tmp_path):
    if case == "device-file":
        if not Path("/dev/zero").exists():
            pytest.skip("no /dev/zero here")
        target, needles = "/dev/zero", ("/dev/zero", "not a regular file")
    elif case == "million-layers":
        target, needles = tmp_path / "config.json", ("num_layers", "1000000")
        target.write_text(json.dumps(_toy_config(num_layers=1_000_000)), encoding="utf-8")
    else:
        target, needles = tmp_path / "config.json", ("config.json", "too large")
        target.write_text(json.dumps(_toy_config(padding="x" * (2 << 20))), encoding="utf-8")
    error_line(calibri_subprocess("sites", "--model-config", target, cwd=tmp_path), *needles)


# --------------------------------------------------------------------------------------------------
# Objective options (calibri run): refused while the run is planned, before any model loads
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory) -> Path:
    """A tiny SD3 pipeline folder's configs (what the checks before loading read; no weights)."""
    root = tmp_path_factory.mktemp("sd3")
    (root / "transformer").mkdir()
    (root / "vae").mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (root / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "SD3Transformer2DModel", **tiny.TINY_SD3_CONFIG}))
    (root / "vae" / "config.json").write_text(
        json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [8, 16, 16]}))  # x4, as tiny's VAE
    return root


def _run_config(tmp_path: Path, options: dict, model: str = "toy") -> Path:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(TOY_PROMPTS, encoding="utf-8")
    base = {"model": model, "steps": 1, "bucket_size": 2, "batch_size": 2, "reward": "colorfulness",
            "prompts": str(prompts), "validation_prompts": None}
    config = {"objective": {"name": "calibri", "options": {**base, **options}}, "optimizer": "random",
              "budget": {"rounds": 1}, "callbacks": []}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _layers(tmp_path: Path, layers: int) -> str:
    path = tmp_path / "transformer.json"
    path.write_text(json.dumps(_toy_config(num_layers=layers)), encoding="utf-8")
    return str(path)


OPTION_CASES = [
    # (options, model: "toy" | "sd3", needles)
    pytest.param({"height": -32}, "toy", ("objective.options.height", "between 1 and"), id="height-negative"),
    pytest.param({"height": 33}, "sd3", ("objective.options.height", "multiple of 8"), id="height-not-a-multiple"),
    pytest.param({"width": 12}, "sd3", ("objective.options.width", "multiple of 8"), id="width-not-a-multiple"),
    pytest.param({"height": 10 ** 6}, "sd3", ("objective.options.height",), id="height-huge"),
    pytest.param({"height": 32}, "toy", ("objective.options.height", "fixed size"), id="height-on-a-fixed-size-model"),
    pytest.param({"pipeline_options": {"nosuch": 1}}, "sd3", ("objective.options.pipeline_options.nosuch",
                                                             "StableDiffusion3Pipeline"), id="pipeline-option-unknown"),
    pytest.param({"pipeline_options": {"nosuch": 1}}, "toy", ("objective.options.pipeline_options.nosuch",),
                 id="pipeline-option-unknown-toy"),
    pytest.param({"pipeline_options": {"num_inference_steps": 50}}, "sd3",
                 ("objective.options.pipeline_options", "objective.options.steps"), id="pipeline-option-steps"),
    pytest.param({"pipeline_options": {"guidance_scale": 2.0}}, "sd3",
                 ("objective.options.pipeline_options.guidance_scale",), id="pipeline-option-guidance"),
    pytest.param({"steps": 10 ** 9}, "toy", ("objective.options.steps", "at most 1000"), id="steps-huge"),
    pytest.param({"steps": 1e308}, "toy", ("objective.options.steps",), id="steps-1e308"),
    pytest.param({"batch_size": 10 ** 7}, "toy", ("objective.options.batch_size",), id="batch-size-huge"),
    pytest.param({"copies": 1000, "form": "distilled"}, "toy", ("objective.options.copies", "at most 16"),
                 id="copies-huge"),
    pytest.param({"time_buckets": 10 ** 6}, "toy", ("objective.options.time_buckets",), id="time-buckets-huge"),
    pytest.param({"guidance_scale": float("nan")}, "toy", ("objective.options.guidance_scale",), id="guidance-nan"),
    pytest.param({"guidance_scale": 1e308}, "toy", ("objective.options.guidance_scale",), id="guidance-1e308"),
    pytest.param({"sigma": 0.0}, "toy", ("objective.options.sigma",), id="sigma-zero"),
    pytest.param({"omega_sigma": float("inf")}, "toy", ("objective.options.omega_sigma",), id="omega-sigma-inf"),
    pytest.param({"reward": {"name": "toy_oracle", "options": {"device": "cuda:7" if not torch.cuda.is_available()
                                                               else "cuda:999"}}}, "toy",
                 ("objective.options.reward.options.device", "cuda:"), id="reward-device-absent"),
    pytest.param({"reward": {"name": "toy_oracle", "options": {"device": "warp-drive"}}}, "toy",
                 ("objective.options.reward.options.device", "warp-drive"), id="reward-device-malformed"),
    pytest.param({"reward": [{"name": "colorfulness", "options": {"device": "cuda:999"}}, "toy_oracle"]}, "toy",
                 ("objective.options.reward[0].options.device",), id="reward-component-device"),
    pytest.param({"reward": "toy_oracle", "prompts": ["a photo of a cat"]}, "toy",
                 ("objective.options.prompts", "toy-world"), id="toy-oracle-on-foreign-prompts"),
    pytest.param({"model": "/no/such/model"}, "toy", ("objective.options.model", "/no/such/model"),
                 id="model-missing"),
    pytest.param({"model": "EMPTY"}, "toy", ("objective.options.model", "no model_index.json"), id="model-empty-folder"),
    pytest.param({"model_config": "LAYERS:-3"}, "toy", ("objective.options.model_config", "num_layers"),
                 id="model-config-negative-layers"),
]


@pytest.mark.parametrize(("options", "model", "needles"), OPTION_CASES)
def test_run_refuses_options_before_loading_the_model(options, model, needles, tmp_path, sd3_folder, calibri):
    options = dict(options)
    if options.get("model") == "EMPTY":
        (tmp_path / "empty").mkdir()
        options["model"] = str(tmp_path / "empty")
    if str(options.get("model_config", "")).startswith("LAYERS:"):
        options["model_config"] = _layers(tmp_path, int(options["model_config"].split(":")[1]))
    config = _run_config(tmp_path, options, str(sd3_folder) if model == "sd3" else "toy")
    error_line(calibri("run", config, "-o", tmp_path / "run"), *needles)
    assert not (tmp_path / "run").exists()


TOY_OBJECTIVE = {"name": "calibri", "options": {"model": "toy", "steps": 1, "bucket_size": 2, "validation_prompts": None}}


@pytest.mark.parametrize(("changes", "needles"), [
    pytest.param({"objective": {"name": "calibri", "options": {**TOY_OBJECTIVE["options"], "bucket_size": 1e6}}},
                 ("objective.options.bucket_size", "1024"), id="bucket-size-1e6"),
    pytest.param({"objective": {"name": "sphere", "options": {"dim": 1e7}}}, ("objective.options.dim", "10000"),
                 id="sphere-dim-1e7"),
    pytest.param({"objective": {"name": "rastrigin", "options": {"dim": 10 ** 9}}}, ("objective.options.dim",),
                 id="rastrigin-dim-1e9"),
    pytest.param({"callbacks": [{"name": "calibration_report", "options": {"nfe": [2, 10 ** 9]}}]},
                 ("callbacks.calibration_report.options.nfe",), id="report-nfe-1e9"),
])
def test_run_returns_on_sizes_that_never_returned(changes, needles, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"objective": TOY_OBJECTIVE, "optimizer": "random", "budget": {"rounds": 1},
                                      "callbacks": [], **changes}), encoding="utf-8")
    error_line(calibri_subprocess("run", config, "-o", tmp_path / "run", cwd=tmp_path), *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("options", "needles"), [
    pytest.param({"device": "cuda:999"}, ("callbacks.calibration_report.options.device",), id="device-absent"),
    pytest.param({"guidance": [float("nan")]}, ("callbacks.calibration_report.options.guidance",), id="guidance-nan"),
    pytest.param({"nfe": [0]}, ("callbacks.calibration_report.options.nfe",), id="nfe-zero"),
    pytest.param({"grid_prompts": 0}, ("callbacks.calibration_report.options.grid_prompts",), id="grid-prompts-zero"),
])
def test_run_refuses_report_options_before_the_run(options, needles, tmp_path, calibri):
    """The end-of-run report's options are checked when the run starts, not after it has run."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"objective": TOY_OBJECTIVE, "optimizer": "random", "budget": {"rounds": 1},
                                      "callbacks": [{"name": "calibration_report", "options": options}]}),
                      encoding="utf-8")
    error_line(calibri("run", config, "-o", tmp_path / "run"), *needles)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# calibri evaluate
# --------------------------------------------------------------------------------------------------

def _evaluate_model_folder(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "no-such-model"
    if kind == "empty":
        return _empty(tmp_path / "empty-model")
    folder = tmp_path / "truncated-model"
    shutil.copytree(TOY_MODEL, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    return folder


EVALUATE_CASES = [
    # (arguments after the calibration file; "PROMPTS" is a file of toy prompts, needles)
    pytest.param(["--steps", "1e308"], ("--steps",), id="steps-1e308"),
    pytest.param(["--steps", "1,2,1000000"], ("--steps", "at most 1000"), id="steps-huge"),
    pytest.param(["--guidance", "1e308"], ("--guidance",), id="guidance-1e308"),
    pytest.param(["--guidance", "inf"], ("--guidance",), id="guidance-inf"),
    pytest.param(["--device", "cuda:999"], ("--device", "cuda:999"), id="device-absent-gpu"),
    pytest.param(["--device", "warp-drive"], ("--device", "warp-drive"), id="device-malformed"),
    pytest.param(["--device", "meta"], ("--device",), id="device-meta"),
    pytest.param(["--reward", "nosuch"], ("--reward", "nosuch"), id="reward-unknown"),
    pytest.param(["--reward", "colorfulness", "--prompts", "PROMPTS", "--model", "MISSING"],
                 ("--model", "no-such-model"), id="model-missing"),
    pytest.param(["--reward", "colorfulness", "--prompts", "PROMPTS", "--model", "EMPTY"],
                 ("--model", "empty-model", "model_index.json"), id="model-empty-folder"),
    pytest.param(["--reward", "colorfulness", "--prompts", "PROMPTS", "--model", "TRUNCATED"],
                 ("--model", "truncated-model"), id="model-truncated-weights"),
    pytest.param(["--model", "toy", "--prompts", "FOREIGN"], ("--prompts", "toy-world"),
                 id="toy-oracle-on-foreign-prompts"),
    pytest.param(["--model", "toy", "-o", "FILE"], ("-o/--output", "not a folder"), id="output-is-a-file"),
]


@pytest.mark.parametrize(("args", "needles"), EVALUATE_CASES)
def test_evaluate_refuses_before_loading(args, needles, tmp_path, toy_calibration, calibri):
    (tmp_path / "prompts.txt").write_text(TOY_PROMPTS, encoding="utf-8")
    (tmp_path / "foreign.txt").write_text("a photo of a cat\n", encoding="utf-8")
    (tmp_path / "file.txt").write_text("keep me", encoding="utf-8")
    stand_ins = {"PROMPTS": tmp_path / "prompts.txt", "FOREIGN": tmp_path / "foreign.txt",
                 "FILE": tmp_path / "file.txt", "MISSING": None, "EMPTY": None, "TRUNCATED": None}
    resolved = []
    for arg in args:
        if arg in ("MISSING", "EMPTY", "TRUNCATED"):
            arg = _evaluate_model_folder(tmp_path, arg.lower())
        resolved.append(stand_ins.get(arg) or arg)
    before = digests(tmp_path)
    error_line(calibri("evaluate", toy_calibration, *resolved), *needles)
    assert digests(tmp_path) == before
    assert not (toy_calibration.parent / f"{toy_calibration.stem}-evaluation").exists()


def test_evaluate_on_a_cpu_only_machine_refuses_cuda(toy_calibration, calibri):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    error_line(calibri("evaluate", toy_calibration, "--model", "toy", "--device", "cuda:0"), "--device", "CUDA")


@pytest.mark.parametrize("args", [["--guidance", "nan"], ["--steps", "100000000"]], ids=["guidance-nan", "steps-1e8"])
def test_evaluate_returns_on_values_that_never_returned(args, toy_calibration, tmp_path):
    error_line(calibri_subprocess("evaluate", toy_calibration, "--model", "toy", *args, cwd=tmp_path), args[0])


def test_evaluate_refuses_a_calibration_file_of_impossible_size(tmp_path, toy_calibration, calibri):
    document = json.loads(toy_calibration.read_text())
    document.update(copies=10 ** 6, form="distilled")
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    error_line(calibri("evaluate", path, "--model", "toy"), "huge.json", "copies")


def _run_dir(tmp_path: Path, best: bytes | None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"objective": {"name": "calibri"}, "optimizer": "random",
                                                     "budget": {"rounds": 1}}), encoding="utf-8")
    if best is not None:
        (run / "best.json").write_bytes(best)
    return run


@pytest.mark.parametrize(("best", "needles"), [
    pytest.param(b"\x00\xff garbage {", ("best.json",), id="garbage-bytes"),
    pytest.param(b"[1, 2, 3]", ("best.json",), id="a-list"),
    pytest.param(b'{"direction": "maximize"}', ("best.json", "parameter values"), id="no-values"),
    pytest.param(b'{"direction": "maximize", "recommendation": "x"}', ("best.json",), id="values-not-a-mapping"),
    pytest.param(b'{"direction": "maximize", "validation": {"selected": {"params": {"a": "NaN"}}}}',
                 ("best.json",), id="values-not-numbers"),
])
def test_evaluate_refuses_a_garbage_best_json(best, needles, tmp_path, calibri):
    run = _run_dir(tmp_path, best)
    before = digests(run)
    error_line(calibri("evaluate", run), *needles)
    assert digests(run) == before and not (run / "evaluation").exists()


@pytest.mark.parametrize(("args", "needles"), [
    pytest.param(["--reward", "nosuch"], ("--reward", "nosuch"), id="unknown-reward"),
    pytest.param(["--model", "toy"], ("--model", "run directory"), id="model-option"),
])
def test_evaluate_on_a_run_directory_does_not_ignore_options(args, needles, tmp_path, calibri):
    """--reward on a run directory replaces the run's reward, so an unknown one is refused; --model
    does not apply to a run directory, so it is refused rather than ignored."""
    run = _run_dir(tmp_path, b'{"direction": "maximize", "recommendation": {"omega": 1.0}}')
    (tmp_path / "prompts.txt").write_text(TOY_PROMPTS, encoding="utf-8")
    error_line(calibri("evaluate", run, *args, "--steps", "1", "--prompts", tmp_path / "prompts.txt"), *needles)
