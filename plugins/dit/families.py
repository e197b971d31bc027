"""The pipeline families calibri ships: how each diffusers pipeline encodes one prompt, and the
names of its guidance and negative arguments (registered by the DiT plugin through the
``calibri_register_pipeline_families`` hook, like any plugin's).

An encoder calls the pipeline's own ``encode_prompt`` for one prompt, with the text options
(``max_sequence_length``, ``clean_caption``, Sana's instruction prefix) at the defaults of the
pipeline's ``__call__``, so that a cached encoding is the one the stock pipeline would make.
torch is imported only when a prompt is encoded: the registry imports this module.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from .family import Family

if TYPE_CHECKING:
    import torch

Encoding = dict[str, "torch.Tensor"]


def _parameters(fn: Any) -> set[str]:
    return set(inspect.signature(fn).parameters)


def call_default(pipe: Any, name: str, fallback: Any = None) -> Any:
    """The default of ``name`` in the pipeline's ``__call__`` (``fallback`` where it has none)."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return fallback
    return parameter.default


def _text_options(pipe: Any, *names: str) -> dict[str, Any]:
    """The ``__call__`` defaults of those of ``names`` that ``encode_prompt`` takes."""
    accepted = _parameters(pipe.encode_prompt)
    return {name: call_default(pipe, name) for name in names if name in accepted and call_default(pipe, name) is not None}


def encode_sd3(pipe: Any, prompt: str, device: torch.device) -> Encoding:
    kwargs: dict[str, Any] = {"prompt": prompt, "device": device, "do_classifier_free_guidance": False}
    if "prompt_2" in _parameters(pipe.encode_prompt):
        kwargs.update(prompt_2=None, prompt_3=None)
    embeds, _, pooled, _ = pipe.encode_prompt(**kwargs)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def encode_flux(pipe: Any, prompt: str, device: torch.device) -> Encoding:
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def encode_qwen(pipe: Any, prompt: str, device: torch.device) -> Encoding:
    import torch

    embeds, mask = pipe.encode_prompt(prompt=prompt, device=device)
    if mask is None:  # None means "no padding": make it explicit so prompts of any length batch
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}


def _caption_cleaning(options: dict[str, Any]) -> dict[str, Any]:
    """``clean_caption`` as the pipeline would apply it: it needs beautifulsoup4 and ftfy and,
    without them, warns on every prompt and goes on without; here it is off at once, silently."""
    if options.get("clean_caption"):
        from diffusers.utils import is_bs4_available, is_ftfy_available

        if not (is_bs4_available() and is_ftfy_available()):
            options["clean_caption"] = False
    return options


def encode_masked_t5(pipe: Any, prompt: str, device: torch.device) -> Encoding:
    """PixArt-α/Σ and Sana: ``encode_prompt`` returns (embeds, mask, negative embeds, negative mask)."""
    options = _caption_cleaning(_text_options(pipe, "clean_caption", "max_sequence_length", "complex_human_instruction"))
    embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=device, **options)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


def encode_sana_negative(pipe: Any, prompt: str, device: torch.device) -> Encoding:
    """Sana encodes the negative prompt without the instruction prefix its prompts get."""
    options = _caption_cleaning(_text_options(pipe, "clean_caption", "max_sequence_length"))
    embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=device,
                                            complex_human_instruction=None, **options)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


def encode_chroma(pipe: Any, prompt: str, device: torch.device) -> Encoding:
    options = _text_options(pipe, "max_sequence_length")
    embeds, _, mask, _, _, _ = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False, device=device,
                                                  **options)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


_SD3_NEGATIVES = {"prompt_embeds": "negative_prompt_embeds", "pooled_prompt_embeds": "negative_pooled_prompt_embeds"}
_MASKED_NEGATIVES = {"prompt_embeds": "negative_prompt_embeds", "prompt_attention_mask": "negative_prompt_attention_mask"}
_MASKS = ("prompt_attention_mask", "negative_prompt_attention_mask")

SD3 = Family(encode_sd3, "guidance_scale", _SD3_NEGATIVES)
FLUX = Family(encode_flux, "guidance_scale")
QWEN_IMAGE = Family(encode_qwen, "true_cfg_scale",
                    {"prompt_embeds": "negative_prompt_embeds", "prompt_embeds_mask": "negative_prompt_embeds_mask"},
                    default_negative=" ", masks=("prompt_embeds_mask", "negative_prompt_embeds_mask"))
PIXART = Family(encode_masked_t5, "guidance_scale", _MASKED_NEGATIVES, masks=_MASKS)
SANA = Family(encode_masked_t5, "guidance_scale", _MASKED_NEGATIVES, masks=_MASKS, encode_negative=encode_sana_negative)
CHROMA = Family(encode_chroma, "guidance_scale", _MASKED_NEGATIVES, masks=_MASKS)

#: Pipeline class name → (family, description), registered by the DiT plugin.
BUILT_IN_FAMILIES: dict[str, tuple[Family, str]] = {
    "StableDiffusion3Pipeline": (SD3, "Stable Diffusion 3/3.5: CLIP x2 + T5, CFG"),
    "ToyFlowPipeline": (SD3, "calibri's toy model (SD3-style encodings), CFG"),
    "FluxPipeline": (FLUX, "FLUX.1: CLIP + T5, guidance embedded (no negative)"),
    "QwenImagePipeline": (QWEN_IMAGE, "Qwen-Image: Qwen2.5-VL, true CFG (true_cfg_scale)"),
    "PixArtAlphaPipeline": (PIXART, "PixArt-α: T5 with attention mask, CFG"),
    "PixArtSigmaPipeline": (PIXART, "PixArt-Σ: T5 with attention mask, CFG"),
    "SanaPipeline": (SANA, "Sana: Gemma-2 with instruction prefix and mask, CFG"),
    "ChromaPipeline": (CHROMA, "Chroma: T5 with attention mask, true CFG in separate calls"),
}
