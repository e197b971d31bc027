"""The official Calibri code's result vectors: which model a run calibrated, and what each entry is.

The official code saves one flat vector per result. Its order is fixed by the architecture, the
granularity and the number of copies, and differs from calibri's for the FLUX gate granularity,
for SD3 and for every ensemble, so entries are matched to calibri's parameters by name (calibri's
site names, ``c<m>.`` per copy when there are several, then ``omega`` / ``omega.<m>``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

#: What becomes of an official entry: a calibri parameter, identity (1.0: an official value that
#: never acted), or nothing (an entry whose gate acts on an output the model discards).
Fate = Literal["value", "identity", "dead"]


@dataclass(frozen=True)
class OfficialModel:
    """What an official ``model.model_name`` means: calibri's architecture and granularity, the
    shipped transformer config giving its block counts, and the pipeline the run sampled with."""

    architecture: str
    granularity: str
    model_config: str
    pipeline: str


_FLUX_DEV = "black-forest-labs/FLUX.1-dev"

#: ``model.model_name`` of the official config → what it calibrated.
OFFICIAL_MODELS: dict[str, OfficialModel] = {
    "flux_block": OfficialModel("flux", "block", "flux.1-dev", _FLUX_DEV),
    "flux_mlp_attn": OfficialModel("flux", "layer", "flux.1-dev", _FLUX_DEV),
    _FLUX_DEV: OfficialModel("flux", "gate", "flux.1-dev", _FLUX_DEV),
    **{name: OfficialModel("sd3", "gate", config, name) for name, config in (
        ("stabilityai/stable-diffusion-3.5-medium", "sd3.5-medium"),
        ("stabilityai/stable-diffusion-3.5-large", "sd3.5-large"),
        ("jieliu/SD3.5M-FlowGRPO-GenEval", "sd3.5-medium"),
        ("jieliu/SD3.5M-FlowGRPO-PickScore", "sd3.5-medium"),
    )},
    "qwen": OfficialModel("qwenimage", "gate", "qwen-image", "Qwen/Qwen-Image"),
}

#: How each architecture's ensemble of copies was run by the official code: on FLUX every copy
#: sees the prompt and the outputs are summed; on SD3 and Qwen-Image copy 0 is the conditional
#: pass and copy 1 the unconditional one.
ENSEMBLE_FORMS: dict[str, str] = {"flux": "distilled", "sd3": "cfg", "qwenimage": "cfg"}

#: The official Qwen-Image pipeline's classifier-free scale: its training script never passes
#: ``gen.guidance_scale`` to it, so runs sampled at this default.
QWEN_OFFICIAL_CFG = 7.0


@dataclass(frozen=True)
class Entry:
    """One entry of the official vector: its name (calibri's parameter name where one exists)
    and what the import does with it."""

    name: str
    fate: Fate = "value"


def _prefix(m: int, copies: int) -> str:
    return f"c{m}." if copies > 1 else ""


def official_entries(architecture: str, granularity: str, copies: int, model: Any) -> list[Entry]:
    """The official vector of a run on ``model`` (a transformer, possibly on the meta device), in
    order: every scale entry, then one ω per copy."""
    build = {"flux": _flux, "sd3": _sd3, "qwenimage": _qwen}[architecture]
    entries = build(granularity, copies, model)
    entries += [Entry("omega" if copies == 1 else f"omega.{m}") for m in range(copies)]
    return entries


def _flux(granularity: str, copies: int, model: Any) -> list[Entry]:
    doubles = range(len(model.transformer_blocks))
    singles = [Entry(f"{_prefix(m, copies)}single.{i}")
               for m in range(copies) for i in range(len(model.single_transformer_blocks))]
    if granularity == "block":
        return [Entry(f"{_prefix(m, copies)}double.{b}") for m in range(copies) for b in doubles] + singles
    if granularity == "layer":
        return [Entry(f"{_prefix(m, copies)}double.{b}.{branch}")
                for m in range(copies) for b in doubles for branch in ("attn", "mlp")] + singles
    # gate: the image stream of every copy, then the text stream of every copy
    return [Entry(f"{_prefix(m, copies)}double.{b}.{stream}.{branch}")
            for stream in ("img", "txt") for m in range(copies) for b in doubles
            for branch in ("attn", "mlp")] + singles


def _sd3(granularity: str, copies: int, model: Any) -> list[Entry]:
    if granularity != "gate":
        raise ValueError(f"the official code calibrates SD3 per gate, not per {granularity}")
    blocks = list(enumerate(model.transformer_blocks))
    image = [Entry(f"{_prefix(m, copies)}block.{b}.img.{branch}")
             for m in range(copies) for b, _ in blocks for branch in ("attn", "mlp")]
    text = [Entry(f"{_prefix(m, copies)}block.{b}.txt.{branch}")
            for m in range(copies) for b, block in blocks if not block.context_pre_only
            for branch in ("attn", "mlp")]
    second = [Entry(f"{_prefix(m, copies)}block.{b}.img.attn2")
              for m in range(copies) for b, block in blocks if getattr(block, "use_dual_attention", False)]
    return image + text + second


def _qwen(granularity: str, copies: int, model: Any) -> list[Entry]:
    """Per block: image and text attention, then image and text MLP. The official MLP hooks
    never fired, so those entries become identity; the last block's text entries act on a
    stream the model discards, so they have no calibri site."""
    if granularity != "gate":
        raise ValueError(f"the official code calibrates Qwen-Image per gate, not per {granularity}")
    last = len(model.transformer_blocks) - 1
    out = []
    for m in range(copies):
        for b in range(last + 1):
            for stream, branch in (("img", "attn"), ("txt", "attn"), ("img", "mlp"), ("txt", "mlp")):
                fate: Fate = "dead" if (b == last and stream == "txt") else ("identity" if branch == "mlp" else "value")
                out.append(Entry(f"{_prefix(m, copies)}block.{b}.{stream}.{branch}", fate))
    return out
