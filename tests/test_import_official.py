"""``calibri import-official``: results of the official Calibri research code as calibri calibrations.

The official run folders here are written by the tests, their vectors laid out by the official
order as its format description states it (written out below, apart from the importer's code).
A small stand-in for the official hooks (each entry multiplies its gate; on Qwen-Image, the
attention outputs, its MLP hooks never firing; ω weighting the output) checks that the imported
file, applied by calibri, computes what the official run computed on the same tiny models.
"""
from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from calibri.plugins.dit import tiny  # noqa: E402
from calibri.plugins.dit.calibration_file import apply_calibration, load_calibration  # noqa: E402
from helpers_cli import error_line  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

G_SD3 = 4.5  # the guidance scale written into the SD3 runs' config.json
G_QWEN = 7.0  # the official Qwen-Image pipeline's cfg_scale, whatever config.json says
SD3_DUAL = (0, 1)  # blocks with a second image attention; the last of 4 is context-pre-only


# --------------------------------------------------------------------------------------------------
# The official vector order, per the format description (c<m>. only with several copies)
# --------------------------------------------------------------------------------------------------

def _p(m: int, copies: int) -> str:
    return f"c{m}." if copies > 1 else ""


def official_names(kind: str, copies: int, model: Any) -> list[str]:
    """Every entry name of an official vector, in the official order, ω last."""
    cs = range(copies)
    if kind.startswith("flux"):
        doubles, singles = range(model.config.num_layers), range(model.config.num_single_layers)
        tail = [f"{_p(m, copies)}single.{i}" for m in cs for i in singles]
        if kind == "flux_block":
            head = [f"{_p(m, copies)}double.{b}" for m in cs for b in doubles]
        elif kind == "flux_layer":
            head = []
            for m in cs:
                for b in doubles:
                    head += [f"{_p(m, copies)}double.{b}.attn", f"{_p(m, copies)}double.{b}.mlp"]
        else:
            head = []
            for stream in ("img", "txt"):  # every copy's image entries, then every copy's text entries
                for m in cs:
                    for b in doubles:
                        head += [f"{_p(m, copies)}double.{b}.{stream}.attn", f"{_p(m, copies)}double.{b}.{stream}.mlp"]
        scales = head + tail
    elif kind == "sd3":
        blocks = model.config.num_layers
        text_blocks = range(blocks - 1)  # the last block is context-pre-only
        scales = [f"{_p(m, copies)}block.{b}.img.{br}" for m in cs for b in range(blocks) for br in ("attn", "mlp")]
        scales += [f"{_p(m, copies)}block.{b}.txt.{br}" for m in cs for b in text_blocks for br in ("attn", "mlp")]
        scales += [f"{_p(m, copies)}block.{b}.img.attn2" for m in cs for b in SD3_DUAL]
    else:  # qwen
        scales = [f"{_p(m, copies)}block.{b}.{entry}" for m in cs for b in range(model.config.num_layers)
                  for entry in ("img.attn", "txt.attn", "img.mlp", "txt.mlp")]
    return scales + (["omega"] if copies == 1 else [f"omega.{m}" for m in cs])


# --------------------------------------------------------------------------------------------------
# Tiny models, their configs, and official run folders
# --------------------------------------------------------------------------------------------------

MODEL_NAMES = {"flux_block": "flux_block", "flux_layer": "flux_mlp_attn", "flux_gate": "black-forest-labs/FLUX.1-dev",
               "sd3": "stabilityai/stable-diffusion-3.5-medium", "qwen": "qwen"}


def build(kind: str) -> Any:
    if kind.startswith("flux"):
        return tiny.tiny_flux_transformer()
    if kind == "sd3":
        return tiny.tiny_sd3_transformer(dual_attention_layers=SD3_DUAL)
    return tiny.tiny_qwen_transformer()


@pytest.fixture(scope="module")
def model_configs(tmp_path_factory) -> dict[str, Path]:
    """A saved config.json folder per tiny model (the ``--model-config`` of every import here)."""
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for kind in ("flux", "sd3", "qwen"):
        build(kind if kind != "flux" else "flux_gate").save_config(root / kind)
        out[kind] = root / kind
    return out


def config_of(kind: str, model_configs: dict[str, Path]) -> Path:
    return model_configs["flux" if kind.startswith("flux") else kind]


def official_vector(names: list[str], seed: int) -> list[float]:
    """Scales around 1 and ω of either sign, as a CMA-ES result looks."""
    rng = np.random.default_rng(seed)
    values = []
    for name in names:
        if name.startswith("omega"):
            values.append(float(rng.choice([1.0, -1.0]) * rng.uniform(0.5, 3.0)) if "." in name else
                          float(rng.uniform(0.8, 1.3)))
        else:
            values.append(float(rng.uniform(0.4, 1.6)))
    return values


def make_run(root: Path, model_name: str, copies: int, vectors: dict[int, list[float]], *,
             guidance: float | None = 3.5, config_in: str = "run") -> Path:
    """An official run folder: ``checkpoints/step_N/cmaes_step_NNNN.json`` per step (with a
    pickled optimiser state beside it that must never be unpickled) and ``config.json``
    (in the run folder, or beside each result when ``config_in`` is ``"step"``)."""
    run = root / "logs" / "calibri_run_2025-06-01_10-00-00"
    config = {"model": {"model_name": model_name}, "scaleguidance": {"num_models": copies},
              "gen": {"guidance_scale": guidance}}
    for step, solution in vectors.items():
        folder = run / "checkpoints" / f"step_{step}"
        folder.mkdir(parents=True)
        result = {"step": step, "train_best": 0.5 + step / 1000, "train_mean": 0.4, "val": 0.45 + step / 1000,
                  "solution": solution, "shapes": {"n_models": copies, "total": len(solution)}, "sigma": 0.21,
                  "timestamp": "2025-06-01T12:00:00"}
        (folder / f"cmaes_step_{step:04d}.json").write_text(json.dumps(result))
        (folder / f"cmaes_step_{step:04d}.pkl").write_bytes(pickle.dumps(_Tripwire(root / "UNPICKLED")))
        if config_in == "step":
            (folder / "config.json").write_text(json.dumps(config))
    if config_in == "run":
        (run / "config.json").write_text(json.dumps(config))
    return run


class _Tripwire:
    """Unpickling this creates a folder: proof that the pickled state was opened."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.marker),))


# --------------------------------------------------------------------------------------------------
# The official hooks, re-created: each entry multiplies its gate (Qwen-Image: its attention
# outputs); ω weights the transformer's output
# --------------------------------------------------------------------------------------------------

def _scale_items(factors: dict[int, float]) -> Callable:
    def hook(module, args, output):
        items = list(output)
        for index, factor in factors.items():
            items[index] = items[index] * torch.tensor(factor, dtype=items[index].dtype)
        return tuple(items)
    return hook


def _official_hooks(kind: str, model: Any, scales: dict[str, float]) -> list[Any]:
    """Hooks for one copy's entries (names without the copy prefix)."""
    handles = []
    if kind.startswith("flux"):
        for b, block in enumerate(model.transformer_blocks):
            for stream, norm in (("img", block.norm1), ("txt", block.norm1_context)):
                if kind == "flux_block":
                    attn = mlp = scales[f"double.{b}"]
                elif kind == "flux_layer":
                    attn, mlp = scales[f"double.{b}.attn"], scales[f"double.{b}.mlp"]
                else:
                    attn, mlp = scales[f"double.{b}.{stream}.attn"], scales[f"double.{b}.{stream}.mlp"]
                # AdaLayerNormZero returns (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)
                handles.append(norm.register_forward_hook(_scale_items({1: attn, 4: mlp})))
        for i, block in enumerate(model.single_transformer_blocks):
            handles.append(block.norm.register_forward_hook(_scale_items({1: scales[f"single.{i}"]})))
    elif kind == "sd3":
        for b, block in enumerate(model.transformer_blocks):
            # (x, gate_msa, shift_mlp, scale_mlp, gate_mlp[, x2, gate_msa2])
            image = {1: scales[f"block.{b}.img.attn"], 4: scales[f"block.{b}.img.mlp"]}
            if b in SD3_DUAL:
                image[6] = scales[f"block.{b}.img.attn2"]
            handles.append(block.norm1.register_forward_hook(_scale_items(image)))
            if not block.context_pre_only:
                text = {1: scales[f"block.{b}.txt.attn"], 4: scales[f"block.{b}.txt.mlp"]}
                handles.append(block.norm1_context.register_forward_hook(_scale_items(text)))
    else:  # Qwen-Image: (image, text) attention outputs; the MLP hooks never fired
        for b, block in enumerate(model.transformer_blocks):
            handles.append(block.attn.register_forward_hook(
                _scale_items({0: scales[f"block.{b}.img.attn"], 1: scales[f"block.{b}.txt.attn"]})))
    return handles


def _copy(values: dict[str, float], m: int, copies: int) -> dict[str, float]:
    prefix = _p(m, copies)
    return {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix) and not k.startswith("omega")}


@contextmanager
def official_copy(kind: str, model: Any, values: dict[str, float], m: int, copies: int) -> Iterator[None]:
    handles = _official_hooks(kind, model, _copy(values, m, copies))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_model(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def official_output(kind: str, model: Any, values: dict[str, float], copies: int, cond: dict,
                    uncond: dict) -> torch.Tensor:
    """What the official code computes: ω·v for one copy; Σ ω_m v_m over FLUX copies; ω0 v_c + ω1 v_u
    for a cfg pair (copy 0 on the conditional inputs, copy 1 on the unconditional ones)."""
    if copies == 1:
        with official_copy(kind, model, values, 0, 1):
            return run_model(model, cond) * torch.tensor(values["omega"])
    total = None
    for m in range(copies):
        inputs = cond if kind.startswith("flux") or m == 0 else uncond
        with official_copy(kind, model, values, m, copies):
            out = run_model(model, inputs) * torch.tensor(values[f"omega.{m}"])
        total = out if total is None else total + out
    return total


def calibri_output(kind: str, model: Any, path: Path, copies: int, cond: dict, uncond: dict) -> torch.Tensor:
    """The imported file applied by calibri; for a cfg pair, the pipeline's u + g (c − u) on its
    outputs (SD3 batches [uncond; cond] in one call, Qwen-Image calls under cache_context)."""
    calibrator = apply_calibration(model, path)
    try:
        if copies == 1 or kind.startswith("flux"):
            return run_model(model, cond)
        g = calibrator.guidance_scale
        if kind == "sd3":
            batch = {k: torch.cat([uncond[k], cond[k]]) if isinstance(cond[k], torch.Tensor) else cond[k] for k in cond}
            out = run_model(model, batch)
            c, u = out[1:], out[:1]
        else:
            with model.cache_context("cond"):
                c = run_model(model, cond)
            with model.cache_context("uncond"):
                u = run_model(model, uncond)
        return u + g * (c - u)
    finally:
        calibrator.detach()


def _inputs(model: Any) -> tuple[dict, dict]:
    cond = tiny.dummy_transformer_inputs(model, seed=1)
    uncond = tiny.dummy_transformer_inputs(model, seed=2)
    uncond["hidden_states"] = cond["hidden_states"]  # the same latents, another text
    return cond, uncond


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# --------------------------------------------------------------------------------------------------
# The imported file computes what the official run computed
# --------------------------------------------------------------------------------------------------

CASES = [pytest.param(kind, copies, id=f"{kind}-{copies}")
         for kind in ("flux_block", "flux_layer", "flux_gate", "sd3", "qwen") for copies in (1, 2)]


@pytest.mark.parametrize(("kind", "copies"), CASES)
def test_imported_calibration_reproduces_the_official_hooks(kind, copies, tmp_path, model_configs, cli_inproc, recwarn):
    model = build(kind)
    names = official_names(kind, copies, model)
    vector = official_vector(names, seed=len(names) + copies)
    official = dict(zip(names, vector))
    if copies == 2 and kind == "qwen":
        official["omega.0"] = abs(official["omega.0"])  # a positive ω0: see the Qwen comparison below
    run = make_run(tmp_path, MODEL_NAMES[kind], copies, {40: [official[n] for n in names]},
                   guidance=G_SD3 if kind == "sd3" else 3.5)
    out = tmp_path / "imported.calibration.json"
    result = cli_inproc("import-official", run, "-o", out, "--model-config", config_of(kind, model_configs))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "UNPICKLED").exists()

    cond, uncond = _inputs(model)
    expected = official_output(kind, model, official, copies, cond, uncond)
    got = calibri_output(kind, model, out, copies, cond, uncond)
    if kind == "qwen" and copies == 2:
        # Qwen-Image renormalises the guided velocity, so calibri sets its direction only:
        # with ω0, g > 0 it equals (g / ω0)·(ω0 v_c + ω1 v_u).
        got = got * (official["omega.0"] / G_QWEN)
    scale = float(expected.abs().max())
    if copies == 1 and kind != "qwen":
        assert max_diff(got, expected) == 0.0
    else:
        assert max_diff(got, expected) <= 5e-6 * scale, max_diff(got, expected)
    # and the calibration is not the identity: the comparison has teeth
    assert max_diff(run_model(model, cond), expected) > 1e-3 * scale

    document = load_calibration(out)
    values = document["values"]
    for name, value in official.items():
        if kind == "qwen" and name.endswith(".mlp"):
            if name in values:
                assert values[name] == 1.0
        elif kind == "qwen" and name.split(".")[-3:-1] == [str(model.config.num_layers - 1), "txt"]:
            assert name not in values  # the last block's text stream is discarded: no site
        else:
            assert values[name] == np.float32(value)
    if kind == "qwen":
        assert any("MLP" in str(w.message) and "1.0" in str(w.message) for w in recwarn.list)


def test_document_records_the_calibration_and_its_source(tmp_path, model_configs, cli_inproc):
    model = build("sd3")
    names = official_names("sd3", 2, model)
    run = make_run(tmp_path, MODEL_NAMES["sd3"], 2, {7: official_vector(names, 0)}, guidance=G_SD3)
    out = tmp_path / "sub" / "sd3.calibration.json"
    result = cli_inproc("import-official", run, "-o", out, "--model-config", model_configs["sd3"])
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert document["format"] == "calibri.calibration"
    assert (document["architecture"], document["granularity"]) == ("sd3", "gate")
    assert (document["copies"], document["form"], document["guidance_scale"]) == (2, "cfg", G_SD3)
    assert document["calibrated_for"] == {"guidance_scale": G_SD3}
    assert document["model"]["name_or_path"] == "stabilityai/stable-diffusion-3.5-medium"
    assert set(document["values"]) == set(names)
    provenance = document["provenance"]
    assert (provenance["step"], provenance["val"], provenance["train_best"]) == (7, 0.457, 0.507)
    assert provenance["run"] == str(run.resolve()) and provenance["file"] == "checkpoints/step_7/cmaes_step_0007.json"
    lines = result.stdout.strip().splitlines()
    assert "step 7" in lines[0] and "val 0.457" in lines[0] and "train_best 0.507" in lines[0]
    assert "sd3, gate granularity, 2 copies (form cfg), guidance 4.5" in lines[1]
    n = len(names)
    assert lines[2].startswith(f"{n} official values -> {n} calibri values: {n - 2} scales and ω")
    assert lines[-1] == f"written: {out}"


def test_a_single_copy_import_bakes_into_the_weights(tmp_path, model_configs, cli_inproc):
    model = build("flux_gate")
    names = official_names("flux_gate", 1, model)
    official = dict(zip(names, official_vector(names, 3)))
    run = make_run(tmp_path, MODEL_NAMES["flux_gate"], 1, {5: list(official.values())})
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "flux.calibration.json"
    assert cli_inproc("import-official", run, "-o", out, "--model-config", model_configs["flux"]).returncode == 0
    result = cli_inproc("bake", tmp_path / "model", out, "-o", tmp_path / "baked")
    assert result.returncode == 0, result.stderr
    baked = type(model).from_pretrained(tmp_path / "baked").eval()
    cond, _ = _inputs(model)
    with official_copy("flux_gate", model, official, 0, 1):
        expected = run_model(model, cond) * official["omega"]
    assert max_diff(run_model(baked, cond), expected) <= 1e-5 * float(expected.abs().max())


def test_round_to_bfloat16_holds_the_values_as_a_bf16_run_did(tmp_path, model_configs, cli_inproc, recwarn):
    model = build("qwen")
    names = official_names("qwen", 2, model)
    official = dict(zip(names, official_vector(names, 5)))
    official["omega.0"] = 7.899  # acted as 7.906 in bf16
    run = make_run(tmp_path, "qwen", 2, {3: list(official.values())}, guidance=G_QWEN)
    out = tmp_path / "bf16.json"
    result = cli_inproc("import-official", run, "-o", out, "--model-config", model_configs["qwen"],
                        "--round-to", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert "rounded to bfloat16" in result.stdout
    values = load_calibration(out)["values"]
    assert values["omega.0"] == torch.tensor(7.899, dtype=torch.bfloat16).float().item() == 7.90625
    for name, value in values.items():
        if not name.endswith(".mlp"):
            assert value == torch.tensor(official[name], dtype=torch.bfloat16).float().item(), name
    assert json.loads(out.read_text())["provenance"]["rounded_to"] == "bfloat16"


def test_qwen_records_the_official_pipelines_cfg_scale(tmp_path, model_configs, cli_inproc, recwarn):
    """The official Qwen-Image training never passed gen.guidance_scale to its pipeline (cfg_scale
    7): 7 is recorded, with a warning where config.json says otherwise; --guidance-scale overrides."""
    names = official_names("qwen", 2, build("qwen"))
    run = make_run(tmp_path, "qwen", 2, {3: official_vector(names, 6)}, guidance=4.0)
    args = ("import-official", run, "--model-config", model_configs["qwen"], "-o")
    with pytest.warns(RuntimeWarning, match="gen.guidance_scale 4.*cfg_scale 7"):
        assert cli_inproc(*args, tmp_path / "a.json").returncode == 0
    assert load_calibration(tmp_path / "a.json")["guidance_scale"] == G_QWEN
    assert cli_inproc(*args, tmp_path / "b.json", "--guidance-scale", 5).returncode == 0
    assert load_calibration(tmp_path / "b.json")["guidance_scale"] == 5.0


# --------------------------------------------------------------------------------------------------
# Choosing the step; where config.json is
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def flux_steps(tmp_path) -> tuple[Path, dict[int, list[float]]]:
    """A FLUX block run with steps 5, 20 and 100 (100 is newest; "20" sorts after "100" as text)."""
    names = official_names("flux_block", 1, build("flux_block"))
    vectors = {step: official_vector(names, step) for step in (5, 20, 100)}
    return make_run(tmp_path, "flux_block", 1, vectors), vectors


def test_default_step_is_the_newest_by_number(flux_steps, tmp_path, model_configs, cli_inproc):
    run, vectors = flux_steps
    out = tmp_path / "c.json"
    assert cli_inproc("import-official", run, "-o", out, "--model-config", model_configs["flux"]).returncode == 0
    document = load_calibration(out)
    assert document["provenance"]["step"] == 100
    assert document["values"]["omega"] == vectors[100][-1]


def test_step_picks_one_and_a_missing_step_lists_those_there(flux_steps, tmp_path, model_configs, cli_inproc):
    run, vectors = flux_steps
    out = tmp_path / "c.json"
    args = ("import-official", run, "--model-config", model_configs["flux"], "-o")
    assert cli_inproc(*args, out, "--step", 20).returncode == 0
    assert load_calibration(out)["values"]["omega"] == vectors[20][-1]
    result = cli_inproc(*args, tmp_path / "d.json", "--step", 7)
    error_line(result, "--step", "step_7", "available: 5, 20, 100")


def test_an_interrupted_newest_step_is_skipped_with_a_warning(flux_steps, tmp_path, model_configs, cli_inproc):
    run, vectors = flux_steps
    (run / "checkpoints" / "step_100" / "cmaes_step_0100.json").unlink()
    out = tmp_path / "c.json"
    with pytest.warns(RuntimeWarning, match="step_100 .* no cmaes_step"):
        assert cli_inproc("import-official", run, "-o", out, "--model-config", model_configs["flux"]).returncode == 0
    assert load_calibration(out)["provenance"]["step"] == 20


def test_config_beside_the_result_is_found(tmp_path, model_configs, cli_inproc):
    names = official_names("flux_layer", 2, build("flux_layer"))
    run = make_run(tmp_path, "flux_mlp_attn", 2, {9: official_vector(names, 1)}, config_in="step")
    out = tmp_path / "c.json"
    assert cli_inproc("import-official", run, "-o", out, "--model-config", model_configs["flux"]).returncode == 0
    assert (load_calibration(out)["granularity"], load_calibration(out)["form"]) == ("layer", "distilled")


def test_shipped_configs_give_the_full_models_counts(tmp_path, cli_inproc):
    """Without --model-config, the block counts come from the shipped configs: FLUX.1-dev gate
    has 19·4 + 38 = 114 scales per copy; a vector of the tiny model's length is refused."""
    full = [1.0] * (2 * 114 + 2)
    run = make_run(tmp_path, "black-forest-labs/FLUX.1-dev", 2, {1: full})
    out = tmp_path / "c.json"
    assert cli_inproc("import-official", run, "-o", out).returncode == 0
    assert len(load_calibration(out)["values"]) == len(full)
    run2 = make_run(tmp_path / "other", "black-forest-labs/FLUX.1-dev", 1, {1: [1.0] * 13})
    error_line(cli_inproc("import-official", run2, "-o", tmp_path / "d.json"),
               "cmaes_step_0001.json", "13 values", "115", "--model-config")


# --------------------------------------------------------------------------------------------------
# User mistakes: exit 2 and one line naming the file or option
# --------------------------------------------------------------------------------------------------



def _damage_json(run: Path) -> tuple[Path, tuple[str, ...]]:
    path = next((run / "checkpoints").rglob("cmaes_step_*.json"))
    path.write_text(path.read_text()[:40])
    return run, (path.name, "not a readable")


def _model_name(run: Path, name: str) -> Path:
    config = json.loads((run / "config.json").read_text())
    config["model"]["model_name"] = name
    (run / "config.json").write_text(json.dumps(config))
    return run


def _no_config(run: Path) -> tuple[Path, tuple[str, ...]]:
    (run / "config.json").unlink()
    return run, ("no config.json", str(run / "config.json"), str(run / "checkpoints" / "step_2" / "config.json"))


def _short_vector(run: Path) -> tuple[Path, tuple[str, ...]]:
    path = run / "checkpoints" / "step_2" / "cmaes_step_0002.json"
    result = json.loads(path.read_text())
    result["solution"], result["shapes"]["total"] = result["solution"][:-3], len(result["solution"]) - 3
    path.write_text(json.dumps(result))
    return run, ("cmaes_step_0002.json", f"has {len(result['solution'])} values", f"has {len(result['solution']) + 3}")


ERROR_CASES = [
    pytest.param(lambda run, t: (t / "nowhere", ("nowhere", "no such run folder")), id="missing-folder"),
    pytest.param(lambda run, t: (_mkdir(t / "empty_run"), ("empty_run", "no checkpoints/")), id="no-checkpoints"),
    pytest.param(lambda run, t: (_mkdir(t / "r" / "checkpoints").parent, ("checkpoints", "no step_N")),
                 id="no-steps"),
    pytest.param(lambda run, t: (run / "checkpoints" / "step_2", ("step_2", "give its run folder", "--step 2")),
                 id="a-step-folder-for-the-run"),
    pytest.param(lambda run, t: (_model_name(run, "sdxl"), ("config.json", "'sdxl'", "flux_block")),
                 id="unknown-model-name"),
    pytest.param(lambda run, t: _short_vector(run), id="wrong-vector-length"),
    pytest.param(lambda run, t: _damage_json(run), id="damaged-json"),
    pytest.param(lambda run, t: _no_config(run), id="no-config"),
]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


@pytest.fixture
def sd3_run(tmp_path) -> Path:
    names = official_names("sd3", 1, build("sd3"))
    return make_run(tmp_path / "runs", MODEL_NAMES["sd3"], 1, {2: official_vector(names, 2)})


@pytest.mark.parametrize("setup", ERROR_CASES)
def test_user_mistakes_are_one_line(setup, sd3_run, tmp_path, model_configs, cli_inproc):
    run, needles = setup(sd3_run, tmp_path)
    out = tmp_path / "out.json"
    error_line(cli_inproc("import-official", run, "-o", out, "--model-config", model_configs["sd3"]), *needles)
    assert not out.exists()


def test_existing_output_is_kept_unless_overwrite(sd3_run, tmp_path, model_configs, cli_inproc):
    out = tmp_path / "out.json"
    out.write_text("keep me")
    args = ("import-official", sd3_run, "-o", out, "--model-config", model_configs["sd3"])
    error_line(cli_inproc(*args), "-o/--output", "out.json", "--overwrite")
    assert out.read_text() == "keep me"
    assert cli_inproc(*args, "--overwrite").returncode == 0
    assert load_calibration(out)["architecture"] == "sd3"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial file left


def test_a_model_config_of_another_architecture_is_refused(sd3_run, tmp_path, model_configs, cli_inproc):
    error_line(cli_inproc("import-official", sd3_run, "-o", tmp_path / "o.json",
                          "--model-config", model_configs["flux"]),
               "--model-config", "FluxTransformer2DModel", "sd3")


def test_copies_in_config_and_result_must_agree(sd3_run, cli_inproc, tmp_path, model_configs):
    config = json.loads((sd3_run / "config.json").read_text())
    config["scaleguidance"]["num_models"] = 2
    (sd3_run / "config.json").write_text(json.dumps(config))
    error_line(cli_inproc("import-official", sd3_run, "-o", tmp_path / "o.json",
                          "--model-config", model_configs["sd3"]),
               "shapes.n_models", "num_models 2")
