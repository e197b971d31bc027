"""The diffusers internals calibri relies on (``calibri.plugins.dit.compat``), on the installed diffusers.

They must hold on every supported version, from the oldest (``requirements/oldest.txt``) to the newest:
the hook classes import, a hook learns the pipeline's ``cache_context`` ("cond" / "uncond") and calls the
forward it wraps, ``from_pretrained`` loads in the dtype asked for, and the pipeline's execution device.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from calibri.plugins.dit import compat, tiny  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


class _Recorder(compat.ContextHook):
    """Records the context name of every forward and runs the wrapped forward unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str | None] = []

    def new_forward(self, module, *args, **kwargs):
        self.names.append(self.call_name())
        return self.original_forward()(*args, **kwargs)


def _register(model) -> _Recorder:
    hook = _Recorder()
    compat.HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, "compat_test")
    return hook


def _unregister(model) -> None:
    compat.HookRegistry.check_if_exists_or_initialize(model).remove_hook("compat_test", recurse=False)


def test_the_hook_classes_are_diffusers_own():
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

    assert compat.HookRegistry is HookRegistry and compat.ModelHook is ModelHook
    assert compat.StateManager is StateManager and compat.BaseState is BaseState
    assert issubclass(compat.ContextHook, ModelHook) and compat.ContextHook._is_stateful is True


def test_the_version_is_the_installed_one():
    major, minor = compat.diffusers_version()
    assert diffusers.__version__.startswith(f"{major}.{minor}.")
    assert (major, minor) >= (0, 35)


def test_the_context_name_is_none_outside_cache_context_and_the_name_inside():
    model = tiny.tiny_qwen_transformer()
    inputs = tiny.dummy_transformer_inputs(model)
    with torch.no_grad():
        stock = model(**inputs)[0]
    hook = _register(model)
    try:
        assert compat.context_name(hook.context) is None
        with torch.no_grad():
            plain = model(**inputs)[0]
            for name in ("cond", "uncond"):
                with model.cache_context(name):
                    assert compat.context_name(hook.context) == name
                    model(**inputs)
            assert compat.context_name(hook.context) is None
            model(**inputs)
    finally:
        _unregister(model)
    assert hook.names == [None, "cond", "uncond", None]
    assert torch.equal(plain, stock)  # the wrapped forward is the model's own


def test_the_context_is_cleared_by_reset_state():
    model = tiny.tiny_qwen_transformer()
    hook = _register(model)
    try:
        with model.cache_context("cond"):
            assert hook.call_name() == "cond"
            compat.HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=False)
            assert hook.call_name() is None
    finally:
        _unregister(model)


@pytest.mark.parametrize("build", [tiny.tiny_qwen_pipeline, tiny.tiny_flux_pipeline], ids=["qwen", "flux"])
def test_a_real_pipeline_names_its_cond_and_uncond_calls(build):
    pipe = build(0)

    def generate():
        return pipe(prompt="a red circle", negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=2,
                    height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np").images

    stock = generate()
    hook = _register(pipe.transformer)
    try:
        images = generate()
    finally:
        _unregister(pipe.transformer)
    assert hook.names == ["cond", "uncond"] * 2
    assert compat.context_name(hook.context) is None  # cleared after the call
    assert np.array_equal(images, stock)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_from_pretrained_loads_a_saved_model_in_the_dtype_asked_for(tmp_path, dtype):
    model = tiny.tiny_flux_transformer()
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype.*")
        loaded = compat.from_pretrained(type(model), str(tmp_path), dtype)
    assert loaded.dtype == dtype
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name].to(dtype)), name


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_load_pipeline_loads_the_shipped_pipeline_in_the_dtype_asked_for(dtype):
    from calibri.plugins.dit.models import load_pipeline

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype.*")
        pipe = load_pipeline("toy", dtype=dtype)
    assert pipe.transformer.dtype == getattr(torch, dtype)
    assert compat.execution_device(pipe) == torch.device("cpu")


def test_the_execution_device_of_a_tiny_pipeline_is_the_cpu():
    pipe = tiny.tiny_sd3_pipeline(0)
    device = compat.execution_device(pipe)
    assert isinstance(device, torch.device) and device.type == "cpu"
