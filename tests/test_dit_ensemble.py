"""The output weight ω and the Calibri Ensemble on tiny DiTs and their stock diffusers pipelines.

* cfg form (SD3: CFG batched in one call; Qwen-Image: separate calls under ``cache_context``):
  ω = (g, 1 − g) reproduces the stock pipeline's classifier-free guidance bit for bit;
* distilled form (FLUX): ω = (1, 0) is the plain model, and the ensemble's velocity is Σ ω_m v^{s_m};
* N = 1: ω multiplies the transformer output;
* parameter names, counts and the search space, with and without ω;
* nothing in diffusers is patched process-wide.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from calibri.plugins.dit import tiny  # noqa: E402
from calibri.plugins.dit.calibration import OMEGA_BOUNDS, SCALE_BOUNDS, Calibrator  # noqa: E402

G = 4.0  # guidance scale of the cfg tests


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny.tiny_sd3_pipeline(0)


@pytest.fixture(scope="module")
def qwen_pipe():
    return tiny.tiny_qwen_pipeline(0)


@pytest.fixture(scope="module")
def flux_pipe():
    return tiny.tiny_flux_pipeline(0)


def _generate(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, **kwargs}
    return pipe(prompt="a red circle on a blue square", generator=torch.Generator().manual_seed(seed),
                output_type="np", **kwargs).images


def _sd3(pipe, seed=0):
    return _generate(pipe, seed, guidance_scale=G)


def _qwen(pipe, seed=0):
    return _generate(pipe, seed, true_cfg_scale=G, negative_prompt="blurry")


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _close(a, b, rel=1e-5) -> bool:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    return float((a - b).abs().max()) <= rel * scale


def _scales(calibrator, copy: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    prefix = "" if calibrator.copies == 1 else f"c{copy}."
    return {prefix + n: float(v) for n, v in zip(calibrator.site_names, rng.uniform(0.4, 1.6, len(calibrator.sites)))}


def _unprefixed(values: dict[str, float]) -> dict[str, float]:
    return {k.split(".", 1)[1]: v for k, v in values.items()}


# --------------------------------------------------------------------------------------------------
# cfg form: stock CFG reproduced exactly
# --------------------------------------------------------------------------------------------------


def test_sd3_cfg_ensemble_at_init_reproduces_stock_cfg_exactly(sd3_pipe):
    stock = _sd3(sd3_pipe)
    calibrator = Calibrator(sd3_pipe.transformer, "gate", copies=2, form="cfg", guidance_scale=G).attach()
    try:
        assert calibrator.omega == [G, 1.0 - G]
        assert np.array_equal(_sd3(sd3_pipe), stock)

        calibrator.set_values({"omega.0": G + 0.5})
        changed_omega = _sd3(sd3_pipe)
        assert not np.allclose(changed_omega, stock, atol=1e-3)

        calibrator.reset()
        calibrator.set_values({"c1.block.0.img.attn": 0.5})  # the unconditional copy only
        changed_uncond = _sd3(sd3_pipe)
        assert not np.allclose(changed_uncond, stock, atol=1e-3)
        calibrator.reset()
        calibrator.set_values({"c0.block.0.img.attn": 0.5})
        changed_cond = _sd3(sd3_pipe)
        assert not np.allclose(changed_cond, changed_uncond, atol=1e-3)

        calibrator.reset()
        assert np.array_equal(_sd3(sd3_pipe), stock)
    finally:
        calibrator.detach()
    assert np.array_equal(_sd3(sd3_pipe), stock)


def test_qwen_cfg_ensemble_at_init_reproduces_stock_cfg_exactly(qwen_pipe):
    stock = _qwen(qwen_pipe)
    assert not np.array_equal(stock, _generate(qwen_pipe, true_cfg_scale=1.0))  # CFG is on
    calibrator = Calibrator(qwen_pipe.transformer, "gate", copies=2, form="cfg", guidance_scale=G).attach()
    try:
        assert np.array_equal(_qwen(qwen_pipe), stock)

        calibrator.set_values({"omega.0": G + 0.5})
        assert not np.allclose(_qwen(qwen_pipe), stock, atol=1e-3)

        calibrator.reset()
        calibrator.set_values({"c1.block.0.img.attn": 0.5})
        assert not np.allclose(_qwen(qwen_pipe), stock, atol=1e-3)

        calibrator.reset()
        assert np.array_equal(_qwen(qwen_pipe), stock)
    finally:
        calibrator.detach()
    assert np.array_equal(_qwen(qwen_pipe), stock)


def test_sd3_batched_cfg_velocity_is_the_weighted_sum_of_the_copies():
    """Transformer level, batch [uncond; cond]: the pipeline's u + g (c − u) on the ensemble's output
    equals ω0 v^{s0}(cond) + ω1 v^{s1}(uncond) computed with two single-copy calibrations."""
    model = tiny.tiny_sd3_transformer()
    cond = tiny.dummy_transformer_inputs(model, seed=1)
    uncond = tiny.dummy_transformer_inputs(model, seed=2)
    uncond["hidden_states"] = cond["hidden_states"]
    batch = {k: torch.cat([uncond[k], cond[k]]) if isinstance(cond[k], torch.Tensor) else cond[k] for k in cond}
    calibrator = Calibrator(model, "gate", copies=2, form="cfg", guidance_scale=G).attach()
    c0, c1 = _scales(calibrator, 0, 3), _scales(calibrator, 1, 4)
    omega = (3.1, -1.7)
    calibrator.set_values({**c0, **c1, "omega.0": omega[0], "omega.1": omega[1]})
    out = _run(model, batch)
    guided = out[:1] + G * (out[1:] - out[:1])
    calibrator.detach()

    single = Calibrator(model, "gate").attach()
    single.set_values(_unprefixed(c0))
    v_cond = _run(model, cond)
    single.set_values(_unprefixed(c1))
    v_uncond = _run(model, uncond)
    single.detach()
    assert _close(guided, omega[0] * v_cond + omega[1] * v_uncond, 1e-5)
    assert not _close(v_cond, v_uncond, 1e-3)


def test_qwen_cfg_calls_pick_their_copy_from_the_cache_context():
    """Qwen-Image: the "cond" call runs copy 0, the "uncond" call copy 1 (at ω = (g, 1 − g) their outputs are
    those copies' velocities; another ω only rescales each call's output); a call without a context is
    refused, as the pipeline does not batch CFG."""
    model = tiny.tiny_qwen_transformer()
    inputs = tiny.dummy_transformer_inputs(model)
    calibrator = Calibrator(model, "gate", copies=2, form="cfg", guidance_scale=G).attach()
    c0, c1 = _scales(calibrator, 0, 5), _scales(calibrator, 1, 6)
    calibrator.set_values({**c0, **c1})
    outputs = {}
    for omega in ((G, 1.0 - G), (2.5, -1.0)):
        calibrator.set_values({"omega.0": omega[0], "omega.1": omega[1]})
        for name in ("cond", "uncond"):
            with model.cache_context(name):
                outputs[omega, name] = _run(model, inputs)
    with pytest.raises(RuntimeError, match="cache_context"):
        _run(model, inputs)
    calibrator.detach()

    single = Calibrator(model, "gate").attach()
    single.set_values(_unprefixed(c0))
    v0 = _run(model, inputs)
    single.set_values(_unprefixed(c1))
    v1 = _run(model, inputs)
    single.detach()
    assert not _close(v0, v1, 1e-3)
    assert _close(outputs[(G, 1.0 - G), "cond"], v0, 1e-6)
    assert _close(outputs[(G, 1.0 - G), "uncond"], v1, 1e-6)
    for name, v in (("cond", v0), ("uncond", v1)):
        out = outputs[(2.5, -1.0), name]
        factor = float((out * v).sum() / (v * v).sum())
        assert factor != 0.0 and _close(out, factor * v, 1e-5)


def test_qwen_cfg_only_the_ratio_of_omega_matters(qwen_pipe):
    calibrator = Calibrator(qwen_pipe.transformer, "gate", copies=2, form="cfg", guidance_scale=G).attach()
    try:
        calibrator.set_values({"omega.0": 5.0, "omega.1": -3.0})
        base = _qwen(qwen_pipe)
        calibrator.set_values({"omega.0": 10.0, "omega.1": -6.0})
        doubled = _qwen(qwen_pipe)
    finally:
        calibrator.detach()
    assert np.allclose(doubled, base, atol=1e-4)


def test_cfg_form_needs_two_copies_and_a_guidance_scale():
    model = tiny.tiny_sd3_transformer()
    with pytest.raises(ValueError, match="two copies"):
        Calibrator(model, "gate", copies=3, form="cfg", guidance_scale=G)
    with pytest.raises(ValueError, match="guidance_scale"):
        Calibrator(model, "gate", copies=2, form="cfg")
    with pytest.raises(ValueError, match="guidance_scale"):
        Calibrator(model, "gate", copies=2, form="cfg", guidance_scale=1.0)
    assert Calibrator(model, "gate", copies=2, guidance_scale=G).form == "cfg"  # SD3's family default


# --------------------------------------------------------------------------------------------------
# distilled form (FLUX)
# --------------------------------------------------------------------------------------------------


def test_flux_distilled_ensemble_at_init_equals_the_plain_pipeline(flux_pipe):
    plain = _generate(flux_pipe)
    calibrator = Calibrator(flux_pipe.transformer, "gate", copies=2).attach()
    try:
        assert calibrator.form == "distilled" and calibrator.omega == [1.0, 0.0]
        assert np.array_equal(_generate(flux_pipe), plain)
        calibrator.set_values(_scales(calibrator, 1, 7))  # copy 1 has weight 0: still the plain model
        assert np.array_equal(_generate(flux_pipe), plain)
        calibrator.set_values({"omega.0": 1.5, "omega.1": -0.5})  # now copy 1 differs and counts
        assert not np.allclose(_generate(flux_pipe), plain, atol=1e-3)
    finally:
        calibrator.detach()
    assert np.array_equal(_generate(flux_pipe), plain)


def test_flux_guidance_like_weights_with_identical_copies_cancel(flux_pipe):
    """ω = (1 + w, −w) with copy 1 = copy 0 is the single calibrated model, up to float rounding."""
    calibrator = Calibrator(flux_pipe.transformer, "gate").attach()
    try:
        shared = _scales(calibrator, 0, 8)
        calibrator.set_values(shared)
        single = _generate(flux_pipe)
    finally:
        calibrator.detach()
    plain = _generate(flux_pipe)
    assert not np.allclose(single, plain, atol=1e-3)

    ensemble = Calibrator(flux_pipe.transformer, "gate", copies=2).attach()
    try:
        w = 2.5
        ensemble.set_values({"omega.0": 1.0 + w, "omega.1": -w})
        assert np.allclose(_generate(flux_pipe), plain, atol=1e-5)  # both copies at identity
        ensemble.set_values({**{f"c{m}.{k}": v for m in (0, 1) for k, v in shared.items()}})
        assert np.allclose(_generate(flux_pipe), single, atol=1e-5)
    finally:
        ensemble.detach()


@pytest.mark.parametrize("copies", [2, 3])
def test_distilled_velocity_is_the_weighted_sum_of_single_copy_calibrations(copies):
    model = tiny.tiny_flux_transformer()
    inputs = tiny.dummy_transformer_inputs(model)
    ensemble = Calibrator(model, "layer", copies=copies).attach()
    assert ensemble.omega == [1.0] + [0.0] * (copies - 1)
    scales = [_scales(ensemble, m, 10 + m) for m in range(copies)]
    omega = [1.6, -0.9, 0.35][:copies]
    ensemble.set_values({**{k: v for s in scales for k, v in s.items()},
                         **{f"omega.{m}": w for m, w in enumerate(omega)}})
    out = _run(model, inputs)
    ensemble.detach()

    single = Calibrator(model, "layer").attach()
    velocities = []
    for s in scales:
        single.set_values(_unprefixed(s))
        velocities.append(_run(model, inputs))
    single.detach()
    by_hand = sum(w * v for w, v in zip(omega, velocities))
    assert _close(out, by_hand, 1e-6)
    assert not _close(velocities[0], velocities[1], 1e-3)


@pytest.mark.parametrize("builder", [tiny.tiny_flux_transformer, tiny.tiny_sd3_transformer,
                                     tiny.tiny_qwen_transformer, tiny.tiny_pixart_transformer])
def test_single_copy_omega_multiplies_the_output(builder):
    model = builder()
    inputs = tiny.dummy_transformer_inputs(model)
    reference = _run(model, inputs)
    calibrator = Calibrator(model, "block").attach()
    calibrator.set_values({"omega": 1.7})
    assert torch.equal(_run(model, inputs), reference * 1.7)
    calibrator.set_values({"omega": -0.25})
    assert torch.equal(_run(model, inputs), reference * -0.25)
    inputs_dict = {**inputs, "return_dict": True}  # the output object form is scaled too
    with torch.no_grad():
        assert torch.equal(model(**inputs_dict).sample, reference * -0.25)


# --------------------------------------------------------------------------------------------------
# Names, counts, spaces
# --------------------------------------------------------------------------------------------------


def test_parameter_names_counts_and_space_of_an_ensemble():
    model = tiny.tiny_sd3_transformer()
    calibrator = Calibrator(model, "gate", copies=2, form="cfg", guidance_scale=7.0)
    n = len(calibrator.sites)
    assert n == 15
    names = calibrator.parameter_names()
    assert names[:n] == [f"c0.{s}" for s in calibrator.site_names]
    assert names[n:2 * n] == [f"c1.{s}" for s in calibrator.site_names]
    assert names[2 * n:] == ["omega.0", "omega.1"]
    assert calibrator.parameter_names(with_omega=False) == names[:2 * n]
    assert calibrator.count() == 2 * n + 2 == len(set(names))
    assert calibrator.count(with_omega=False) == 2 * n

    space = calibrator.space()
    assert space.names == names
    assert space.init_params()["omega.0"] == 7.0 and space.init_params()["omega.1"] == -6.0
    assert sorted(space.groups["omega"]) == ["omega.0", "omega.1"]
    for name in names[:2 * n]:
        dim = space[name]
        assert (dim.low, dim.high, dim.init) == (*SCALE_BOUNDS, 1.0) and dim.group != "omega"
    assert (space["omega.1"].low, space["omega.1"].high) == OMEGA_BOUNDS
    assert space["omega.0"].sigma > space["c0.block.0.img.attn"].sigma  # ω moves in larger steps
    no_omega = calibrator.space(with_omega=False)
    assert no_omega.names == calibrator.parameter_names(with_omega=False) and "omega" not in no_omega.groups


@pytest.mark.parametrize(("copies", "form", "omega_names", "omega_init"), [
    (1, None, ["omega"], (1.0,)),
    (2, "distilled", ["omega.0", "omega.1"], (1.0, 0.0)),
    (3, "distilled", ["omega.0", "omega.1", "omega.2"], (1.0, 0.0, 0.0)),
])
def test_parameter_counts_with_and_without_omega_flux(copies, form, omega_names, omega_init):
    calibrator = Calibrator(tiny.tiny_flux_transformer(), "gate", copies=copies, form=form)
    n = len(calibrator.sites)
    assert calibrator.count(with_omega=False) == copies * n
    assert calibrator.count() == copies * n + copies
    assert calibrator.parameter_names()[-copies:] == omega_names
    assert calibrator.parameter_names(with_omega=False) == calibrator.parameter_names()[:-copies]
    space = calibrator.space()
    assert len(space) == calibrator.count() and len(calibrator.space(with_omega=False)) == copies * n
    assert tuple(space.init_params()[name] for name in omega_names) == omega_init
    attached = calibrator.attach()
    assert list(attached.values()) == calibrator.parameter_names()
    assert [attached.values()[k] for k in omega_names] == list(omega_init)
    attached.detach()


# --------------------------------------------------------------------------------------------------
# Nothing patched process-wide
# --------------------------------------------------------------------------------------------------


def _class_snapshot(classes) -> dict[type, dict[str, object]]:
    return {cls: dict(vars(cls)) for cls in classes}


def _assert_unchanged(snapshot):
    for cls, attributes in snapshot.items():
        now = dict(vars(cls))
        assert now.keys() == attributes.keys(), f"{cls.__name__}: attributes added or removed"
        changed = [k for k, v in attributes.items() if now[k] is not v]
        assert changed == [], f"{cls.__name__}: {changed} replaced"


def test_no_diffusers_class_is_patched(sd3_pipe, qwen_pipe, flux_pipe):
    pipes = (sd3_pipe, qwen_pipe, flux_pipe)
    classes = {torch.nn.Module, diffusers.ModelMixin, diffusers.DiffusionPipeline}
    for pipe in pipes:
        classes |= {type(pipe), type(pipe.transformer)}
        classes |= {type(m) for m in pipe.transformer.modules()}
    snapshot = _class_snapshot(classes)
    forwards = {type(p.transformer): type(p.transformer).forward for p in pipes}
    calls = {type(p): type(p).__call__ for p in pipes}

    calibrators = [
        Calibrator(sd3_pipe.transformer, "gate", copies=2, form="cfg", guidance_scale=G),
        Calibrator(qwen_pipe.transformer, "layer", copies=2, form="cfg", guidance_scale=G),
        Calibrator(flux_pipe.transformer, "block", copies=2),
    ]
    try:
        for c in calibrators:
            c.attach()
        _sd3(sd3_pipe)
        _qwen(qwen_pipe)
        _generate(flux_pipe)
        _assert_unchanged(snapshot)
    finally:
        for c in calibrators:
            c.detach()
    _assert_unchanged(snapshot)
    assert {type(p.transformer): type(p.transformer).forward for p in pipes} == forwards
    assert {type(p): type(p).__call__ for p in pipes} == calls
    assert diffusers.StableDiffusion3Pipeline.__call__ is calls[diffusers.StableDiffusion3Pipeline]
    assert type(sd3_pipe.transformer).forward is diffusers.SD3Transformer2DModel.forward
    for pipe in pipes:
        assert _hook_count(pipe.transformer) == 0
        assert "calibri_ensemble" not in pipe.transformer._diffusers_hook.hooks


def test_a_second_model_of_the_same_class_is_untouched():
    """Hooks live on the instance: another model of the same class runs as before."""
    calibrated, other = tiny.tiny_flux_transformer(), tiny.tiny_flux_transformer()
    inputs = tiny.dummy_transformer_inputs(other)
    reference = _run(other, inputs)
    calibrator = Calibrator(calibrated, "gate", copies=2).attach()
    calibrator.set_values({"omega.0": 0.5, "c0.single.0": 0.0})
    assert not torch.equal(_run(calibrated, inputs), reference)
    assert torch.equal(_run(other, inputs), reference)
    assert _hook_count(other) == 0 and not hasattr(other, "_diffusers_hook")
    calibrator.detach()
