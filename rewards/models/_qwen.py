"""Qwen2-VL inputs built from a tokenizer and an image processor, without ``Qwen2VLProcessor``.

The processor class needs a video processor, which transformers only provides with torchvision;
scoring still images needs neither. What the processor does for an image is reproduced here: the
image processor patchifies the image (``pixel_values``, ``image_grid_thw``), and the single
``<|image_pad|>`` placeholder of the chat text is repeated once per merged patch
(``t·h·w / merge_size²`` times) before tokenising.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

IMAGE_PAD = "<|image_pad|>"
DEFAULT_SYSTEM = "You are a helpful assistant."


def builtin_chat(user_text: str, system: str = DEFAULT_SYSTEM) -> str:
    """Qwen2-VL's chat format for one user turn holding an image then ``user_text``, and the
    opening of the assistant's turn (what its chat template renders with a generation prompt)."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n<|vision_start|>{IMAGE_PAD}<|vision_end|>{user_text}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def find_chat_template(tokenizer: Any, directory: str | None) -> str | None:
    """The chat template of a checkpoint: the tokenizer's, else a ``chat_template.jinja`` /
    ``chat_template.json`` saved next to it (where processors keep theirs); ``None`` if none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        return template
    if directory and os.path.isdir(directory):
        jinja = os.path.join(directory, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as handle:
                return handle.read()
        js = os.path.join(directory, "chat_template.json")
        if os.path.isfile(js):
            with open(js, encoding="utf-8") as handle:
                value = json.load(handle).get("chat_template")
            if isinstance(value, str) and value:
                return value
    return None


class QwenVLInputs:
    """Batches of (image, user text) for a Qwen2-VL-family model, right-padded."""

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None,
                 min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.merge_size = int(getattr(image_processor, "merge_size", 2) or 2)
        self.size = None
        if min_pixels is not None or max_pixels is not None:
            current = getattr(image_processor, "size", None) or {}
            low = min_pixels if min_pixels is not None else _get(current, "shortest_edge")
            high = max_pixels if max_pixels is not None else _get(current, "longest_edge")
            self.size = {"shortest_edge": int(low), "longest_edge": int(high)}
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def render(self, user_text: str) -> str:
        """The chat text for one user turn (image first, then ``user_text``) + the assistant opening."""
        if self.chat_template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]}]
            return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
        return builtin_chat(user_text)

    def encode(self, images: Sequence[Any], texts: Sequence[str]) -> dict[str, Any]:
        """Model inputs for uint8 H×W×3 ``images`` and full chat ``texts`` (one placeholder each)."""
        import torch

        kwargs = {"size": self.size} if self.size is not None else {}
        vision = self.image_processor(images=list(images), return_tensors="pt", **kwargs)
        grids = vision["image_grid_thw"]
        rows = []
        for text, grid in zip(texts, grids):
            if text.count(IMAGE_PAD) != 1:
                raise ValueError(f"expected one {IMAGE_PAD} in the chat text, found {text.count(IMAGE_PAD)}")
            count = int(torch.prod(grid).item()) // (self.merge_size ** 2)
            expanded = text.replace(IMAGE_PAD, IMAGE_PAD * count)
            rows.append(self.tokenizer(expanded, add_special_tokens=False)["input_ids"])
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "pixel_values": vision["pixel_values"], "image_grid_thw": grids,
                # which tokens are image tokens (1) or text (0), as the processor reports for M-RoPE
                "mm_token_type_ids": (input_ids == image_id).long()}


def _get(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)
