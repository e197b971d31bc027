"""CLIP-based rewards: PickScore, CLIPScore and the LAION aesthetic predictor.

All three embed images with a transformers ``CLIPModel`` (any checkpoint in that format) and
take the cosine between L2-normalised embeddings (PickScore, CLIPScore) or feed the normalised
image embedding to a small linear head (aesthetic). They need torch and transformers, not
torchvision: without it transformers uses its PIL image processor.

Image preprocessing (``preprocess``):

``"pil"`` (default)
    the reference recipe: the canonical [0, 1] images are rounded to 8 bits (``(x * 255).round()``,
    as Flow-GRPO does before scoring) and go through the checkpoint's own image processor
    (bicubic resize of the shorter side, centre crop, CLIP normalisation) on the CPU.
``"tensor"``
    the same steps done by torch on the reward's device, without the 8-bit rounding (bicubic with
    antialiasing instead of PIL's filter): faster on a GPU, scores differ slightly from ``"pil"``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from ._common import (
    ModelReward,
    build_linear_stack,
    cached,
    clip_style_tensor,
    fail,
    features,
    linear_stack_prefix,
    load_pretrained,
    load_weights,
    model_source,
    require,
    resolve_dtype,
    resolve_file,
    size_value,
    to_uint8,
)

#: PickScore's weights and the processor its authors use with them (the model repo has no tokenizer).
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
#: CLIP ViT-L/14: CLIPScore's default here and the image encoder of the LAION aesthetic predictor.
CLIP_L14 = "openai/clip-vit-large-patch14"
#: The LAION improved aesthetic predictor head (linear MLP on CLIP ViT-L/14 image embeddings).
AESTHETIC_HEAD_FILES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic_head.safetensors", "aesthetic_head.pth")

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def _has_tokenizer(directory: str) -> bool:
    return os.path.isdir(directory) and any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES)


class _CLIPReward(ModelReward):
    """Loads a CLIP model + processor once; embeds images and prompts."""

    default_path: ClassVar[str] = CLIP_L14
    default_processor: ClassVar[str | None] = None

    def __init__(self, path: str | None, processor: str | None, device: str | None, dtype: str, batch_size: int,
                 allow_download: bool, preprocess: str) -> None:
        super().__init__(batch_size=batch_size, device=device, allow_download=allow_download)
        require(self.reward_name, "transformers", "PIL")
        if preprocess not in ("pil", "tensor"):
            raise fail(self.reward_name, f"unknown preprocess {preprocess!r} (use pil or tensor)")
        self.preprocess = preprocess
        self.dtype = resolve_dtype(self.reward_name, dtype, self.device, accelerator_default="float32")
        self.path, path_is_local = model_source(self.reward_name, "model", path or self.default_path)
        if processor is None:
            local_dir = self.path if path_is_local else None
            processor = self.path if (local_dir and _has_tokenizer(local_dir)) or not self.default_processor \
                else self.default_processor
        self.processor_path, processor_is_local = model_source(self.reward_name, "processor", processor)
        key = ("clip", self.path, self.processor_path, self.device, str(self.dtype))
        self.model, self.processor = cached(key, lambda: self._load(path_is_local, processor_is_local))
        tokenizer = self.processor.tokenizer
        limits = [n for n in (getattr(tokenizer, "model_max_length", None),
                              getattr(self.model.config.text_config, "max_position_embeddings", None))
                  if isinstance(n, int) and 0 < n < 100_000]
        self.max_length = min(limits) if limits else 77

    def _load(self, path_is_local: bool, processor_is_local: bool) -> tuple[Any, Any]:
        from transformers import AutoModel, AutoProcessor

        model = load_pretrained(self.reward_name, "model", AutoModel.from_pretrained, self.path, path_is_local,
                                self.allow_download, dtype=self.dtype)
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(model, method) or not hasattr(model, "logit_scale"):
                raise fail(self.reward_name, f"{self.path!r} is not a CLIP model ({type(model).__name__})")
        processor = load_pretrained(self.reward_name, "processor", AutoProcessor.from_pretrained, self.processor_path,
                                    processor_is_local, self.allow_download)
        if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
            raise fail(self.reward_name,
                       f"{self.processor_path!r} holds no CLIP processor (tokenizer + image processor)")
        return model.to(self.device).eval().requires_grad_(False), processor

    # -- embeddings ---------------------------------------------------------------------------------
    def pixel_values(self, images: Any) -> Any:
        """Preprocessed pixels (N×3×S×S) for a canonical batch."""
        import torch

        image_processor = self.processor.image_processor
        if self.preprocess == "pil":
            pixels = image_processor(images=to_uint8(images), return_tensors="pt")["pixel_values"]
            return torch.as_tensor(pixels).to(device=self.device, dtype=self.dtype)
        shortest = size_value(image_processor.size, "shortest_edge", "height")
        crop = image_processor.crop_size if getattr(image_processor, "do_center_crop", True) else None
        crop_hw = (size_value(crop, "height"), size_value(crop, "width")) if crop is not None else (shortest, shortest)
        return clip_style_tensor(images, shortest, crop_hw, image_processor.image_mean, image_processor.image_std,
                                 self.device, self.dtype)

    def image_embeddings(self, images: Any) -> Any:
        embeds = features(self.model.get_image_features(pixel_values=self.pixel_values(images))).float()
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def text_embeddings(self, prompts: Sequence[str]) -> Any:
        tokens = self.processor.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                          return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        embeds = features(self.model.get_text_features(**tokens)).float()
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def cosine(self, images: Any, prompts: Sequence[str]) -> Any:
        """Cosine similarity of each image with its own prompt (float32, on the device)."""
        return (self.image_embeddings(images) * self.text_embeddings(self._check_prompts(prompts))).sum(dim=-1)


class PickScore(_CLIPReward):
    """PickScore (Kirstain et al. 2023): a CLIP-H/14 fine-tuned on Pick-a-Pic human preferences.

    Score = ``logit_scale.exp() * cos(image embedding, prompt embedding)``, the number the paper
    and its model card report: about 20–24 for real text-to-image outputs (SD3.5-M ≈ 22.4).
    ``scale="raw"`` (default) outputs exactly that; ``scale="flowgrpo"`` divides it by 26, the
    normalisation Flow-GRPO's ``pickscore`` reward uses (≈ 0.85). Higher is better; uses the prompt.

    Weights: ``path`` = a transformers CLIPModel directory or hub id (default
    ``yuvalkirstain/PickScore_v1``); ``processor`` = its tokenizer + image processor (default: ``path``
    when it holds a tokenizer, else ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, as the authors do).
    Hub ids load from the local Hugging Face cache unless ``allow_download`` is true.
    """

    reward_name = "pickscore"
    higher_is_better = True
    uses_prompt = True
    needs = "cpu"
    default_path = PICKSCORE_MODEL
    default_processor = PICKSCORE_PROCESSOR

    def __init__(self, path: str | None = None, *, processor: str | None = None,
                 scale: Literal["raw", "flowgrpo"] = "raw", device: str | None = "auto", dtype: str = "auto",
                 batch_size: int = 16, allow_download: bool = False,
                 preprocess: Literal["pil", "tensor"] = "pil") -> None:
        if scale not in ("raw", "flowgrpo"):
            raise fail(self.reward_name, f"unknown scale {scale!r} (use raw or flowgrpo)")
        self.scale = scale
        super().__init__(path, processor, device, dtype, batch_size, allow_download, preprocess)

    def score(self, images: Any, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> Any:
        import torch

        with torch.inference_mode():
            scores = self.model.logit_scale.exp().float() * self.cosine(images, prompts)
        return scores / 26.0 if self.scale == "flowgrpo" else scores


class CLIPScore(_CLIPReward):
    """CLIPScore (Hessel et al. 2021): image–prompt agreement of a CLIP model.

    ``scale`` picks the published convention (``cos`` is the cosine of the L2-normalised CLIP
    embeddings of the image and its prompt):

    - ``"hessel"`` (default): ``2.5 * max(cos, 0)``, the paper's CLIP-S, in [0, 2.5] (typically 0.6–0.9);
    - ``"torchmetrics"``: ``100 * max(cos, 0)`` (torchmetrics' ``CLIPScore``), typically 25–35;
    - ``"flowgrpo"``: ``logit_scale.exp() * cos / 30`` (Flow-GRPO's ``clipscore``; ≈ 100·cos/30);
    - ``"cosine"``: ``cos`` itself, in [−1, 1].

    Higher is better; uses the prompt. Weights: ``path`` = any transformers CLIPModel directory or
    hub id with its processor (default ``openai/clip-vit-large-patch14``, Flow-GRPO's and
    torchmetrics' choice; the paper used ViT-B/32: ``openai/clip-vit-base-patch32``).
    """

    reward_name = "clipscore"
    higher_is_better = True
    uses_prompt = True
    needs = "cpu"
    default_path = CLIP_L14

    def __init__(self, path: str | None = None, *, processor: str | None = None,
                 scale: Literal["hessel", "torchmetrics", "flowgrpo", "cosine"] = "hessel",
                 device: str | None = "auto", dtype: str = "auto", batch_size: int = 16, allow_download: bool = False,
                 preprocess: Literal["pil", "tensor"] = "pil") -> None:
        if scale not in ("hessel", "torchmetrics", "flowgrpo", "cosine"):
            raise fail(self.reward_name, f"unknown scale {scale!r} (use hessel, torchmetrics, flowgrpo or cosine)")
        self.scale = scale
        super().__init__(path, processor, device, dtype, batch_size, allow_download, preprocess)

    def score(self, images: Any, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> Any:
        import torch

        with torch.inference_mode():
            cos = self.cosine(images, prompts)
            if self.scale == "hessel":
                return 2.5 * cos.clamp(min=0)
            if self.scale == "torchmetrics":
                return 100.0 * cos.clamp(min=0)
            if self.scale == "flowgrpo":
                return self.model.logit_scale.exp().float() * cos / 30.0
            return cos


class Aesthetic(_CLIPReward):
    """LAION aesthetic predictor v2 ("improved aesthetic predictor"): a linear MLP on CLIP ViT-L/14
    image embeddings, trained on SAC + LAION-Logos + AVA ratings.

    Score = ``head(e / ‖e‖)`` where ``e`` is the CLIP image embedding (768-d for ViT-L/14) and the
    head is Linear 768→1024→128→64→16→1 with no activations (dropout only, inert at inference) —
    a 1–10 rating scale, typically 5–7 for generated images. Higher is better; ignores the prompt.

    Weights: ``path`` = the CLIP model (default ``openai/clip-vit-large-patch14``); ``head`` = the
    head's state dict (``layers.{0,2,4,6,7}.weight/bias``; ``.pth`` or ``.safetensors``), given as a
    file, a directory holding ``sac+logos+ava1-l14-linearMSE.pth``, or a hub file
    ``org/repo/filename``; when omitted it is looked for in ``path``.
    """

    reward_name = "aesthetic"
    higher_is_better = True
    uses_prompt = False
    needs = "cpu"
    default_path = CLIP_L14

    def __init__(self, path: str | None = None, *, head: str | None = None, processor: str | None = None,
                 device: str | None = "auto", dtype: str = "auto", batch_size: int = 16, allow_download: bool = False,
                 preprocess: Literal["pil", "tensor"] = "pil") -> None:
        super().__init__(path, processor, device, dtype, batch_size, allow_download, preprocess)
        search = [self.path] if os.path.isdir(self.path) else []
        head_file = resolve_file(self.reward_name, "aesthetic head", head, self.allow_download,
                                 AESTHETIC_HEAD_FILES, search)
        if head_file is None:
            raise fail(self.reward_name, f"no aesthetic head: set head to the {AESTHETIC_HEAD_FILES[0]} file "
                                         f"(none found in {self.path!r})")
        self.head_path = head_file
        self.head = cached(("aesthetic-head", head_file, self.device), lambda: self._load_head(head_file))
        width = self.model.config.projection_dim
        if self.head.in_features != width:
            raise fail(self.reward_name, f"the head {head_file!r} takes {self.head.in_features}-d embeddings but "
                                         f"the CLIP model {self.path!r} makes {width}-d ones")

    def _load_head(self, file: str) -> Any:
        state = load_weights(self.reward_name, "aesthetic head", file)
        prefix = linear_stack_prefix(state, ("layers.", "mlp.layers.", "model.layers.", ""))
        if prefix is None:
            raise fail(self.reward_name, f"the head {file!r} has no layers.<i>.weight entries")
        return build_linear_stack(self.reward_name, "aesthetic head", state, prefix, activation=None).to(self.device)

    def score(self, images: Any, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> Any:
        import torch

        with torch.inference_mode():
            return self.head(self.image_embeddings(images)).squeeze(-1)
