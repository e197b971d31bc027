"""The reward contract: score a batch of images (with their prompts) → one float per image.

Canonical image form: a float32 ``torch.Tensor`` N×3×H×W with values in [0, 1] on the CPU (the
form Flow-GRPO's rewards take). :func:`to_canonical` converts, once per call, from a list of PIL
images, a uint8 or float numpy array N×H×W×3 (or a list of H×W×3 arrays), or a tensor N×3×H×W
(uint8 0–255 or float 0–1). Rewards implement :meth:`Reward.score` on canonical batches; callers
use :meth:`Reward.__call__`, which converts, checks and splits into ``batch_size`` chunks.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np


def to_canonical(images: Any) -> "torch.Tensor":  # noqa: F821 - torch imported lazily
    """Images in any accepted form → float32 N×3×H×W in [0, 1] (CPU). Raises ``ValueError``."""
    import torch

    if isinstance(images, torch.Tensor):
        tensor = images.detach().cpu()
        if tensor.dim() == 3:
            tensor = tensor.unsqueeze(0)
        if tensor.dim() != 4:
            raise ValueError(f"expected images N×C×H×W, got a tensor of shape {tuple(tensor.shape)}")
        if tensor.shape[1] not in (1, 3) and tensor.shape[-1] in (1, 3):
            tensor = tensor.permute(0, 3, 1, 2)
        if tensor.shape[1] not in (1, 3):
            raise ValueError(f"expected images with 1 or 3 channels, got a tensor of shape {tuple(tensor.shape)}")
        if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
            raise ValueError(f"expected uint8 or float images, got dtype {tensor.dtype}")
        tensor = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
    else:
        if isinstance(images, np.ndarray):
            array = images
        else:
            if not isinstance(images, Sequence) or isinstance(images, (str, bytes)) or not len(images):
                raise ValueError("expected a non-empty batch of images (PIL images, arrays or a tensor)")
            array = np.stack([_as_hwc(image) for image in images])
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] not in (1, 3):
            raise ValueError(f"expected images N×H×W×3, got an array of shape {array.shape}")
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        elif not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"expected uint8 or float images, got dtype {array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(0, 3, 1, 2)
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    if tensor.shape[0] == 0:
        raise ValueError("the batch holds no images")
    if tensor.numel() == 0:
        raise ValueError(f"images must be at least 1×1 pixels, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError("images contain NaN or infinite values")
    if tensor.min() < 0.0 or tensor.max() > 1.0:
        raise ValueError(f"float images must lie in [0, 1], got [{tensor.min().item():.3g}, {tensor.max().item():.3g}]")
    return tensor.contiguous()


def batch_text(n: int, prompts: Sequence[str] | None,
               metadata: Sequence[Mapping[str, Any]] | None) -> tuple[list[str], list[Mapping[str, Any]]]:
    """Prompts and metadata as lists of ``n`` (empty defaults), checked against the image count."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, one per image, not a single string")
    prompts = list(prompts) if prompts is not None else [""] * n
    metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
    if len(prompts) != n or len(metadata) != n:
        raise ValueError(f"{n} images but {len(prompts)} prompts and {len(metadata)} metadata entries")
    return prompts, metadata


def _as_hwc(image: Any) -> np.ndarray:
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    return array


class Reward(ABC):
    """An image reward. Subclasses set the class attributes and implement :meth:`score`.

    Models load once (in ``__init__`` or on first use) and are reused across calls.
    """

    #: Higher scores are better: a run maximises the reward, else minimises it. Usually a class
    #: attribute; an instance's own where it depends on what the reward was built from (a
    #: combination, a remote reward).
    higher_is_better: bool = True
    #: Whether the score depends on the prompt (text-image alignment) or on the image alone.
    uses_prompt: ClassVar[bool] = False
    #: Whether the reward needs an accelerator to be practical ("cpu" rewards run anywhere).
    needs: ClassVar[str] = "cpu"

    def __init__(self, batch_size: int = 16, device: str = "cpu") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = device

    @abstractmethod
    def score(self, images: "torch.Tensor", prompts: Sequence[str],  # noqa: F821
              metadata: Sequence[Mapping[str, Any]]) -> Sequence[float] | np.ndarray:
        """Scores of one canonical batch (at most ``batch_size`` images)."""

    def __call__(self, images: Any, prompts: Sequence[str] | None = None,
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        """float64 scores, one per image; batches of ``batch_size``."""
        canonical = to_canonical(images)
        n = canonical.shape[0]
        prompts, metadata = batch_text(n, prompts, metadata)
        scores = []
        for start in range(0, n, self.batch_size):
            stop = start + self.batch_size
            chunk = np.asarray(_to_numpy(self.score(canonical[start:stop], prompts[start:stop], metadata[start:stop])),
                               dtype=np.float64).reshape(-1)
            if chunk.shape[0] != min(stop, n) - start:
                raise RuntimeError(f"{type(self).__name__}.score returned {chunk.shape[0]} scores for "
                                   f"{min(stop, n) - start} images")
            scores.append(chunk)
        return np.concatenate(scores)


def _to_numpy(values: Any) -> Any:
    if hasattr(values, "detach"):
        return values.detach().float().cpu().numpy()
    return values
