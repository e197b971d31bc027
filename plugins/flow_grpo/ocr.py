"""Flow-GRPO's ``ocr`` reward: how well the text an OCR engine reads matches the prompt's quoted text.

The target is the text between the first pair of double quotes of the prompt (``a sign that says
"OPEN"`` → ``OPEN``). Both it and the recognised text are compared without whitespace and
case-insensitively; the distance is 0 when the target appears inside the recognised text, else
their Levenshtein distance, capped at the target's length. The score is
``1 − distance / len(target)``, in [0, 1]. A prompt without a quoted, non-blank text cannot be
scored: it is an error naming the prompt, raised before the engine runs.

The engine is injectable: ``ocr_engine`` is a callable, or ``"module:function"`` naming one, that
takes one H×W×3 uint8 RGB image (Flow-GRPO's ``round(255 · x)``) and returns the recognised text
(a string; or a list of strings, joined). Without it, PaddleOCR is used if it is installed (text
lines with a positive confidence, joined); otherwise building the reward is a one-line error.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from calibri.core.errors import IMPORT_HINT
from calibri.rewards.base import Reward

from .servers import to_uint8

Engine = Callable[[np.ndarray], Any]


def quoted_text(prompt: str) -> str | None:
    """The text between the prompt's first pair of double quotes, or None."""
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 else None


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _normal(text: str) -> str:
    return "".join(text.split()).lower()


def ocr_score(recognised: str, target: str) -> float:
    """``1 − min(distance, len) / len`` on whitespace-free, lower-cased texts (see the module)."""
    want, got = _normal(target), _normal(recognised)
    if not want:
        raise ValueError(f"the quoted text {target!r} is blank: nothing to read")
    distance = 0 if want in got else min(levenshtein(got, want), len(want))
    return 1.0 - distance / len(want)


def resolve_engine(engine: Any, what: str = "ocr_engine") -> Engine:
    """A callable engine from ``engine`` (a callable, ``"module:function"``, or None: PaddleOCR)."""
    if callable(engine):
        return engine
    if engine is None:
        return _paddle_engine(what)
    if not isinstance(engine, str) or engine.count(":") != 1 or not all(engine.split(":")):
        raise ValueError(f"{what} must be a callable or 'module:function', got {engine!r}")
    module_name, name = engine.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what}: cannot import module {module_name!r} ({exc}); {IMPORT_HINT}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{what}: module {module_name!r} has no callable {name!r}")
    return function


def _paddle_engine(what: str) -> Engine:
    try:
        from paddleocr import PaddleOCR  # type: ignore[import-not-found]
    except ImportError:
        raise ValueError(f"{what}: no OCR engine: install paddleocr, or give ocr_engine: 'module:function' (a "
                         "function of one H×W×3 uint8 image returning the text it reads)") from None
    reader = PaddleOCR(use_angle_cls=False, lang="en")

    def read(image: np.ndarray) -> str:
        result = reader.ocr(image, cls=False)
        lines = (result or [None])[0] or []
        return "".join(text for _, (text, confidence) in lines if confidence > 0)

    return read


class OCRReward(Reward):
    """Flow-GRPO's OCR reward: 1 − edit distance / length to the prompt's quoted text, in [0, 1]."""

    higher_is_better = True
    uses_prompt = True
    needs = "cpu"

    def __init__(self, ocr_engine: Any = None, batch_size: int = 16, device: str = "cpu") -> None:
        super().__init__(batch_size=batch_size, device=device)
        self.engine = resolve_engine(ocr_engine)

    def score(self, images: Any, prompts: Sequence[str], metadata: Sequence[Any]) -> np.ndarray:
        targets = []
        for prompt in prompts:
            target = quoted_text(prompt)
            if target is None or not target.strip():
                raise ValueError(f"the ocr reward needs the text to render in double quotes in the prompt, as "
                                 f"in Flow-GRPO's OCR sets; got {prompt!r}")
            targets.append(target)
        scores = []
        for pixels, target in zip(to_uint8(images), targets):
            recognised = self.engine(pixels)
            if isinstance(recognised, (list, tuple)):
                recognised = "".join(str(part) for part in recognised)
            if not isinstance(recognised, str):
                raise TypeError(f"the OCR engine returned a {type(recognised).__name__}, not the text it read")
            scores.append(ocr_score(recognised, target))
        return np.asarray(scores, dtype=np.float64)


def check_ocr_prompts(prompts: list[str], metadata: list[Any], field: str) -> None:
    """Refuse, before any image is made, a prompt without quoted text (the ``ocr`` reward's target)."""
    from calibri.core.errors import ConfigError

    for number, prompt in enumerate(prompts, start=1):
        target = quoted_text(prompt)
        if target is None or not target.strip():
            raise ConfigError(field, f"prompt {number} ({prompt!r}) has no text in double quotes for the ocr "
                                     "reward to read")


OCRReward.check_prompts = staticmethod(check_ocr_prompts)  # type: ignore[attr-defined]

__all__ = ["OCRReward", "check_ocr_prompts", "levenshtein", "ocr_score", "quoted_text", "resolve_engine"]
