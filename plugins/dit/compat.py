"""The diffusers internals calibri relies on, in one place.

Calibri hooks the transformer through diffusers' hook machinery and loads pipelines with a
dtype. Parts of both are not public API (undocumented modules, ``_``-prefixed attributes) and
some changed between the diffusers versions calibri supports (the oldest are in
``requirements/oldest.txt``). Everything calibri uses that is not public goes through this
module, so a new diffusers release means changing one file. What is used, and how it differs:

* ``diffusers.hooks.HookRegistry`` and ``diffusers.hooks.hooks.BaseState`` / ``ModelHook`` /
  ``StateManager``: the hook registry (undocumented). The same in every supported version.
* A hook learns which denoiser call runs (``"cond"`` / ``"uncond"``, from the pipeline's
  ``transformer.cache_context(name)``) only if its class sets ``_is_stateful = True`` and it
  holds a ``StateManager`` as an instance attribute; the forward it wraps is
  ``hook.fn_ref.original_forward``. The same in every supported version.
* The current context of a ``StateManager``: ``_current_context``, the name itself (a ``str``),
  up to diffusers 0.40; ``_context``, a ``CacheContext`` whose ``name`` is the name, from 0.41.
* The dtype keyword of ``from_pretrained``: ``torch_dtype=`` up to 0.39 (there a pipeline ignores
  ``dtype=`` and loads in float32, a model class fails on it); ``dtype=`` from 0.40, where a
  pipeline's ``torch_dtype=`` is deprecated.
* ``DiffusionPipeline._execution_device``: the device the pipeline runs its models on (it sees
  through CPU offloading). The same in every supported version.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffusers
import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

__all__ = ["BaseState", "ContextHook", "HookRegistry", "ModelHook", "StateManager", "context_name",
           "diffusers_version", "dtype_keyword", "execution_device", "from_pretrained"]


def diffusers_version() -> tuple[int, int]:
    """(major, minor) of the installed diffusers."""
    major, minor = diffusers.__version__.split(".")[:2]
    return int(major), int(minor)


def context_name(manager: StateManager) -> str | None:
    """The name of the ``cache_context`` the pipeline is in (``"cond"``, ``"uncond"``), or None."""
    if hasattr(manager, "_context"):  # diffusers >= 0.41: a CacheContext
        context = manager._context
        return None if context is None else context.name
    return manager._current_context  # diffusers <= 0.40: the name


class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class ContextHook(ModelHook):
    """A ``ModelHook`` that knows which call of the denoiser runs (:meth:`call_name`) and calls
    the forward it wraps (:meth:`original_forward`)."""

    _is_stateful = True  # so that the pipeline's cache_context reaches self.context

    def __init__(self) -> None:
        super().__init__()
        self.context = StateManager(_NoState)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.context.reset()
        return module

    def call_name(self) -> str | None:
        return context_name(self.context)

    def original_forward(self) -> Callable[..., Any]:
        return self.fn_ref.original_forward


def dtype_keyword() -> str:
    """The keyword ``from_pretrained`` takes the dtype by."""
    return "dtype" if diffusers_version() >= (0, 40) else "torch_dtype"


def from_pretrained(cls: Any, path: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, <dtype keyword>=dtype, **kwargs)`` (a model or a pipeline class)."""
    return cls.from_pretrained(path, **{dtype_keyword(): dtype}, **kwargs)


def execution_device(pipe: Any) -> torch.device:
    """The device ``pipe`` runs its models on."""
    return pipe._execution_device
