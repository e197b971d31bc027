"""Calibri scales on live (tiny) DiTs: exactness, per-site effect, fp32 values, in-place switching, baking.

Every check runs on the tiny offline transformers (FLUX, SD3.5-style with a dual-attention block and
a ``context_pre_only`` last block, Qwen-Image, PixArt) at each granularity. References are computed
independently of the calibration code: the untouched model, the model with a block physically
removed, and the model with a branch's output multiplied by hand through a separate forward hook.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from calibri.plugins.dit import tiny  # noqa: E402
from calibri.plugins.dit.calibration import Calibrator  # noqa: E402

GRANULARITIES = ("block", "layer", "gate")
BUILDERS = {
    "flux": tiny.tiny_flux_transformer,
    "sd3": tiny.tiny_sd3_transformer,
    "qwen": tiny.tiny_qwen_transformer,
    "pixart": tiny.tiny_pixart_transformer,
}
#: site group -> the ModuleList that holds those blocks
BLOCK_LISTS = {"double": "transformer_blocks", "single": "single_transformer_blocks", "block": "transformer_blocks"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def _inputs(model, dtype=None, **kwargs):
    inputs = tiny.dummy_transformer_inputs(model, **kwargs)
    if dtype is not None:
        inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in inputs.items()}
    return inputs


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _parse(gate_name: str) -> tuple[str, int, str | None, str | None]:
    """``double.7.img.attn`` -> ("double", 7, "img", "attn"); ``single.3`` -> ("single", 3, None, None)."""
    parts = gate_name.split(".")
    group, index, rest = parts[0], int(parts[1]), parts[2:]
    stream = rest[0] if rest else None
    branch = rest[1] if len(rest) > 1 else None
    return group, index, stream, branch


def _branch_output(arch: str, gate_name: str) -> tuple[str, int | None]:
    """The module whose output *is* the branch (before the gate multiplies it) and which output element.

    Written from the diffusers block code, independently of the adapters (which scale the gate)."""
    group, index, stream, branch = _parse(gate_name)
    base = f"{BLOCK_LISTS[group]}.{index}"
    img = stream == "img"
    if arch == "flux":
        if group == "single":
            return f"{base}.proj_out", None  # gate * proj_out(cat(attn, mlp))
        if branch == "attn":
            return f"{base}.attn", 0 if img else 1
        return (f"{base}.ff" if img else f"{base}.ff_context"), None
    if arch == "sd3":
        if branch == "attn":
            return f"{base}.attn", 0 if img else 1
        if branch == "attn2":
            return f"{base}.attn2", None
        return (f"{base}.ff" if img else f"{base}.ff_context"), None
    if arch == "qwen":
        if branch == "attn":
            return f"{base}.attn", 0 if img else 1
        return (f"{base}.img_mlp" if img else f"{base}.txt_mlp"), None
    if arch == "pixart":
        modules = {"attn": "attn1.to_out.0", "cross": "attn2.to_out.0", "mlp": "ff.net.2"}
        return f"{base}.{modules[branch]}", None
    raise AssertionError(arch)


def _times(factor: float, index: int | None):
    def hook(module, args, output):
        if index is None:
            return output * factor
        items = list(output)
        items[index] = items[index] * factor
        return tuple(items)

    return hook


def _by_hand(model, arch: str, scaled: dict[str, float], inputs) -> torch.Tensor:
    """Output of ``model`` with each named gate's branch multiplied by hand (hooks removed afterwards)."""
    handles = []
    try:
        for gate_name, factor in scaled.items():
            module_name, index = _branch_output(arch, gate_name)
            handles.append(model.get_submodule(module_name).register_forward_hook(_times(factor, index)))
        return _run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    return float((a - b).abs().max()) <= rel * scale


# --------------------------------------------------------------------------------------------------
# Site structure on the tiny models
# --------------------------------------------------------------------------------------------------


def test_tiny_flux_site_names_and_grouping():
    model = tiny.tiny_flux_transformer()
    gate = Calibrator(model, "gate")
    assert gate.site_names == [
        "double.0.img.attn", "double.0.txt.attn", "double.0.img.mlp", "double.0.txt.mlp",
        "double.1.img.attn", "double.1.txt.attn", "double.1.img.mlp", "double.1.txt.mlp",
        "single.0", "single.1",
    ]
    layer = Calibrator(model, "layer")
    assert {s.name: sorted(g.gate_name for g in s.gates) for s in layer.sites} == {
        "double.0.attn": ["double.0.img.attn", "double.0.txt.attn"],
        "double.0.mlp": ["double.0.img.mlp", "double.0.txt.mlp"],
        "double.1.attn": ["double.1.img.attn", "double.1.txt.attn"],
        "double.1.mlp": ["double.1.img.mlp", "double.1.txt.mlp"],
        "single.0": ["single.0"], "single.1": ["single.1"],
    }
    block = Calibrator(model, "block")
    assert block.site_names == ["double.0", "double.1", "single.0", "single.1"]
    assert len(block.sites[0].gates) == 4 and len(block.sites[2].gates) == 1


def test_tiny_sd3_site_names_follow_dual_attention_and_context_pre_only():
    model = tiny.tiny_sd3_transformer()
    names = Calibrator(model, "gate").site_names
    assert names[:5] == ["block.0.img.attn", "block.0.txt.attn", "block.0.img.attn2", "block.0.img.mlp",
                         "block.0.txt.mlp"]
    assert [n for n in names if ".attn2" in n] == ["block.0.img.attn2"]  # only the dual-attention block
    assert [n for n in names if n.startswith("block.3.")] == ["block.3.img.attn", "block.3.img.mlp"]  # no text
    assert len(names) == 4 * 2 + 3 * 2 + 1
    assert Calibrator(model, "layer").site_names[:3] == ["block.0.attn", "block.0.attn2", "block.0.mlp"]
    assert Calibrator(model, "block").site_names == ["block.0", "block.1", "block.2", "block.3"]


def test_tiny_qwen_and_pixart_site_names():
    assert Calibrator(tiny.tiny_qwen_transformer(), "gate").site_names[:4] == [
        "block.0.img.attn", "block.0.txt.attn", "block.0.img.mlp", "block.0.txt.mlp"]
    assert Calibrator(tiny.tiny_pixart_transformer(), "gate").site_names == [
        "block.0.img.attn", "block.0.img.cross", "block.0.img.mlp",
        "block.1.img.attn", "block.1.img.cross", "block.1.img.mlp"]


# --------------------------------------------------------------------------------------------------
# Exactness
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_all_ones_is_bit_identical(arch, granularity):
    model = BUILDERS[arch]()
    inputs = _inputs(model)
    reference = _run(model, inputs)
    calibrator = Calibrator(model, granularity).attach()
    assert torch.equal(_run(model, inputs), reference)
    calibrator.set_values({name: 0.5 for name in calibrator.site_names})
    assert not torch.equal(_run(model, inputs), reference)
    calibrator.reset()  # back to identity: bit-identical again
    assert torch.equal(_run(model, inputs), reference)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_zero_on_a_block_equals_removing_it(arch, granularity):
    model = BUILDERS[arch]()
    inputs = _inputs(model)
    calibrator = Calibrator(model, granularity).attach()
    blocks = sorted({_parse(g.gate_name)[:2] for g in calibrator.gates})
    assert len(blocks) == sum(len(getattr(model, BLOCK_LISTS[group])) for group in {b[0] for b in blocks})
    for group, index in blocks:
        members = [s.name for s in calibrator.sites if all(_parse(g.gate_name)[:2] == (group, index) for g in s.gates)]
        assert members, f"no site for {group}.{index}"
        calibrator.reset()
        calibrator.set_values({name: 0.0 for name in members})
        zeroed = _run(model, inputs)
        removed = BUILDERS[arch]()  # same seed: the same weights, never hooked
        del getattr(removed, BLOCK_LISTS[group])[index]
        expected = _run(removed, inputs)
        assert torch.equal(zeroed, expected) or _close(zeroed, expected, 1e-6), f"{group}.{index}"
        assert not torch.equal(zeroed, _run(BUILDERS[arch](), inputs))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_one_site_scales_its_branches_like_a_hand_made_multiplier(arch, granularity):
    """Site at s == the branch outputs of its gates multiplied by s by hand (a hook on the branch module)."""
    model = BUILDERS[arch]()
    by_hand = BUILDERS[arch]()
    inputs = _inputs(model)
    calibrator = Calibrator(model, granularity).attach()
    for s in (0.37, 1.6):
        for site in calibrator.sites:
            calibrator.reset()
            calibrator.set_values({site.name: s})
            got = _run(model, inputs)
            expected = _by_hand(by_hand, arch, {g.gate_name: s for g in site.gates}, inputs)
            assert _close(got, expected), f"{site.name} at {s}: {float((got - expected).abs().max())}"
    # several sites at once compose like several hand multipliers
    values = {name: 0.5 + 0.1 * i for i, name in enumerate(calibrator.site_names)}
    calibrator.set_values(values)
    scaled = {g.gate_name: values[site.name] for site in calibrator.sites for g in site.gates}
    assert _close(_run(model, inputs), _by_hand(by_hand, arch, scaled, inputs))


def _probe(arch: str, gate_name: str) -> tuple[str, str]:
    """Where the residual stream right after a branch's addition can be read: (module under the block, kind).

    ``pre`` reads that module's input; ``("", "post")`` reads the block's output (for a block's last branch)."""
    group, index, stream, branch = _parse(gate_name)
    img = stream == "img"
    if branch in ("mlp", None):
        return "", "post"
    if arch == "flux":
        return ("norm2" if img else "norm2_context"), "pre"
    if arch == "sd3":  # attn2 reads the block input's norm, so norm2's input is linear in both image attentions
        return ("norm2" if img else "norm2_context"), "pre"
    if arch == "qwen":
        return ("img_norm2" if img else "txt_norm2"), "pre"
    if arch == "pixart":  # attn1 -> the cross-attention's input; cross -> norm2's input
        return ("attn2" if branch == "attn" else "norm2"), "pre"
    raise AssertionError(arch)


def _residual_after(model, arch, gate_name, inputs) -> list[torch.Tensor]:
    group, index, _, _ = _parse(gate_name)
    block = model.get_submodule(f"{BLOCK_LISTS[group]}.{index}")
    where, kind = _probe(arch, gate_name)
    seen: list[torch.Tensor] = []

    def pre(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    def post(module, args, output):
        seen.extend(t.clone() for t in (output if isinstance(output, tuple) else (output,)) if t is not None)

    module = block.get_submodule(where) if where else block
    handle = (module.register_forward_pre_hook(pre, with_kwargs=True) if kind == "pre"
              else module.register_forward_hook(post))
    try:
        _run(model, inputs)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_residual_stream_after_a_branch_is_linear_in_its_scale(arch):
    """x_after(s) = x_after(1) + (s - 1) * contribution, read on the residual stream right after the branch."""
    model = BUILDERS[arch]()
    inputs = _inputs(model)
    calibrator = Calibrator(model, "gate").attach()
    for name in calibrator.site_names:
        calibrator.reset()
        base = _residual_after(model, arch, name, inputs)
        calibrator.set_values({name: 0.0})
        contribution = [b - z for b, z in zip(base, _residual_after(model, arch, name, inputs))]
        assert max(float(c.abs().max()) for c in contribution) > 1e-4, f"{name}: branch adds nothing"
        for s in (0.5, 1.75, -0.6):
            calibrator.set_values({name: s})
            after = _residual_after(model, arch, name, inputs)
            for b, c, a in zip(base, contribution, after):
                expected = b + (s - 1.0) * c
                assert _close(a, expected, 2e-5), f"{name} at {s}: {float((a - expected).abs().max())}"



@pytest.mark.parametrize(("arch", "granularity"), [
    (arch, granularity)
    for arch in sorted(BUILDERS) for granularity in GRANULARITIES
])
def test_every_site_acts(arch, granularity):
    """No dead dimension: each site alone at 0.5 changes the output."""
    model = BUILDERS[arch]()
    inputs = _inputs(model)
    reference = _run(model, inputs)
    calibrator = Calibrator(model, granularity).attach()
    dead = []
    for name in calibrator.site_names:
        calibrator.reset()
        calibrator.set_values({name: 0.5})
        if float((_run(model, inputs) - reference).abs().max()) <= 1e-6 * float(reference.abs().max()):
            dead.append(name)
    assert dead == []


def test_qwen_mlp_sites_act():
    """The MLP gates of Qwen-Image are slices of a plain-tensor modulation output; scaling them must act."""
    model = tiny.tiny_qwen_transformer(num_layers=3)
    inputs = _inputs(model)
    reference = _run(model, inputs)
    calibrator = Calibrator(model, "gate").attach()
    mlp = [n for n in calibrator.site_names if n.endswith(".mlp") and not n.startswith("block.2.txt")]
    assert len(mlp) == 5
    for name in mlp:
        calibrator.reset()
        calibrator.set_values({name: 0.0})
        assert float((_run(model, inputs) - reference).abs().max()) > 1e-4, name


# --------------------------------------------------------------------------------------------------
# Values: fp32 table, in-place switching
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_bf16_identity_is_exact_and_values_stay_fp32(arch, granularity):
    model = BUILDERS[arch]().to(torch.bfloat16)
    inputs = _inputs(model, torch.bfloat16)
    reference = _run(model, inputs)
    assert reference.dtype == torch.bfloat16
    calibrator = Calibrator(model, granularity).attach()
    assert torch.equal(_run(model, inputs), reference)
    assert calibrator.state.table.dtype == torch.float32
    first, last = calibrator.site_names[0], calibrator.site_names[-1]
    step = float(np.float32(1.0 + 1e-3))
    assert float(torch.tensor(1.0 + 1e-3, dtype=torch.bfloat16)) == 1.0  # bf16 would round the step away
    calibrator.set_values({first: 1.0 + 1e-3, last: 1.0 - 1e-4, "omega": 1.0 + 1e-3})
    values = calibrator.values()
    assert values[first] == step
    assert values[last] == float(np.float32(1.0 - 1e-4)) != 1.0
    assert values["omega"] == pytest.approx(1.0 + 1e-3, abs=1e-7)
    calibrator.reset()
    assert torch.equal(_run(model, inputs), reference)
    calibrator.detach()
    assert torch.equal(_run(model, inputs), reference)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_switching_candidates_registers_nothing_and_allocates_nothing(arch):
    model = BUILDERS[arch]()
    inputs = _inputs(model)
    hooks_before = _hook_count(model)
    calibrator = Calibrator(model, "gate").attach()
    hooks_attached = _hook_count(model)
    assert hooks_attached > hooks_before
    registry_hooks = list(model._diffusers_hook.hooks)
    params = [(n, p.data_ptr(), p.shape) for n, p in model.named_parameters()]
    buffers = [(n, b.data_ptr()) for n, b in model.named_buffers()]
    table = calibrator.state.table
    table_ptr = table.data_ptr()
    rng = np.random.default_rng(0)
    outputs = []
    for _ in range(40):
        vector = rng.uniform(0.0, 2.0, calibrator.count(with_omega=False))
        calibrator.set_values(vector)
        outputs.append(_run(model, inputs))
    assert _hook_count(model) == hooks_attached
    assert list(model._diffusers_hook.hooks) == registry_hooks
    assert [(n, p.data_ptr(), p.shape) for n, p in model.named_parameters()] == params
    assert [(n, b.data_ptr()) for n, b in model.named_buffers()] == buffers
    assert calibrator.state.table is table and table.data_ptr() == table_ptr
    assert not torch.equal(outputs[0], outputs[1])
    # the last candidate's output equals a fresh calibration set straight to those values
    fresh_model = BUILDERS[arch]()
    fresh = Calibrator(fresh_model, "gate").attach()
    fresh.set_values(calibrator.values())
    assert torch.equal(_run(fresh_model, inputs), outputs[-1])
    calibrator.detach()
    assert _hook_count(model) == hooks_before


def test_values_round_trip_and_vector_forms():
    model = tiny.tiny_flux_transformer()
    calibrator = Calibrator(model, "layer").attach()
    assert calibrator.values() == {**{n: 1.0 for n in calibrator.site_names}, "omega": 1.0}
    vector = [0.25 * (i + 1) for i in range(calibrator.count(with_omega=False))]
    calibrator.set_values(vector)  # without ω: ω kept
    assert list(calibrator.values().values()) == [*vector, 1.0]
    calibrator.set_values([*vector, 1.5])
    assert calibrator.values()["omega"] == 1.5
    before = calibrator.values()
    calibrator.set_values(before)
    assert calibrator.values() == before
    with pytest.raises(KeyError, match="not parameters"):
        calibrator.set_values({"double.9.attn": 1.0})
    with pytest.raises(ValueError, match="expected"):
        calibrator.set_values([1.0, 2.0])


def test_reattaching_starts_again_at_identity():
    model = tiny.tiny_flux_transformer()
    inputs = _inputs(model)
    reference = _run(model, inputs)
    calibrator = Calibrator(model, "gate").attach()
    calibrator.set_values({"omega": 2.0, "single.0": 0.5})
    calibrator.detach()
    assert torch.equal(_run(model, inputs), reference)
    calibrator.attach()
    assert calibrator.values() == {**{n: 1.0 for n in calibrator.site_names}, "omega": 1.0}
    assert torch.equal(_run(model, inputs), reference)


def test_a_second_calibration_on_one_model_is_refused_without_leaving_hooks():
    model = tiny.tiny_flux_transformer()
    inputs = _inputs(model)
    reference = _run(model, inputs)
    first = Calibrator(model, "gate").attach()
    hooks = _hook_count(model)
    with pytest.raises((RuntimeError, ValueError)):
        Calibrator(model, "block").attach()
    assert _hook_count(model) == hooks
    first.detach()
    assert _hook_count(model) == 0
    assert torch.equal(_run(model, inputs), reference)


# --------------------------------------------------------------------------------------------------
# Baking
# --------------------------------------------------------------------------------------------------


def _candidate(calibrator, seed=1) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    values = {name: float(v) for name, v in zip(calibrator.site_names, rng.uniform(0.3, 1.7, len(calibrator.sites)))}
    values["omega"] = 1.3
    return values


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_bake_matches_hooks_and_unbake_detach_restore_exactly(arch, granularity):
    model = BUILDERS[arch]()
    inputs = _inputs(model)
    reference = _run(model, inputs)
    originals = {n: p.detach().clone() for n, p in model.state_dict().items()}
    calibrator = Calibrator(model, granularity).attach()
    calibrator.set_values(_candidate(calibrator))
    hooked = _run(model, inputs)
    assert not _close(hooked, reference, 1e-3)

    calibrator.bake()
    assert calibrator.baked
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, originals[n])]
    assert changed and all(n.endswith((".weight", ".bias")) for n in changed)
    assert _close(_run(model, inputs), hooked, 1e-5)
    with pytest.raises(RuntimeError, match="unbake"):
        calibrator.set_values({calibrator.site_names[0]: 0.5})

    calibrator.unbake()
    assert not calibrator.baked
    assert all(torch.equal(p, originals[n]) for n, p in model.state_dict().items())
    assert torch.equal(_run(model, inputs), hooked)  # the hooks are live again

    calibrator.bake()
    calibrator.detach()  # unbakes and removes every hook
    assert all(torch.equal(p, originals[n]) for n, p in model.state_dict().items())
    assert _hook_count(model) == 0
    assert torch.equal(_run(model, inputs), reference)


def test_bake_at_identity_changes_no_weight_and_ensembles_refuse_to_bake():
    model = tiny.tiny_sd3_transformer()
    originals = {n: p.detach().clone() for n, p in model.state_dict().items()}
    calibrator = Calibrator(model, "gate").attach()
    calibrator.bake()
    assert all(torch.equal(p, originals[n]) for n, p in model.state_dict().items())
    calibrator.detach()
    ensemble = Calibrator(tiny.tiny_flux_transformer(), "gate", copies=2).attach()
    with pytest.raises(RuntimeError, match="ensemble"):
        ensemble.bake()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_baked_weights_saved_and_reloaded_give_a_plain_model(arch, tmp_path):
    model = BUILDERS[arch]()
    inputs = _inputs(model)
    calibrator = Calibrator(model, "gate").attach()
    calibrator.set_values(_candidate(calibrator, seed=2))
    hooked = _run(model, inputs)
    calibrator.bake()
    baked = _run(model, inputs)
    with pytest.raises(RuntimeError):
        Calibrator(BUILDERS[arch](), "gate").attach().detach_hooks_keep_weights()  # nothing baked
    calibrator.detach_hooks_keep_weights()
    assert _hook_count(model) == 0 and not calibrator.baked
    assert torch.equal(_run(model, inputs), baked)  # weights kept, hooks gone
    model.save_pretrained(tmp_path / "baked")
    cls = type(model)
    loaded = cls.from_pretrained(tmp_path / "baked").eval()
    assert type(loaded) is cls
    assert _hook_count(loaded) == 0 and not hasattr(loaded, "_diffusers_hook")
    out = _run(loaded, inputs)
    assert torch.equal(out, baked) or _close(out, baked, 1e-6)
    assert _close(out, hooked, 1e-5)
    assert not _close(out, _run(BUILDERS[arch](), inputs), 1e-3)


# --------------------------------------------------------------------------------------------------
# Site counts of the shipped real configs (``calibri sites``, built on the meta device)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sites_cli():
    """``calibri sites ... --json`` in this process, with no third-party plugins loaded."""
    import json

    from click.testing import CliRunner

    from calibri.core import plugins
    from calibri.core.cli import build_cli

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CALIBRI_PLUGINS", "")
        plugins.reset_registry()
        cli = build_cli()

        def run(*args: str) -> dict:
            result = CliRunner().invoke(cli, ["sites", *args, "--json"])
            assert result.exit_code == 0, result.output
            return json.loads(result.stdout)

        yield run
        plugins.reset_registry()


@pytest.mark.parametrize(("model", "granularity", "count"), [
    ("flux.1-dev", "block", 57),
    ("flux.1-dev", "layer", 76),
    ("flux.1-dev", "gate", 114),
    ("flux.1-schnell", "gate", 114),
    ("sd3.5-medium", "block", 24),
    ("sd3.5-medium", "layer", 24 + 13 + 24),
    ("sd3.5-medium", "gate", 107),
    ("sd3.5-large", "block", 38),
    ("sd3.5-large", "layer", 76),
    ("sd3.5-large", "gate", 150),
    ("qwen-image", "gate", 238),
    ("qwen-image", "layer", 120),
    ("qwen-image", "block", 60),
])
def test_site_counts_of_shipped_configs(sites_cli, model, granularity, count):
    summary = sites_cli("--model-config", model, "--granularity", granularity)
    assert summary["granularity"] == granularity and summary["copies"] == 1
    assert summary["sites_per_copy"] == count == len(summary["sites"])
    assert summary["parameters_without_omega"] == count
    assert summary["parameters_with_omega"] == count + 1
    names = [site["name"] for site in summary["sites"]]
    assert len(set(names)) == count
    gates = [g for site in summary["sites"] for g in site["gates"]]
    assert len(gates) == len(set(gates))  # every gate in exactly one site


@pytest.mark.parametrize(("model", "per_copy"), [("sd3.5-medium", 107), ("sd3.5-large", 150)])
def test_sd3_5_cfg_ensemble_counts(sites_cli, model, per_copy):
    summary = sites_cli("--model-config", model, "--granularity", "gate", "--copies", "2", "--form", "cfg",
                        "--guidance-scale", "7")
    assert summary["architecture"] == "sd3" and summary["form"] == "cfg" and summary["copies"] == 2
    assert summary["sites_per_copy"] == per_copy
    assert summary["parameters_without_omega"] == 2 * per_copy  # 214 for SD3.5-Medium
    assert summary["parameters_with_omega"] == 2 * per_copy + 2  # 216: the paper's count


def test_sd3_5_medium_two_copies_default_to_the_cfg_form(sites_cli):
    summary = sites_cli("--model-config", "sd3.5-medium", "--copies", "2")
    assert summary["form"] == "cfg" and summary["parameters_with_omega"] == 216


def test_site_names_are_stable_and_readable(sites_cli):
    flux = [s["name"] for s in sites_cli("--model-config", "flux.1-dev", "--granularity", "gate")["sites"]]
    assert flux[:4] == ["double.0.img.attn", "double.0.txt.attn", "double.0.img.mlp", "double.0.txt.mlp"]
    assert flux[4 * 7:4 * 7 + 4] == ["double.7.img.attn", "double.7.txt.attn", "double.7.img.mlp", "double.7.txt.mlp"]
    assert flux[76:] == [f"single.{i}" for i in range(38)]
    layer = sites_cli("--model-config", "flux.1-dev", "--granularity", "layer")["sites"]
    assert layer[0] == {"name": "double.0.attn", "group": "double.attn",
                        "gates": ["double.0.img.attn", "double.0.txt.attn"]}
    assert [s["name"] for s in sites_cli("--model-config", "flux.1-dev", "--granularity", "block")["sites"]][18:20] == [
        "double.18", "single.0"]

    sd3 = [s["name"] for s in sites_cli("--model-config", "sd3.5-medium")["sites"]]
    assert sd3[:5] == ["block.0.img.attn", "block.0.txt.attn", "block.0.img.attn2", "block.0.img.mlp",
                       "block.0.txt.mlp"]
    assert [n for n in sd3 if n.endswith("attn2")] == [f"block.{i}.img.attn2" for i in range(13)]
    assert [n for n in sd3 if n.startswith("block.23.")] == ["block.23.img.attn", "block.23.img.mlp"]
    qwen = [s["name"] for s in sites_cli("--model-config", "qwen-image")["sites"]]
    assert qwen[-4:] == ["block.58.img.mlp", "block.58.txt.mlp", "block.59.img.attn", "block.59.img.mlp"]
    # the same call twice lists the same names in the same order
    assert [s["name"] for s in sites_cli("--model-config", "sd3.5-medium")["sites"]] == sd3
