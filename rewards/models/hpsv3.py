"""HPSv3 (Ma et al. 2025): a Qwen2-VL-7B preference model with an uncertainty-aware reward head.

The released checkpoint (``MizzenAI/HPSv3``, file ``HPSv3.safetensors``) is a full state dict of
Qwen2-VL-7B-Instruct fine-tuned for rewards, with the vocabulary extended by one special token
``<|Reward|>`` and a head ``rm_head`` (Linear hidden→1024, ReLU, dropout, Linear 1024→16, ReLU,
Linear 16→2) read at that token's last hidden state. The head outputs ``(mu, sigma)`` of the
preference score; the published score is ``mu``.

The base model's config, tokenizer and image processor come from ``path``
(``Qwen/Qwen2-VL-7B-Instruct``); the weights all come from the checkpoint. transformers'
``Qwen2VLForConditionalGeneration`` runs the model; the processor is rebuilt from tokenizer and
image processor (:mod:`._qwen`), so torchvision is not needed.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..base import to_canonical
from ._common import (
    ModelReward,
    build_linear_stack,
    cached,
    fail,
    linear_stack_prefix,
    load_pretrained,
    load_weights,
    model_source,
    one_line,
    require,
    resolve_dtype,
    resolve_file,
    to_uint8,
)
from ._qwen import QwenVLInputs, find_chat_template

BASE_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
CHECKPOINT_FILE = "HPSv3.safetensors"
CHECKPOINT_HUB = f"MizzenAI/HPSv3/{CHECKPOINT_FILE}"
REWARD_TOKEN = "<|Reward|>"
#: HPSv3 resizes every image to 256 merged 28-px patches (min = max pixels = 256·28·28).
PIXELS = 256 * 28 * 28

#: The default instruction after the image in the user turn. HPSv3 was trained with a longer
#: instruction of its own; scores comparable with HPSv3's published numbers need that exact text,
#: given through the ``instruction`` option (a string or a text file holding ``{prompt}``).
DEFAULT_INSTRUCTION = (
    "\nRate the generated image for human preference from 0 to 10, judging its visual quality "
    "(plausibility, clarity, detail, aesthetics, safety) and how faithfully it matches the text prompt "
    "(subject, style, context, attributes, meaning).\nTextual prompt - {prompt}\n\n\n"
)
#: What follows the instruction: the question and the reward token whose hidden state is scored.
REWARD_SUFFIX = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"


def load_instruction(instruction: str | None) -> str:
    """The instruction template: the default, a literal string, or the text of a file; must hold ``{prompt}``."""
    if instruction is None:
        return DEFAULT_INSTRUCTION
    text = instruction
    if "{prompt}" not in instruction and os.path.isfile(instruction):
        with open(instruction, encoding="utf-8") as handle:
            text = handle.read()
    if "{prompt}" not in text:
        raise fail("hpsv3", f"the instruction must contain '{{prompt}}' (got {instruction[:60]!r})")
    return text


def hpsv3_user_text(prompt: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The user-turn text HPSv3 scores an image against ``prompt`` with."""
    return instruction.replace("{prompt}", prompt) + REWARD_SUFFIX


def _modern_key(key: str) -> str:
    """Checkpoint keys written by transformers < 4.52 (``model.layers``, ``visual.*``) → today's names."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not re.match(r"model\.(language_model|visual)\.", key):
        return "model.language_model." + key[len("model."):]
    return key


class HPSv3(ModelReward):
    """HPSv3 (MizzenAI, ICCV 2025): human preference score from a Qwen2-VL-7B reward model.

    Score = ``mu``, the mean of the (mu, sigma) the reward head predicts at the ``<|Reward|>`` token
    for the image and the instruction holding the prompt — the number HPSv3's paper and code report
    (typically 5–15 for current text-to-image models; SD3.5-M ≈ 11). Higher is better; uses the prompt.

    ``path``: the base model's config + tokenizer + image processor (default
    ``Qwen/Qwen2-VL-7B-Instruct``; its weights are not read). ``checkpoint``: ``HPSv3.safetensors``
    (default: that file in ``path``, else ``MizzenAI/HPSv3/HPSv3.safetensors`` from the Hugging Face
    cache). Images are resized to 256·28·28 pixels (``min_pixels``/``max_pixels``) as HPSv3 does, and
    the language model runs with sequential positions, as in HPSv3's own forward pass.
    ``instruction``: the text after the image (a string or a file, holding ``{prompt}``); pass the
    instruction HPSv3 was trained with for scores comparable with its published numbers. About
    16 GB in bfloat16 (the ``auto`` dtype on a GPU): practical on a GPU only.
    """

    reward_name = "hpsv3"
    higher_is_better = True
    uses_prompt = True
    needs = "cuda"

    def __init__(self, path: str | None = None, *, checkpoint: str | None = None, device: str | None = "auto",
                 dtype: str = "auto", batch_size: int = 8, allow_download: bool = False,
                 min_pixels: int = PIXELS, max_pixels: int = PIXELS, instruction: str | None = None) -> None:
        super().__init__(batch_size=batch_size, device=device, allow_download=allow_download)
        self.instruction = load_instruction(instruction)
        require(self.reward_name, "transformers", "PIL", "safetensors")
        self.dtype = resolve_dtype(self.reward_name, dtype, self.device, accelerator_default="bfloat16")
        self.path, is_local = model_source(self.reward_name, "base model", path or BASE_MODEL)
        key = ("hpsv3", self.path, checkpoint, self.device, str(self.dtype))
        self.model, self.head, tokenizer, image_processor, template, self.reward_id, self.checkpoint = cached(
            key, lambda: self._load(is_local, checkpoint))
        self.inputs = QwenVLInputs(tokenizer, image_processor, template, min_pixels, max_pixels)

    def _checkpoint_file(self, checkpoint: str | None) -> str:
        search = [self.path] if os.path.isdir(self.path) else []
        found = resolve_file(self.reward_name, "checkpoint", checkpoint, self.allow_download, (CHECKPOINT_FILE,),
                             search)
        return found or resolve_file(self.reward_name, "checkpoint", CHECKPOINT_HUB, self.allow_download)

    def _load(self, is_local: bool, checkpoint: str | None) -> tuple[Any, ...]:
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

        name, allow = self.reward_name, self.allow_download
        config = load_pretrained(name, "base model config", AutoConfig.from_pretrained, self.path, is_local, allow)
        if getattr(config, "model_type", None) != "qwen2_vl":
            raise fail(name, f"{self.path!r} is not a Qwen2-VL model (model_type {config.model_type!r})")
        tokenizer = load_pretrained(name, "tokenizer", AutoTokenizer.from_pretrained, self.path, is_local, allow)
        image_processor = load_pretrained(name, "image processor", AutoImageProcessor.from_pretrained, self.path,
                                          is_local, allow)
        self.checkpoint = self._checkpoint_file(checkpoint)
        if REWARD_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([REWARD_TOKEN], special_tokens=True)  # as HPSv3 adds it, after the base vocab
        reward_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)

        state = load_weights(name, "checkpoint", self.checkpoint)
        head_state = {k[len("rm_head."):]: v for k, v in state.items() if k.startswith("rm_head.")}
        body = {_modern_key(k): v for k, v in state.items() if not k.startswith("rm_head.")}
        del state
        if not head_state or linear_stack_prefix(head_state, ("",)) is None:
            raise fail(name, f"{self.checkpoint!r} holds no rm_head weights: not an HPSv3 checkpoint")
        embed = body.get("model.language_model.embed_tokens.weight")
        if embed is None:
            raise fail(name, f"{self.checkpoint!r} holds no language-model embeddings: not an HPSv3 checkpoint")
        text_config = getattr(config, "text_config", config)
        text_config.vocab_size = int(embed.shape[0])  # HPSv3 resized the vocabulary to its tokenizer (+1 token)
        if reward_id >= embed.shape[0]:
            raise fail(name, f"the tokenizer puts {REWARD_TOKEN} at id {reward_id}, beyond the checkpoint's "
                             f"{embed.shape[0]} embeddings: wrong base model for this checkpoint?")
        try:
            model, info = Qwen2VLForConditionalGeneration.from_pretrained(
                None, config=config, state_dict=body, dtype=self.dtype, output_loading_info=True)
        except Exception as exc:
            raise fail(name, f"cannot load {self.checkpoint!r} into Qwen2-VL: {type(exc).__name__}: "
                             f"{one_line(exc)}") from None
        missing = [k for k in info.get("missing_keys", ()) if not k.startswith("lm_head")]
        if missing:
            raise fail(name, f"{self.checkpoint!r} lacks {len(missing)} model weights (first: {sorted(missing)[0]})")
        head = build_linear_stack(name, "reward head", head_state, "", activation="relu")
        if head.in_features != text_config.hidden_size or head.out_features < 1:
            raise fail(name, f"the reward head takes {head.in_features}-d states, the model makes "
                             f"{text_config.hidden_size}-d ones")
        template = find_chat_template(tokenizer, self.path if is_local else None)
        model = model.to(self.device).eval().requires_grad_(False)
        return model, head.to(self.device), tokenizer, image_processor, template, reward_id, self.checkpoint

    def mu_sigma(self, images: Any, prompts: Sequence[str]) -> Any:
        """The head's N×2 output (mu, sigma), float32, for images in any form the rewards accept
        (one forward pass: this does not split into ``batch_size`` chunks)."""
        import torch

        images = to_canonical(images)
        texts = [self.inputs.render(hpsv3_user_text(prompt, self.instruction)) for prompt in self._check_prompts(prompts)]
        batch = self.inputs.encode(to_uint8(images), texts)
        input_ids = batch["input_ids"].to(self.device)
        n, length = input_ids.shape
        # HPSv3's forward gives the language model no positions, so they are 0..L-1 (not M-RoPE).
        positions = torch.arange(length, device=self.device).view(1, 1, -1).expand(3, n, -1)
        with torch.inference_mode():
            hidden = self.model.model(
                input_ids=input_ids,
                attention_mask=batch["attention_mask"].to(self.device),
                pixel_values=batch["pixel_values"].to(device=self.device, dtype=self.dtype),
                image_grid_thw=batch["image_grid_thw"].to(self.device),
                position_ids=positions,
                use_cache=False,
            ).last_hidden_state
            where = input_ids == self.reward_id
            if not bool((where.sum(dim=1) == 1).all()):
                raise RuntimeError(f"each HPSv3 input must hold one {REWARD_TOKEN} token")
            return self.head(hidden[where].float())

    def score(self, images: Any, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> Any:
        return self.mu_sigma(images, prompts)[:, 0]
