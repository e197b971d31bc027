"""Architecture adapters: for each diffusers DiT class, the gates that Calibri can scale.

An adapter names modules only (no torch import here), so listing sites works on a model built on
the meta device. New architectures arrive by plugin through ``calibri_register_architectures``:
``register(name, AdapterClass)``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from .sites import Gate, GateRef

Form = Literal["single", "distilled", "cfg"]


class Adapter:
    """Base class. Subclasses list the model classes they handle and yield their gates."""

    #: Registry name (also written into calibration files).
    name: ClassVar[str] = ""
    #: diffusers model class names this adapter handles.
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: The final Linear whose output is the velocity (the output weight ω folds into it).
    output_linear: ClassVar[str] = "proj_out"
    #: The ensemble form the paper uses for this family: ``distilled`` (all copies see the
    #: prompt; guidance-distilled models) or ``cfg`` (copy 0 conditional, copy 1 unconditional).
    default_form: ClassVar[Form] = "cfg"
    #: True when the stock pipeline batches CFG as [unconditional; conditional] in one call
    #: (Stable Diffusion 3, PixArt, Sana); False when it makes separate calls under
    #: ``cache_context("cond")`` / ``("uncond")`` (Qwen-Image).
    cfg_batched: ClassVar[bool] = False
    #: True when the stock pipeline makes separate calls without ``cache_context``: the
    #: conditional call, then the unconditional one on the same latents tensor (Chroma).
    cfg_sequential: ClassVar[bool] = False
    #: True when the stock pipeline rescales the guided velocity to the norm of the conditional
    #: call's output (Qwen-Image): there only the direction of ω0·v_c + ω1·v_u can be set.
    cfg_renormalized: ClassVar[bool] = False
    #: What the pipeline passes as the transformer's ``timestep`` at pure noise: 1000 where it
    #: passes the scheduler's timesteps (SD3, PixArt), 1 where it divides them by 1000 (FLUX,
    #: Qwen-Image). Timestep-dependent calibrations read the noise level from it.
    timestep_max: ClassVar[float] = 1000.0

    @classmethod
    def matches(cls, model: Any) -> bool:
        return type(model).__name__ in cls.model_classes

    def gates(self, model: Any) -> list[Gate]:
        raise NotImplementedError


def _modulation(module: str, output_index: int, linear_chunk: int, linear_chunks: int) -> GateRef:
    """A gate returned as element ``output_index`` of an AdaLN module whose ``.linear`` produces
    ``linear_chunks`` slices, the gate being slice ``linear_chunk``."""
    return GateRef(module, output_index, 0, 1, f"{module}.linear", linear_chunk, linear_chunks)


class FluxAdapter(Adapter):
    """FLUX.1 (dev/schnell) and Flux-like models: double-stream blocks with four gates (image and
    text attention and MLP), single-stream blocks with one gate on the fused attention+MLP branch."""

    name = "flux"
    model_classes = ("FluxTransformer2DModel",)
    default_form = "distilled"
    timestep_max = 1.0

    def gates(self, model: Any) -> list[Gate]:
        out: list[Gate] = []
        for i, _ in enumerate(model.transformer_blocks):
            base = f"transformer_blocks.{i}"
            for stream, norm in (("img", "norm1"), ("txt", "norm1_context")):
                # AdaLayerNormZero: linear → (shift, scale, gate)_msa, (shift, scale, gate)_mlp;
                # forward returns (x, gate_msa, shift_mlp, scale_mlp, gate_mlp).
                out.append(Gate("double", i, stream, "attn", _modulation(f"{base}.{norm}", 1, 2, 6)))
                out.append(Gate("double", i, stream, "mlp", _modulation(f"{base}.{norm}", 4, 5, 6)))
        for i, _ in enumerate(model.single_transformer_blocks):
            # AdaLayerNormZeroSingle: linear → shift, scale, gate; forward returns (x, gate).
            out.append(Gate("single", i, None, None, _modulation(f"single_transformer_blocks.{i}.norm", 1, 2, 3)))
        return _ordered(out)


class SD3Adapter(Adapter):
    """Stable Diffusion 3 / 3.5 (``JointTransformerBlock``): image attention and MLP gates, text
    attention and MLP gates except in a ``context_pre_only`` block, and the image-only second
    attention (``attn2``) of dual-attention blocks (SD3.5-Medium)."""

    name = "sd3"
    model_classes = ("SD3Transformer2DModel",)
    cfg_batched = True

    def gates(self, model: Any) -> list[Gate]:
        out: list[Gate] = []
        for i, block in enumerate(model.transformer_blocks):
            base = f"transformer_blocks.{i}"
            dual = getattr(block, "use_dual_attention", False)
            chunks = 9 if dual else 6
            out.append(Gate("block", i, "img", "attn", _modulation(f"{base}.norm1", 1, 2, chunks)))
            if dual:  # SD35AdaLayerNormZeroX returns gate_msa2 last; it is linear chunk 8 of 9
                out.append(Gate("block", i, "img", "attn2", _modulation(f"{base}.norm1", 6, 8, 9)))
            out.append(Gate("block", i, "img", "mlp", _modulation(f"{base}.norm1", 4, 5, chunks)))
            if not block.context_pre_only:
                out.append(Gate("block", i, "txt", "attn", _modulation(f"{base}.norm1_context", 1, 2, 6)))
                out.append(Gate("block", i, "txt", "mlp", _modulation(f"{base}.norm1_context", 4, 5, 6)))
        return _ordered(out)


class QwenImageAdapter(Adapter):
    """Qwen-Image (``QwenImageTransformerBlock``): image and text attention and MLP gates, each a
    slice of the stream's modulation Linear (``img_mod`` / ``txt_mod``: shift, scale, gate for the
    attention, then for the MLP). Scaling the modulation output reaches the MLP gates too. The last
    block's text gates are left out: its text output is discarded (238 live gates on Qwen-Image,
    where the paper counts 240)."""

    name = "qwenimage"
    model_classes = ("QwenImageTransformer2DModel",)
    cfg_renormalized = True
    timestep_max = 1.0

    def gates(self, model: Any) -> list[Gate]:
        out: list[Gate] = []
        last = len(model.transformer_blocks) - 1
        for i, _ in enumerate(model.transformer_blocks):
            base = f"transformer_blocks.{i}"
            # The text stream is dropped after the last block, so its text gates would act on nothing.
            for stream in ("img",) if i == last else ("img", "txt"):
                mod = f"{base}.{stream}_mod"
                out.append(Gate("block", i, stream, "attn", GateRef(mod, None, 2, 6, f"{mod}.1", 2, 6)))
                out.append(Gate("block", i, stream, "mlp", GateRef(mod, None, 5, 6, f"{mod}.1", 5, 6)))
        return _ordered(out)


class PixArtAdapter(Adapter):
    """PixArt-α/Σ (``BasicTransformerBlock`` with ``ada_norm_single``): its gates come from a
    parameter table, not a module output, so the branch outputs are scaled instead — gated
    self-attention, the ungated cross-attention, and the gated MLP — and folded into each
    branch's output projection."""

    name = "pixart"
    model_classes = ("PixArtTransformer2DModel",)
    cfg_batched = True

    def gates(self, model: Any) -> list[Gate]:
        out: list[Gate] = []
        for i, block in enumerate(model.transformer_blocks):
            base = f"transformer_blocks.{i}"
            out.append(Gate("block", i, "img", "attn", GateRef(f"{base}.attn1", None, 0, 1, f"{base}.attn1.to_out.0", 0, 1)))
            if getattr(block, "attn2", None) is not None:
                out.append(Gate("block", i, "img", "cross",
                                GateRef(f"{base}.attn2", None, 0, 1, f"{base}.attn2.to_out.0", 0, 1)))
            out.append(Gate("block", i, "img", "mlp", GateRef(f"{base}.ff", None, 0, 1, f"{base}.ff.net.2", 0, 1)))
        return out


def _branch(module: str, linear: str) -> GateRef:
    """A branch whose whole output is scaled (a tensor output), folded into ``linear``'s rows."""
    return GateRef(module, None, 0, 1, linear, 0, 1)


class SanaAdapter(Adapter):
    """Sana (``SanaTransformerBlock``): like PixArt, its gates are a parameter table plus the
    timestep embedding, so the branch outputs are scaled — the gated linear self-attention, the
    ungated cross-attention and the gated Mix-FFN — and folded into each branch's last projection
    (the FFN's is a 1x1 convolution, ``ff.conv_point``). The pipeline batches CFG and passes the
    scheduler's timesteps (0–1000)."""

    name = "sana"
    model_classes = ("SanaTransformer2DModel",)
    cfg_batched = True

    def gates(self, model: Any) -> list[Gate]:
        out: list[Gate] = []
        for i, block in enumerate(model.transformer_blocks):
            base = f"transformer_blocks.{i}"
            out.append(Gate("block", i, "img", "attn", _branch(f"{base}.attn1", f"{base}.attn1.to_out.0")))
            if getattr(block, "attn2", None) is not None:
                out.append(Gate("block", i, "img", "cross", _branch(f"{base}.attn2", f"{base}.attn2.to_out.0")))
            out.append(Gate("block", i, "img", "mlp", _branch(f"{base}.ff", f"{base}.ff.conv_point")))
        return out


class ChromaAdapter(Adapter):
    """Chroma (FLUX-derived, de-distilled): FLUX's block layout, but every modulation comes from
    one shared approximator, so no per-block Linear produces a gate. The gates are scaled where the
    pruned AdaLN norms return them and folded into the gated branch's output projection (image and
    text attention, image and text MLP; the single-stream block's ``proj_out``). True CFG runs
    the conditional and unconditional calls one after the other, without ``cache_context``; the
    timestep is divided by 1000."""

    name = "chroma"
    model_classes = ("ChromaTransformer2DModel",)
    cfg_sequential = True
    timestep_max = 1.0

    def gates(self, model: Any) -> list[Gate]:
        out: list[Gate] = []
        outputs = {("img", "attn"): "attn.to_out.0", ("img", "mlp"): "ff.net.2",
                   ("txt", "attn"): "attn.to_add_out", ("txt", "mlp"): "ff_context.net.2"}
        for i, _ in enumerate(model.transformer_blocks):
            base = f"transformer_blocks.{i}"
            for stream, norm in (("img", "norm1"), ("txt", "norm1_context")):
                # The pruned AdaLayerNormZero returns (x, gate_msa, shift_mlp, scale_mlp, gate_mlp).
                for branch, index in (("attn", 1), ("mlp", 4)):
                    ref = GateRef(f"{base}.{norm}", index, 0, 1, f"{base}.{outputs[stream, branch]}", 0, 1)
                    out.append(Gate("double", i, stream, branch, ref))
        for i, _ in enumerate(model.single_transformer_blocks):
            base = f"single_transformer_blocks.{i}"
            out.append(Gate("single", i, None, None, GateRef(f"{base}.norm", 1, 0, 1, f"{base}.proj_out", 0, 1)))
        return _ordered(out)


_BRANCH_ORDER = {"attn": 0, "attn2": 1, "cross": 2, "mlp": 3, None: 4}
_STREAM_ORDER = {"img": 0, "txt": 1, None: 2}


def _ordered(gates: list[Gate]) -> list[Gate]:
    """Stable, readable order: by group of first appearance, block, branch, then stream — so that
    a layer's streams sit together and coarser granularities keep the same order."""
    group_rank = {g: i for i, g in enumerate(dict.fromkeys(gate.group for gate in gates))}
    return sorted(gates, key=lambda g: (group_rank[g.group], g.index, _BRANCH_ORDER[g.branch], _STREAM_ORDER[g.stream]))


BUILT_IN_ADAPTERS: tuple[type[Adapter], ...] = (FluxAdapter, SD3Adapter, QwenImageAdapter, PixArtAdapter,
                                                SanaAdapter, ChromaAdapter)
