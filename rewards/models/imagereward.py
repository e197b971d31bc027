"""ImageReward (Xu et al. 2023) on transformers' BLIP classes, without the ``image-reward`` package.

ImageReward is BLIP (a ViT image encoder and a BERT text encoder that cross-attends to the image
tokens) followed by a linear MLP on the text encoder's first ([CLS]) output, standardised with the
mean and std of its training rewards. transformers' ``BlipForImageTextRetrieval`` has exactly
these two encoders (``vision_model`` and ``text_encoder``, the latter with cross-attention in every
layer), so the published weights load into it after renaming their keys.

Two on-disk layouts are read:

original
    the authors' release (hub repo ``THUDM/ImageReward``): ``ImageReward.pt`` (keys
    ``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``) and ``med_config.json``.
    Its tokenizer is ``bert-base-uncased`` plus the two tokens BLIP adds (``[DEC]``, ``[ENC]``),
    which must be available locally (option ``tokenizer``).
converted
    a directory written by :func:`convert_imagereward` (or by hand): a
    ``BlipForImageTextRetrieval`` saved with ``save_pretrained``, its tokenizer, and
    ``imagereward_head.safetensors`` (``layers.<i>.weight/bias`` plus scalar ``mean`` and ``std``).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from ._common import (
    ModelReward,
    build_linear_stack,
    cached,
    clip_style_tensor,
    fail,
    is_hub_id,
    linear_stack_prefix,
    load_pretrained,
    load_weights,
    model_source,
    require,
    resolve_dtype,
    resolve_file,
    to_uint8,
)

IMAGEREWARD_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
HEAD_FILE = "imagereward_head.safetensors"
TOKENIZER = "google-bert/bert-base-uncased"
#: Mean and std of ImageReward's raw head output on its training data (the published constants).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
#: The text length ImageReward tokenises prompts to (padding to it, truncating beyond it).
MAX_TEXT_LENGTH = 35
#: ImageReward's image normalisation (CLIP's mean and std).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

_VISION_RENAMES = (
    (r"^blip\.visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.norm\.", "vision_model.post_layernorm."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.fc(\d)\.", r"vision_model.encoder.layers.\1.mlp.fc\2."),
    (r"^blip\.text_encoder\.", "text_encoder."),
    (r"^blip\.vision_proj\.", "vision_proj."),
    (r"^blip\.text_proj\.", "text_proj."),
)


def rename_original_keys(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The original checkpoint's BLIP weights under ``BlipForImageTextRetrieval`` names, and its head.

    Keys without a counterpart (buffers such as ``position_ids``, the text pooler) are dropped."""
    blip: dict[str, Any] = {}
    head: dict[str, Any] = {}
    for key, value in state.items():
        if key.startswith("mlp."):
            head[key[len("mlp."):]] = value
            continue
        for pattern, target in _VISION_RENAMES:
            if re.match(pattern, key):
                new = re.sub(pattern, target, key)
                if not new.endswith("position_ids") and ".pooler." not in new:
                    blip[new] = value
                break
    return blip, head


def blip_config_from_original(state: Mapping[str, Any], med_config: Mapping[str, Any] | None) -> Any:
    """A ``BlipConfig`` matching an original-layout state dict (sizes read from the weights; the
    attention head counts, which weights do not show, from ``med_config`` or 64-wide heads)."""
    from transformers import BlipConfig

    med = dict(med_config or {})
    patch = state["blip.visual_encoder.patch_embed.proj.weight"]
    positions = state["blip.visual_encoder.pos_embed"].shape[1] - 1
    vision_width = patch.shape[0]
    grid = int(round(positions ** 0.5))
    depth = 1 + max(int(m.group(1)) for key in state if (m := re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", key)))
    words = state["blip.text_encoder.embeddings.word_embeddings.weight"]
    text_width = words.shape[1]
    text_layers = 1 + max(int(m.group(1)) for key in state
                          if (m := re.match(r"blip\.text_encoder\.encoder\.layer\.(\d+)\.", key)))
    vision = dict(
        hidden_size=vision_width,
        intermediate_size=state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=int(med.get("vision_num_attention_heads", max(vision_width // 64, 1))),
        image_size=grid * patch.shape[-1],
        patch_size=patch.shape[-1],
        layer_norm_eps=1e-6,  # BLIP's ViT uses LayerNorm(eps=1e-6)
        hidden_act="gelu",
    )
    text = dict(
        vocab_size=words.shape[0],
        hidden_size=text_width,
        encoder_hidden_size=vision_width,
        intermediate_size=state["blip.text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=text_layers,
        num_attention_heads=int(med.get("num_attention_heads", max(text_width // 64, 1))),
        max_position_embeddings=state["blip.text_encoder.embeddings.position_embeddings.weight"].shape[0],
        layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_act=str(med.get("hidden_act", "gelu")),
        pad_token_id=int(med.get("pad_token_id", 0)),
        is_decoder=True,  # transformers builds the cross-attention layers only for a "decoder" config
    )
    projection = state.get("blip.text_proj.weight")
    return BlipConfig(vision_config=vision, text_config=text,
                      image_text_hidden_size=int(projection.shape[0]) if projection is not None else 256)


def _imagereward_tokenizer(base: Any) -> Any:
    """BLIP's tokenizer: the BERT one plus ``[DEC]`` (bos) and ``[ENC]``, as ImageReward builds it."""
    if "[DEC]" not in base.get_vocab():
        base.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in base.get_vocab():
        base.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return base


class ImageReward(ModelReward):
    """ImageReward (Xu et al. 2023): a BLIP-based human-preference reward for text-to-image outputs.

    Score = ``(mlp(text_encoder([CLS] prompt | image)) − 0.16717) / 1.03334``: the standardised
    reward the ``image-reward`` package returns, roughly N(0, 1) over its training images (good
    generations ≈ 0.5–1.5, failures below −1). Higher is better; uses the prompt (tokenised with
    BERT's uncased tokenizer to 35 tokens). Images are resized (bicubic, shorter side) to the ViT's
    224 px, centre-cropped and CLIP-normalised, as the original does.

    ``path``: the original release (``THUDM/ImageReward`` hub id, its directory, or the
    ``ImageReward.pt`` file; needs ``tokenizer``, default ``google-bert/bert-base-uncased``, available locally)
    or a directory converted by :func:`convert_imagereward`. Runs on transformers' BLIP classes —
    the ``image-reward`` package, timm and torchvision are not needed.
    """

    reward_name = "imagereward"
    higher_is_better = True
    uses_prompt = True
    needs = "cpu"

    def __init__(self, path: str | None = None, *, tokenizer: str | None = None, head: str | None = None,
                 device: str | None = "auto", dtype: str = "auto", batch_size: int = 16, allow_download: bool = False,
                 preprocess: Literal["pil", "tensor"] = "pil") -> None:
        super().__init__(batch_size=batch_size, device=device, allow_download=allow_download)
        require(self.reward_name, "transformers", "PIL")
        if preprocess not in ("pil", "tensor"):
            raise fail(self.reward_name, f"unknown preprocess {preprocess!r} (use pil or tensor)")
        self.preprocess = preprocess
        self.dtype = resolve_dtype(self.reward_name, dtype, self.device, accelerator_default="float32")
        self.path, is_local = model_source(self.reward_name, "model", path or IMAGEREWARD_REPO)
        key = ("imagereward", self.path, tokenizer, head, self.device, str(self.dtype))
        self.model, self.tokenizer, self.head, self.mean, self.std = cached(
            key, lambda: load_imagereward(self.reward_name, self.path, is_local, tokenizer, head, self.allow_download,
                                          self.device, self.dtype))
        self.image_size = int(self.model.config.vision_config.image_size)

    def pixel_values(self, images: Any) -> Any:
        import torch

        if self.preprocess == "tensor":
            size = self.image_size
            return clip_style_tensor(images, size, (size, size), IMAGE_MEAN, IMAGE_STD, self.device, self.dtype)
        from PIL import Image

        size = self.image_size
        pixels = []
        for array in to_uint8(images):
            image = Image.fromarray(array)
            width, height = image.size
            # the shorter side → size, the longer in proportion (torchvision's Resize(size)), then a centre crop
            new = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
            if new != (width, height):
                image = image.resize(new, Image.Resampling.BICUBIC)
            left, top = int(round((image.width - size) / 2.0)), int(round((image.height - size) / 2.0))
            image = image.crop((left, top, left + size, top + size))
            pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0))
        x = torch.stack(pixels).permute(0, 3, 1, 2)
        mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
        return ((x - mean) / std).to(device=self.device, dtype=self.dtype)

    def score(self, images: Any, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> Any:
        import torch

        with torch.inference_mode():
            image_embeds = self.model.vision_model(pixel_values=self.pixel_values(images)).last_hidden_state
            tokens = self.tokenizer(self._check_prompts(prompts), padding="max_length", truncation=True,
                                    max_length=MAX_TEXT_LENGTH, return_tensors="pt")
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            text = self.model.text_encoder(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device),
                                           encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
            raw = self.head(text.last_hidden_state[:, 0, :].float()).squeeze(-1)
            return (raw - self.mean) / self.std


def _read_json(file: str | None) -> dict[str, Any] | None:
    if file is None:
        return None
    with open(file, encoding="utf-8") as handle:
        return json.load(handle)


def load_imagereward(reward: str, path: str, is_local: bool, tokenizer: str | None, head: str | None,
                     allow_download: bool, device: str, dtype: Any) -> tuple[Any, Any, Any, float, float]:
    """``(blip, tokenizer, head, mean, std)`` from either layout (see the module docstring)."""
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    if is_local and os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        model = load_pretrained(reward, "model", BlipForImageTextRetrieval.from_pretrained, path, True,
                                allow_download, dtype=dtype)
        tok_source, tok_local = model_source(reward, "tokenizer", tokenizer or path)
        tok = load_pretrained(reward, "tokenizer", AutoTokenizer.from_pretrained, tok_source, tok_local,
                              allow_download)
        head_file = resolve_file(reward, "head", head, allow_download, (HEAD_FILE,), [path])
        if head_file is None:
            raise fail(reward, f"{path!r} holds a BLIP model but no {HEAD_FILE}")
        head_state = load_weights(reward, "head", head_file)
    else:
        if is_local:
            ckpt_file = resolve_file(reward, "checkpoint", path, allow_download, (CHECKPOINT_FILE,))
        elif is_hub_id(path):
            ckpt_file = resolve_file(reward, "checkpoint", f"{path}/{CHECKPOINT_FILE}", allow_download)
        else:  # pragma: no cover - model_source only returns local paths and hub ids
            raise fail(reward, f"model path {path!r} does not exist")
        folder = os.path.dirname(ckpt_file)
        med_file = os.path.join(folder, MED_CONFIG_FILE)
        if not os.path.isfile(med_file) and not is_local:
            try:
                med_file = resolve_file(reward, "med_config", f"{path}/{MED_CONFIG_FILE}", allow_download)
            except Exception:  # the sizes are read from the weights; the config only adds head counts
                med_file = None
        state = load_weights(reward, "checkpoint", ckpt_file)
        if "blip.visual_encoder.patch_embed.proj.weight" not in state:
            raise fail(reward, f"{ckpt_file!r} is not an ImageReward checkpoint (no blip.visual_encoder weights)")
        config = blip_config_from_original(state, _read_json(med_file if med_file and os.path.isfile(med_file)
                                                             else None))
        blip_state, head_state = rename_original_keys(state)
        model = _blip_from_state(reward, config, blip_state, dtype, ckpt_file)
        tok_source, tok_local = model_source(reward, "tokenizer", tokenizer or TOKENIZER)
        tok = _imagereward_tokenizer(load_pretrained(reward, "tokenizer", AutoTokenizer.from_pretrained,
                                                     tok_source, tok_local, allow_download))
        if head is not None:
            head_state = load_weights(reward, "head", resolve_file(reward, "head", head, allow_download))
    vocab = model.config.text_config.vocab_size
    if len(tok) > vocab:
        raise fail(reward, f"the tokenizer has {len(tok)} tokens but the text encoder only {vocab}")
    prefix = linear_stack_prefix(head_state, ("layers.", "mlp.layers.", ""))
    if prefix is None:
        raise fail(reward, "the head holds no layers.<i>.weight entries")
    mlp = build_linear_stack(reward, "head", head_state, prefix, activation=None).to(device)
    mean = float(head_state["mean"]) if "mean" in head_state else REWARD_MEAN
    std = float(head_state["std"]) if "std" in head_state else REWARD_STD
    if mlp.in_features != model.config.text_config.hidden_size:
        raise fail(reward, f"the head takes {mlp.in_features}-d features, the text encoder makes "
                           f"{model.config.text_config.hidden_size}-d ones")
    return model.to(device).eval().requires_grad_(False), tok, mlp, mean, std


def _blip_from_state(reward: str, config: Any, state: dict[str, Any], dtype: Any, source: str) -> Any:
    import torch
    from transformers import BlipForImageTextRetrieval

    model = BlipForImageTextRetrieval(config)
    expected = model.state_dict()
    needed = [k for k in expected
              if k.startswith(("vision_model.", "text_encoder.")) and not k.endswith("position_ids")]
    missing = [k for k in needed if k not in state]
    if missing:
        raise fail(reward, f"{source!r} lacks {len(missing)} BLIP weights (first: {missing[0]})")
    wrong = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise fail(reward, f"{source!r}: weight {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                           f"expected {tuple(expected[wrong[0]].shape)}")
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model.to(dtype)


def convert_imagereward(checkpoint: str, output_dir: str, *, tokenizer: str = TOKENIZER,
                        allow_download: bool = False) -> str:
    """Write the original ImageReward release (``ImageReward.pt`` file, its directory or the hub id)
    as a converted directory: ``BlipForImageTextRetrieval`` + tokenizer + ``imagereward_head.safetensors``.

    Loading the converted directory then needs neither the original file nor a separate tokenizer."""
    require("imagereward", "torch", "transformers", "safetensors")
    import torch
    from safetensors.torch import save_file

    source, is_local = model_source("imagereward", "checkpoint", checkpoint)
    model, tok, mlp, mean, std = load_imagereward("imagereward", source, is_local, tokenizer, None, allow_download,
                                                  "cpu", torch.float32)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tok.save_pretrained(output_dir)
    head_state: dict[str, Any] = {}
    for i, layer in enumerate(mlp.layers):
        head_state[f"layers.{i}.weight"] = layer.weight.detach().contiguous()
        if layer.bias is not None:
            head_state[f"layers.{i}.bias"] = layer.bias.detach().contiguous()
    head_state["mean"] = torch.tensor(mean, dtype=torch.float64)
    head_state["std"] = torch.tensor(std, dtype=torch.float64)
    save_file(head_state, os.path.join(output_dir, HEAD_FILE))
    return output_dir
