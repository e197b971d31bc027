"""Q-Align (Wu et al., ICML 2024): visual scoring from a multimodal LLM's rating-word probabilities.

Q-Align asks a vision-language model "How would you rate the quality of this image?", starts its
answer with "The quality of the image is", and reads the next-token probabilities of the five
rating words *excellent, good, fair, poor, bad*; the score is their softmax (over those five
logits only) weighted 5, 4, 3, 2, 1 — a mean opinion score on the 1–5 scale (the aesthetics
task asks about "the aesthetics of this image").

Two ways to run it:

generic (default)
    any transformers vision-language checkpoint that loads with ``AutoModelForImageTextToText``
    and has a chat template, e.g. Q-Align-style scorers built on LLaVA, Qwen2-VL or Qwen3.5
    (``q-future/Q-ReAlign-Mini-0.8B``). Its processor renders the chat; Qwen2-VL-family models
    also run without torchvision (processor rebuilt from tokenizer and image processor).
remote code
    the original Q-Align / OneAlign weights (``q-future/one-align``) are mPLUG-Owl2, a model
    transformers does not include: they load only with ``trust_remote_code: true`` (running code
    from the checkpoint, written for transformers 4.3x) and are scored with the ``score`` method
    that code provides.
"""
from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ...core.errors import UserError
from ._common import (
    ModelReward,
    cached,
    fail,
    load_pretrained,
    model_source,
    one_line,
    require,
    resolve_dtype,
    resolve_file,
    to_pil,
    to_uint8,
)
from ._qwen import QwenVLInputs, find_chat_template

ONE_ALIGN = "q-future/one-align"
LEVELS = ("excellent", "good", "fair", "poor", "bad")
#: Level weights: the 1–5 scale (Q-Align's MOS scale) and the 0–1 scale of its scorer code.
WEIGHTS = {"five": (5.0, 4.0, 3.0, 2.0, 1.0), "unit": (1.0, 0.75, 0.5, 0.25, 0.0)}
TASKS = {
    "quality": ("How would you rate the quality of this image?", "The quality of the image is"),
    "aesthetics": ("How would you rate the aesthetics of this image?", "The aesthetics of the image is"),
}


def level_token_ids(tokenizer: Any, answer: str, levels: Sequence[str] = LEVELS) -> list[int]:
    """Id of the first token of each level word as the model would write it right after ``answer``."""
    prefix = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = []
    for word in levels:
        full = tokenizer(f"{answer} {word}", add_special_tokens=False)["input_ids"]
        if full[: len(prefix)] == prefix and len(full) > len(prefix):
            ids.append(full[len(prefix)])
        else:  # the tokenizer merged across the boundary: fall back to the word on its own
            ids.append(tokenizer(f" {word}", add_special_tokens=False)["input_ids"][0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"the rating words share first tokens ({ids})")
    return ids


class QAlign(ModelReward):
    """Q-Align (Wu et al. 2024): image quality or aesthetics as a 1–5 mean opinion score from a
    vision-language model's probabilities for the words excellent/good/fair/poor/bad.

    Score = ``Σ softmax(logits of the 5 words)·(5, 4, 3, 2, 1)`` after the prompt "How would you rate
    the quality of this image?" and the answer start "The quality of the image is" (``task:
    aesthetics`` asks about aesthetics). ``scale: "five"`` (default) is the 1–5 scale the paper and
    OneAlign's ``score()`` report (SD3.5-M ≈ 4.7); ``scale: "unit"`` is (score − 1) / 4 in [0, 1], as
    Q-Align's scorer code returns. Higher is better; ignores the prompt.

    ``path``: a transformers vision-language checkpoint (``AutoModelForImageTextToText`` + processor
    with a chat template), or, with ``trust_remote_code: true``, the original mPLUG-Owl2 Q-Align /
    OneAlign weights (default ``q-future/one-align``), which transformers cannot load by itself.
    A 7B model: practical on a GPU only.
    """

    reward_name = "qalign"
    higher_is_better = True
    uses_prompt = False
    needs = "cuda"

    def __init__(self, path: str | None = None, *, task: Literal["quality", "aesthetics"] = "quality",
                 scale: Literal["five", "unit"] = "five", trust_remote_code: bool = False,
                 question: str | None = None, answer: str | None = None, device: str | None = "auto",
                 dtype: str = "auto", batch_size: int = 8, allow_download: bool = False) -> None:
        super().__init__(batch_size=batch_size, device=device, allow_download=allow_download)
        require(self.reward_name, "transformers", "PIL")
        if task not in TASKS:
            raise fail(self.reward_name, f"unknown task {task!r} (use quality or aesthetics)")
        if scale not in WEIGHTS:
            raise fail(self.reward_name, f"unknown scale {scale!r} (use five or unit)")
        self.task, self.scale = task, scale
        self.question = question or TASKS[task][0]
        self.answer = answer or TASKS[task][1]
        self.trust_remote_code = bool(trust_remote_code)
        self.dtype = resolve_dtype(self.reward_name, dtype, self.device, accelerator_default="bfloat16")
        self.path, is_local = model_source(self.reward_name, "model", path or ONE_ALIGN)
        key = ("qalign", self.path, self.trust_remote_code, self.device, str(self.dtype))
        self.mode, self.model, self.processor, self.qwen = cached(key, lambda: self._load(is_local))
        if self.mode == "chat":
            tokenizer = self.qwen.tokenizer if self.qwen is not None else self.processor.tokenizer
            try:
                self.level_ids = level_token_ids(tokenizer, self.answer)
            except ValueError as exc:
                raise fail(self.reward_name, f"{self.path!r}: {exc}") from None
            self.prompt_text = self._chat_text()

    # -- loading --------------------------------------------------------------------------------------
    def _raw_model_type(self, is_local: bool) -> str | None:
        """``model_type`` from the checkpoint's config.json, read without transformers (whose
        AutoConfig refuses checkpoints with custom code before telling what they are)."""
        if is_local:
            file = os.path.join(self.path, "config.json") if os.path.isdir(self.path) else None
        else:
            try:
                file = resolve_file(self.reward_name, "config", f"{self.path}/config.json", self.allow_download)
            except UserError:
                file = None
        if not file or not os.path.isfile(file):
            return None
        try:
            with open(file, encoding="utf-8") as handle:
                return json.load(handle).get("model_type")
        except (OSError, ValueError):
            return None

    def _load(self, is_local: bool) -> tuple[str, Any, Any, Any]:
        from transformers import AutoConfig

        name, allow, trc = self.reward_name, self.allow_download, self.trust_remote_code
        if self._raw_model_type(is_local) == "mplug_owl2" and not trc:
            raise fail(name, f"{self.path!r} is an mPLUG-Owl2 model (the original Q-Align/OneAlign), which "
                             "transformers does not include: set trust_remote_code: true to run the code it ships")
        config = load_pretrained(name, "model config", AutoConfig.from_pretrained, self.path, is_local, allow,
                                 trust_remote_code=trc)
        model_type = getattr(config, "model_type", "")
        if trc and model_type == "mplug_owl2":
            return self._load_remote(is_local)
        from transformers import AutoModelForImageTextToText

        model = load_pretrained(name, "model", AutoModelForImageTextToText.from_pretrained, self.path, is_local,
                                allow, dtype=self.dtype, trust_remote_code=trc)
        model = model.to(self.device).eval().requires_grad_(False)
        processor, qwen = self._load_processor(is_local, model_type)
        return "chat", model, processor, qwen

    def _load_processor(self, is_local: bool, model_type: str) -> tuple[Any, Any]:
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        name, allow = self.reward_name, self.allow_download
        try:
            processor = AutoProcessor.from_pretrained(self.path, local_files_only=not allow,
                                                      trust_remote_code=self.trust_remote_code)
        except Exception as exc:  # Qwen2-VL's processor needs torchvision (for its video processor)
            if model_type not in ("qwen2_vl", "qwen2_5_vl"):
                raise fail(name, f"cannot load the processor of {self.path!r}: {type(exc).__name__}: "
                                 f"{one_line(exc)}") from None
            processor = None
        if processor is not None and hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
            if not getattr(processor, "chat_template", None) and not getattr(processor.tokenizer, "chat_template",
                                                                             None):
                raise fail(name, f"{self.path!r} has no chat template to build the Q-Align prompt with")
            return processor, None
        if model_type not in ("qwen2_vl", "qwen2_5_vl"):
            raise fail(name, f"{self.path!r} has no image-text processor")
        tokenizer = load_pretrained(name, "tokenizer", AutoTokenizer.from_pretrained, self.path, is_local, allow)
        image_processor = load_pretrained(name, "image processor", AutoImageProcessor.from_pretrained, self.path,
                                          is_local, allow)
        template = find_chat_template(tokenizer, self.path if is_local else None)
        return None, QwenVLInputs(tokenizer, image_processor, template)

    def _load_remote(self, is_local: bool) -> tuple[str, Any, Any, Any]:
        from transformers import AutoModelForCausalLM

        model = load_pretrained(self.reward_name, "model", AutoModelForCausalLM.from_pretrained, self.path, is_local,
                                self.allow_download, dtype=self.dtype, trust_remote_code=True)
        if not callable(getattr(model, "score", None)):
            raise fail(self.reward_name, f"the remote code of {self.path!r} provides no score() method")
        return "remote", model.to(self.device).eval().requires_grad_(False), None, None

    # -- scoring --------------------------------------------------------------------------------------
    def _chat_text(self) -> str:
        if self.qwen is not None:
            return self.qwen.render(self.question) + self.answer
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}]
        renderer = self.processor if getattr(self.processor, "chat_template", None) else self.processor.tokenizer
        return renderer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + self.answer

    def _forward_parameters(self) -> set[str] | None:
        """The model's named forward arguments (``None``: it takes any keyword)."""
        parameters = inspect.signature(self.model.forward).parameters
        if any(p.kind is p.VAR_KEYWORD for p in parameters.values()) and "pixel_values" not in parameters:
            return None
        return set(parameters)

    def level_probabilities(self, images: Any) -> Any:
        """N×5 probabilities of excellent, good, fair, poor, bad (float32)."""
        import torch

        n = images.shape[0]
        if self.qwen is not None:
            inputs = self.qwen.encode(to_uint8(images), [self.prompt_text] * n)
        else:
            inputs = self.processor(text=[self.prompt_text] * n, images=to_pil(images), padding=True,
                                    return_tensors="pt")
        accepted = self._forward_parameters()
        inputs = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in inputs.items()
                  if accepted is None or k in accepted}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            logits = self.model(**inputs, use_cache=False).logits
            mask = inputs["attention_mask"]
            last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # the last real token, whichever side pads
            picked = logits[torch.arange(n, device=logits.device), last][:, self.level_ids].float()
            return picked.softmax(dim=-1)

    def score(self, images: Any, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> Any:
        import torch

        if self.mode == "remote":
            with torch.inference_mode():
                five = torch.as_tensor(self.model.score(to_pil(images), task_=self.task, input_="image")).float()
            return five.reshape(-1) if self.scale == "five" else (five.reshape(-1) - 1.0) / 4.0
        weights = torch.tensor(WEIGHTS[self.scale], device=self.device)
        return self.level_probabilities(images) @ weights
