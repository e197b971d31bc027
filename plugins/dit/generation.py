"""Prompts + seeds + steps → images over a diffusers pipeline, with prompt encodings reused.

Every prompt is encoded once, alone (so its encoding never depends on which prompts shared a
batch), and kept; each candidate, round and validation then calls the pipeline with
``prompt_embeds``. A calibration run evaluates ~10² candidates on the same few hundred prompts,
so the text encoders run a few hundred times instead of tens of thousands, and can be moved off
the accelerator once every prompt is encoded (``text_encoders_to_cpu``).

The pipeline families differ in what ``encode_prompt`` returns and in the name of the guidance
argument: a :class:`Family` says it, registered per pipeline class through the
``calibri_register_pipeline_families`` hook (calibri's own families register through it too).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .compat import execution_device
from .family import Family, family_of
from .prompts import image_seed

__all__ = ["Family", "ImageGenerator", "family_of", "flush_denormals"]


def denormals_flushed() -> bool:
    """Whether this thread flushes subnormal floats to zero (torch has no getter for it)."""
    return float(torch.tensor([1e-39], dtype=torch.float32).mul(1.0)) == 0.0


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[None]:
    """Flush subnormal floats to zero inside the block, as it was after.

    Candidates far from identity can drive activations into subnormals, which x86 CPUs compute
    ~20x slower (seen: 6 s instead of 0.3 s per candidate); the flag is processor state, so it is
    set only while images are generated and restored, never left on in the caller's process.
    """
    if not enabled or denormals_flushed():
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _default(fn: Any, name: str) -> Any:
    """The default of ``fn``'s parameter ``name`` (None where it has none, or no such parameter)."""
    import inspect

    try:
        parameter = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


class ImageGenerator:
    """Generates images for (prompt, seed) pairs with cached prompt encodings.

    ``guidance_scale`` is passed to the pipeline (None: the pipeline's default). Where the family
    has classifier-free guidance the negative encodings are cached too, so ``guidance_scale`` may
    change between calls (FLUX.1-dev's guidance is an embedding, not CFG: there it is passed on).
    """

    def __init__(self, pipe: Any, steps: int, guidance_scale: float | None = None, height: int | None = None,
                 width: int | None = None, batch_size: int = 16, negative_prompt: str | None = None,
                 pipeline_options: Mapping[str, Any] | None = None) -> None:
        self.pipe = pipe
        self.family = family_of(pipe)
        self.steps, self.guidance_scale = steps, guidance_scale
        self.height, self.width, self.batch_size = height, width, batch_size
        self.negative_prompt = negative_prompt
        self.pipeline_options = dict(pipeline_options or {})
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        self._last_size: tuple[int, int] | None = None
        self.device = execution_device(pipe)
        self._negative: dict[str, torch.Tensor] = {}
        #: Arguments every call passes: a ``negative_prompt`` that defaults to a string (PixArt's
        #: ``""``) is set to None, since the pipeline refuses it beside ``negative_prompt_embeds``.
        self._fixed: dict[str, Any] = {}
        if self.family.has_cfg and _default(type(pipe).__call__, "negative_prompt") is not None:
            self._fixed["negative_prompt"] = None
        if self.family.has_cfg:
            with torch.no_grad():
                self._negative = self.family.encode_the_negative(
                    pipe, negative_prompt if negative_prompt is not None else self.family.default_negative, self.device)

    # -- prompts ----------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> None:
        """Encode (once) every prompt not seen yet."""
        with torch.no_grad():
            for prompt in prompts:
                if prompt not in self._cache:
                    self._cache[prompt] = self.family.encode(self.pipe, prompt, self.device)

    @property
    def encoded(self) -> int:
        return len(self._cache)

    def text_encoders_to_cpu(self) -> None:
        """Free the accelerator of text encoders (call after every prompt is encoded)."""
        for name, component in self.pipe.components.items():
            if name.startswith("text_encoder") and isinstance(component, torch.nn.Module):
                component.to("cpu")

    def _batched(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The chunk's cached encodings as batch tensors, with the negative one repeated."""
        encodings = [{**self._cache[p], **self._negative} for p in prompts]
        out = {}
        for key in encodings[0]:
            tensors = [e[key] for e in encodings]
            if tensors[0].dim() >= 2 and len({t.shape[1] for t in tensors}) > 1:  # sequences of different length
                longest = max(t.shape[1] for t in tensors)
                tensors = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, longest - t.shape[1])) for t in tensors]
            out[key] = torch.cat(tensors)
        return out

    # -- the settings images are made with ---------------------------------------------------
    def resolution(self) -> tuple[int | None, int | None]:
        """(height, width) in pixels: of the last images made, else the ones set, else the
        pipeline's default (``default_sample_size × vae_scale_factor``, as diffusers pipelines
        compute it); None where unknown."""
        if self._last_size is not None:
            return self._last_size
        sample, factor = getattr(self.pipe, "default_sample_size", None), getattr(self.pipe, "vae_scale_factor", None)
        default = sample * factor if isinstance(sample, int) and isinstance(factor, int) else None
        return (self.height or default, self.width or default)

    def effective_guidance(self) -> float | None:
        """The guidance scale the pipeline samples with: the one set, else its ``__call__``'s default."""
        if self.guidance_scale is not None:
            return float(self.guidance_scale)
        import inspect

        try:
            parameter = inspect.signature(type(self.pipe).__call__).parameters.get(self.family.guidance_argument)
        except (TypeError, ValueError):
            return None
        default = None if parameter is None else parameter.default
        return float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else None

    # -- images -----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], seed: int, steps: int | None = None) -> torch.Tensor:
        """Images N×3×H×W in [0, 1] (float32, CPU); image j uses ``image_seed(seed, j)``."""
        self.encode(prompts)
        with flush_denormals(str(self.device) == "cpu"):
            return self._generate(prompts, seed, steps)

    def _generate(self, prompts: Sequence[str], seed: int, steps: int | None) -> torch.Tensor:
        images = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            generators = [torch.Generator(device="cpu").manual_seed(image_seed(seed, start + j)) for j in range(len(chunk))]
            kwargs: dict[str, Any] = {**self._batched(chunk), "num_inference_steps": steps or self.steps,
                                      "generator": generators, "output_type": "pt", **self._fixed,
                                      **self.pipeline_options}
            if self.guidance_scale is not None:
                kwargs[self.family.guidance_argument] = self.guidance_scale
            if self.height is not None:
                kwargs["height"] = self.height
            if self.width is not None:
                kwargs["width"] = self.width
            with torch.no_grad():
                out = self.pipe(**kwargs).images
            images.append(torch.as_tensor(out).float().cpu())
        result = torch.cat(images).clamp(0, 1)
        self._last_size = (int(result.shape[-2]), int(result.shape[-1]))
        return result
