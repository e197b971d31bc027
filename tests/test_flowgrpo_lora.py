"""Flow-GRPO LoRA checkpoints: merged exactly as PEFT applies them, refused in one line when they
cannot apply in full, and recorded in the calibration made on top of them."""
from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from calibri.core.errors import ConfigError  # noqa: E402
from calibri.plugins.dit.tiny import dummy_transformer_inputs, tiny_flux_transformer, tiny_sd3_transformer  # noqa: E402
from calibri.plugins.flow_grpo.lora import (  # noqa: E402
    check_lora, file_sha256, load_flowgrpo_lora, merged_lora, read_lora,
)

FIELD = "objective.options.lora"
#: Flow-GRPO's LoRA targets (suffix match): SD3; FLUX adds the feed-forward projections.
SD3_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
FLUX_TARGETS = SD3_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
BUILDERS = {"sd3": (tiny_sd3_transformer, SD3_TARGETS), "flux": (tiny_flux_transformer, FLUX_TARGETS)}
#: Merged vs PEFT's unmerged forward in float32: W + s·BA against Wx + s·B(Ax), same numbers.
MERGE_TOLERANCE = 1e-6


def write_lora(transformer: torch.nn.Module, root: Path, targets=SD3_TARGETS, rank: int = 4, alpha: int = 8,
               seed: int = 0) -> Path:
    """A LoRA saved as Flow-GRPO saves it (``root/checkpoint-3/lora/``), with random lora_B (PEFT
    starts it at zero) so that it changes the model; alpha/r ≠ 1, so a wrong scaling shows."""
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    model = peft.get_peft_model(copy.deepcopy(transformer), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    folder = root / "checkpoint-3" / "lora"
    model.save_pretrained(folder)
    return folder


def forward(model: torch.nn.Module) -> torch.Tensor:
    """One forward on fixed inputs (a PeftModel is run on the inputs of the model it wraps)."""
    inner = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    with torch.no_grad():
        return model(**dummy_transformer_inputs(inner, grid=(4, 4)))[0]


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_the_merge_equals_peft_model_from_pretrained(arch, tmp_path, one_torch_thread):
    build, targets = BUILDERS[arch]
    base = build()
    folder = write_lora(base, tmp_path, targets)
    reference = forward(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)))
    before = forward(base)
    assert (reference - before).abs().max() > 1e-3  # the LoRA changes the model: the comparison means something
    for given in (folder, folder.parent):  # the lora/ folder, or the checkpoint-N/ above it
        merged = load_flowgrpo_lora(copy.deepcopy(base), given, FIELD)
        assert (forward(merged) - reference).abs().max() <= MERGE_TOLERANCE
        assert not any("lora" in name for name, _ in merged.named_parameters())  # merged, nothing left over
        record = merged_lora(merged)
        assert record["path"] == str(folder.resolve())
        assert record["sha256"] == file_sha256(folder / "adapter_model.safetensors")
        assert (record["rank"], record["alpha"]) == (4, 8.0)
    with pytest.raises(ConfigError, match="already has a LoRA merged"):
        load_flowgrpo_lora(merged, folder, FIELD)


def test_a_prefix_stripped_load_without_alpha_is_caught(tmp_path, one_torch_thread):
    """Stripping ``base_model.model.`` and adding B·A without alpha/r (what a loader that ignores
    the adapter config does) applies the LoRA at half strength here (r 4, alpha 8): the tolerance
    of the test above is far below the difference it makes."""
    from safetensors.torch import load_file

    base = tiny_sd3_transformer()
    folder = write_lora(base, tmp_path)
    reference = forward(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)))
    weights = load_file(folder / "adapter_model.safetensors")
    results = {}
    for scaling in (1.0, 8 / 4):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for key, a in weights.items():
                if key.endswith(".lora_A.weight"):
                    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    b = weights[key.replace("lora_A", "lora_B")]
                    model.get_submodule(module).weight += scaling * (b @ a)
        results[scaling] = (forward(model) - reference).abs().max().item()
    assert results[2.0] <= MERGE_TOLERANCE
    assert results[1.0] > 100 * MERGE_TOLERANCE


def _rewrite_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _strip_prefix(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    save_file({k.removeprefix("base_model.model."): v for k, v in load_file(path).items()}, path)


def _poison(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    weights = load_file(path)
    key = next(k for k in sorted(weights) if "lora_B" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, path)


def _truncate(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


BROKEN = {
    "no folder": (lambda folder: folder.parent.rename(folder.parent.with_name("checkpoint-4")), "no such folder"),
    "no config": (lambda folder: (folder / "adapter_config.json").unlink(), "adapter_config.json: missing"),
    "no weights": (lambda folder: (folder / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: missing"),
    "truncated": (_truncate, "truncated"),
    "nan": (_poison, "cannot merge"),
    "diffusers keys": (_strip_prefix, "lacks the 'base_model.model.' prefix"),
    "untargeted": (lambda folder: _rewrite_config(folder, target_modules=["attn.to_q"]), "target_modules miss"),
    "not a lora": (lambda folder: _rewrite_config(folder, peft_type="IA3"), "only LoRA adapters"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoints_are_one_line_errors_naming_the_option_and_file(case, tmp_path):
    base = tiny_sd3_transformer()
    folder = write_lora(base, tmp_path)
    damage, message = BROKEN[case]
    damage(folder)
    model = copy.deepcopy(base)
    with pytest.raises(ConfigError) as caught:
        load_flowgrpo_lora(model, folder, FIELD)
    text = str(caught.value)
    assert caught.value.field == FIELD and message in text and "\n" not in text
    assert str(folder) in text  # the folder, or the file in it
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), base.state_dict().values()))


@pytest.mark.parametrize("made_for, message", [("flux", "match no module of this SD3Transformer2DModel"),
                                               ("wider", "do not fit")])
def test_a_lora_for_another_model_is_an_error_never_a_silent_no_op(made_for, message, tmp_path):
    """A FLUX LoRA on SD3 matches no module; one from a wider SD3 does not fit. PEFT alone would
    load the first as nothing (its targets match SD3's names) — here it is an error."""
    other = tiny_flux_transformer() if made_for == "flux" else tiny_sd3_transformer(attention_head_dim=16)
    folder = write_lora(other, tmp_path, FLUX_TARGETS if made_for == "flux" else SD3_TARGETS)
    base = tiny_sd3_transformer()
    model = copy.deepcopy(base)
    with pytest.raises(ConfigError, match=message) as caught:
        load_flowgrpo_lora(model, folder, FIELD)
    assert "adapter_model.safetensors" in str(caught.value) and "\n" not in str(caught.value)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), base.state_dict().values()))
    assert merged_lora(model) is None
    with pytest.raises(ConfigError, match=message):  # the cheap check, on the meta device, finds it too
        with torch.device("meta"):
            meta = type(base).from_config(base.config)
        check_lora(folder, FIELD, meta)


def test_without_peft_the_error_says_what_to_install(tmp_path, monkeypatch):
    folder = write_lora(tiny_sd3_transformer(), tmp_path)
    assert read_lora(folder, FIELD).rank == 4  # reading the files needs no peft
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ConfigError, match=r"needs peft: pip install 'calibri\[flowgrpo\]'"):
        check_lora(folder, FIELD)


@pytest.fixture(scope="module")
def toy_lora(tmp_path_factory) -> Path:
    """A LoRA for the shipped toy model (an SD3Transformer2DModel) on Flow-GRPO's SD3 targets."""
    from calibri.plugins.dit.models import load_pipeline

    return write_lora(load_pipeline("toy").transformer, tmp_path_factory.mktemp("toy-lora"))


def _toy_run_args(tmp_path: Path, lora: Path | str) -> tuple[Path, list[str]]:
    from importlib import resources

    rows = resources.files("calibri.plugins.toy").joinpath("data/validation.jsonl").read_text().splitlines()
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text("\n".join(rows[:2]) + "\n")
    config = Path(__file__).resolve().parent.parent / "examples" / "toy.yaml"
    return config, ["budget.rounds=1", "optimizer.popsize=2", "objective.options.bucket_size=2",
                    "objective.options.copies=1", "objective.options.form=null", "objective.options.time_buckets=1",
                    f"objective.options.validation_prompts={held_out}", "validation.every=1",
                    "callbacks=[{name: calibration_report, options: {nfe: [4], grid_prompts: 1}}]",
                    f"objective.options.lora={lora}"]


@pytest.fixture(scope="module")
def lora_run(toy_lora, tmp_path_factory) -> Path:
    """A one-round calibration of the shipped toy model on top of ``toy_lora``, given as its checkpoint-N/."""
    from calibri.core.config import load_config
    from calibri.core.run import start_run

    root = tmp_path_factory.mktemp("lora-run")
    config, overrides = _toy_run_args(root, toy_lora.parent)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start_run(load_config(config, overrides), root / "run", quiet=True)
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def test_a_calibri_run_calibrates_on_top_of_the_lora_and_records_it(lora_run, toy_lora):
    from calibri.plugins.dit.calibration_file import apply_calibration, load_calibration
    from calibri.plugins.dit.models import load_pipeline

    assert len((lora_run / "trials.jsonl").read_text().splitlines()) == 2
    document = load_calibration(lora_run / "calibration.json")
    assert document["calibrated_for"]["lora"] == {"path": str(toy_lora.resolve()), "rank": 4, "alpha": 8.0,
                                                  "sha256": file_sha256(toy_lora / "adapter_model.safetensors")}
    assert f"on the LoRA {toy_lora.resolve()}" in (lora_run / "report.md").read_text()
    plain = load_pipeline("toy")
    with pytest.warns(RuntimeWarning, match="does not have merged"):
        apply_calibration(plain, lora_run / "calibration.json").detach()
    adapted = load_pipeline("toy")
    adapted.transformer = load_flowgrpo_lora(adapted.transformer, toy_lora, FIELD)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*LoRA.*")
        apply_calibration(adapted, lora_run / "calibration.json").detach()


def test_the_objective_merges_the_lora_before_its_hooks(toy_lora):
    """The calibration is made on the adapted model: the objective's transformer carries the
    merged weights (PEFT's merge, exactly) and the hooks sit on that very transformer."""
    from calibri.plugins.dit.models import load_pipeline
    from calibri.plugins.dit.objective import CalibriObjective, CalibriOptions

    objective = CalibriObjective(CalibriOptions(model="toy", lora=str(toy_lora), steps=1))
    try:
        expected = peft.PeftModel.from_pretrained(load_pipeline("toy").transformer, str(toy_lora)).merge_and_unload()
        name = "transformer_blocks.0.attn.to_q.weight"
        assert torch.equal(objective.pipe.transformer.state_dict()[name], expected.state_dict()[name])
        assert objective.calibrator.transformer is objective.pipe.transformer
        assert objective.calibrated_for()["lora"]["path"] == str(toy_lora.resolve())
    finally:
        objective.close()


def test_evaluating_the_calibration_file_merges_its_lora(lora_run, toy_lora, tmp_path):
    """``calibri evaluate CALIBRATION`` rebuilds the model the file was made on, LoRA included,
    and refuses a file whose LoRA's weights changed since."""
    from calibri.core.errors import UserError
    from calibri.plugins.dit.commands import _evaluation_target
    from calibri.plugins.dit.models import load_pipeline

    objective, _, _, settings = _evaluation_target(lora_run / "calibration.json", None, None, None, None, None)
    try:
        assert merged_lora(objective.pipe.transformer)["sha256"] == settings["lora"]["sha256"]
    finally:
        objective.close()
    changed = write_lora(load_pipeline("toy").transformer, tmp_path / "changed", seed=5)  # same shapes, other values
    document = json.loads((lora_run / "calibration.json").read_text())
    document["calibrated_for"]["lora"]["path"] = str(changed)
    (tmp_path / "changed.json").write_text(json.dumps(document))
    with pytest.raises(UserError, match="other LoRA weights merged"):
        _evaluation_target(tmp_path / "changed.json", None, None, None, None, None)


def test_a_bad_lora_option_is_refused_before_the_run_starts(tmp_path):
    from calibri.core.config import load_config
    from calibri.core.run import start_run

    config, overrides = _toy_run_args(tmp_path, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"objective\.options\.lora: .*nowhere: no such folder"):
        start_run(load_config(config, overrides), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    flux = write_lora(tiny_flux_transformer(), tmp_path / "flux", FLUX_TARGETS)
    config, overrides = _toy_run_args(tmp_path, flux)
    with pytest.raises(ConfigError, match=r"objective\.options\.lora: .*match no module"):
        start_run(load_config(config, overrides), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
