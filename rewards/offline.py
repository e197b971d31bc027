"""Classical image rewards that need no weights and run anywhere (CPU, no download).

Each is a :class:`~calibri.rewards.base.Reward` registered under a short name:

==================== ================================================ ============ =========
name                 measures                                         range        better
==================== ================================================ ============ =========
sharpness            variance of the Laplacian of the luma (0–255)    [0, 1020²]   higher
colorfulness         Hasler–Süsstrunk colourfulness M (0–255 units)   [0, ~469]    higher
contrast             RMS contrast: std of the luma (0–1)              [0, 0.5]     higher
entropy              Shannon entropy of the 256-bin luma histogram    [0, 8] bits  higher
jpeg_compressibility −(JPEG size in kB) / 500 at quality 95 (DDPO)    (−∞, 0)      higher
total_variation      mean |Δ| between neighbouring pixels (0–1)       [0, 2]       lower
brightness           mean luma (0–1)                                  [0, 1]       higher
color_match          share of pixels in the colour named by the       [0, 1]       higher
                     prompt (prompt-aware)
==================== ================================================ ============ =========

The same hook also registers ``combined`` (:func:`calibri.rewards.combine.combined`): a
weighted combination of any registered rewards, raw or standardised.

They are cheap proxies — useful as demo objectives, in tests and as regularisers next to a
learned reward (e.g. ``total_variation`` against noise, ``jpeg_compressibility`` as in DDPO) —
not measures of aesthetic quality; every one of them can be "hacked" by a generator that
optimises it alone (noise scores high on sharpness, entropy and colourfulness).

"Luma" throughout is Rec. 601 ``Y = 0.299 R + 0.587 G + 0.114 B`` on the [0, 1] canonical
values, the weights PIL's ``convert("L")`` and OpenCV's ``RGB2GRAY`` use (not rounded here
unless stated). A grayscale input is expanded to three equal channels, so it scores exactly as
the same image in RGB.

Computation is vectorised over the batch in numpy float64, and every per-image reduction runs
over that image alone, so a score does not depend on which other images share its batch or on
``batch_size``. Importing this module imports neither torch nor PIL (it is loaded whenever the
plugin registry is built); they are imported on first use.
"""
from __future__ import annotations

import io
import re
from typing import Any

import numpy as np

from ..core.hookspecs import hookimpl
from .base import Reward

#: Rec. 601 luma weights, as integers over 1000 so that R = G = B = 1 gives exactly 1.
_LUMA = (299.0, 587.0, 114.0)


# -- shared helpers ------------------------------------------------------------------------------
def _pixels(images: Any) -> np.ndarray:
    """A canonical batch (N×3×H×W float in [0, 1]) as a float64 numpy array."""
    array = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if array.ndim != 4 or array.shape[1] != 3 or array.shape[2] < 1 or array.shape[3] < 1:
        raise ValueError(f"expected a canonical batch N×3×H×W, got shape {tuple(array.shape)}")
    return array.astype(np.float64)


def _luma(pixels: np.ndarray) -> np.ndarray:
    """N×3×H×W → N×H×W luma in [0, 1]."""
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b) / 1000.0


def _flat(values: np.ndarray) -> np.ndarray:
    """N×… → a C-contiguous N×M array, so reductions along axis 1 run per image."""
    return np.ascontiguousarray(values.reshape(values.shape[0], -1))


def _mean(values: np.ndarray) -> np.ndarray:
    return _flat(values).mean(axis=1)


def _var(values: np.ndarray) -> np.ndarray:
    """Per-image population variance.

    Values are shifted by each image's first value first (variance is shift-invariant): a
    constant image then gives exactly 0, and large offsets lose no precision.
    """
    flat = _flat(values)
    return (flat - flat[:, :1]).var(axis=1)


def _std(values: np.ndarray) -> np.ndarray:
    return np.sqrt(_var(values))


def _second_difference(values: np.ndarray, axis: int) -> np.ndarray:
    """``v[i-1] - 2 v[i] + v[i+1]`` along ``axis``, mirrored at the border without repeating the
    edge (OpenCV's default ``BORDER_REFLECT_101``); zero along an axis of length 1."""
    n = values.shape[axis]
    if n == 1:
        return np.zeros_like(values)
    index = np.arange(n)
    before = np.take(values, np.abs(index - 1), axis=axis)  # index -1 → 1
    after = np.take(values, (n - 1) - np.abs((n - 1) - (index + 1)), axis=axis)  # index n → n - 2
    # (before - v) + (after - v): a constant region gives exactly 0.
    return (before - values) + (after - values)


# -- the rewards ---------------------------------------------------------------------------------
class Sharpness(Reward):
    """Sharpness: variance of the Laplacian of the luma; 0 for a flat image, higher is sharper.

    The luma is taken on the 0–255 scale and filtered with the 4-neighbour Laplacian kernel
    ``[[0, 1, 0], [1, -4, 1], [0, 1, 0]]`` with mirrored borders, and the score is the population
    variance of the result over the image (Pech-Pacheco et al., "Diatom autofocusing in
    brightfield microscopy", ICPR 2000). This matches the common
    ``cv2.Laplacian(gray, cv2.CV_64F).var()`` recipe up to OpenCV's rounding of ``gray`` to
    integers, so that recipe's usual rule of thumb (below ~100: blurry, for 8-bit photographs)
    carries over roughly. Range [0, 1020²], the maximum reached by a one-pixel black-and-white
    checkerboard; the value grows with noise as much as with detail, and depends on resolution
    (downscaling an image raises it).
    """

    higher_is_better = True
    uses_prompt = False
    needs = "cpu"

    def score(self, images, prompts, metadata):
        luma = _luma(_pixels(images)) * 255.0
        laplacian = _second_difference(luma, axis=1) + _second_difference(luma, axis=2)
        return _var(laplacian)


class Colorfulness(Reward):
    """Colourfulness M of Hasler & Süsstrunk: 0 for any grey image, higher is more colourful.

    On the 0–255 scale, with ``rg = R − G`` and ``yb = (R + G) / 2 − B`` over all pixels,
    ``M = sqrt(σ_rg² + σ_yb²) + 0.3 · sqrt(μ_rg² + μ_yb²)`` (D. Hasler and S. Süsstrunk,
    "Measuring colourfulness in natural images", SPIE Human Vision and Electronic Imaging, 2003).
    Range [0, 1.3·√2·255 ≈ 469] (uniform RGB noise scores about 138); the paper's perceptual
    anchors are about 15 (slightly colourful), 33 (moderately), 45 (averagely), 59 (quite), 82
    (highly) and 109 (extremely).
    """

    higher_is_better = True
    uses_prompt = False
    needs = "cpu"

    def score(self, images, prompts, metadata):
        pixels = _pixels(images) * 255.0
        r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
        rg = r - g
        yb = 0.5 * (r + g) - b
        spread = np.sqrt(_var(rg) + _var(yb))
        centre = np.sqrt(_mean(rg) ** 2 + _mean(yb) ** 2)
        return spread + 0.3 * centre


class Contrast(Reward):
    """RMS contrast: the standard deviation of the luma in [0, 1]; 0 for a flat image.

    Peli, "Contrast in complex images", JOSA A 7(10), 1990. Range [0, 0.5] (0.5 for an image
    half black, half white); higher is more contrast. Global: it does not see local contrast.
    """

    higher_is_better = True
    uses_prompt = False
    needs = "cpu"

    def score(self, images, prompts, metadata):
        return _std(_luma(_pixels(images)))


class Entropy(Reward):
    """Shannon entropy (bits) of the luma histogram: 0 for a flat image, 8 at most.

    The luma (on [0, 1]) is quantised to 256 levels, ``round(255 · Y)``, and the score is
    ``−Σ p log2 p`` over the histogram — what ``PIL.Image.entropy()`` computes on the ``"L"``
    image up to PIL's rounding of the luma. Range [0, min(8, log2(H·W))]; higher means more
    distinct grey levels used evenly. It ignores where pixels are: shuffling them keeps it.
    """

    higher_is_better = True
    uses_prompt = False
    needs = "cpu"

    def score(self, images, prompts, metadata):
        luma = _flat(_luma(_pixels(images)))
        n, m = luma.shape
        levels = np.clip(np.rint(luma * 255.0), 0, 255).astype(np.int64)
        counts = np.bincount((levels + 256 * np.arange(n)[:, None]).ravel(), minlength=256 * n)
        p = counts.reshape(n, 256).astype(np.float64) / m
        terms = np.zeros_like(p)
        np.multiply(p, np.log2(p, where=p > 0, out=np.zeros_like(p)), out=terms, where=p > 0)
        return np.maximum(-terms.sum(axis=1), 0.0)  # no −0.0


class JpegCompressibility(Reward):
    """JPEG compressibility as in DDPO and Flow-GRPO: ``−(JPEG size in kB) / 500``; higher (closer
    to 0) is more compressible.

    Each image is rounded to 8 bits (``round(255 · x)``), encoded by PIL as a JPEG at
    ``quality=95`` (PIL's other defaults: 4:2:0 chroma subsampling, no ``optimize``), and its size
    in kB (1000 bytes) divided by 500 and negated (Black et al., "Training diffusion models with
    reinforcement learning", ICLR 2024; Flow-GRPO's ``jpeg_compressibility``). Range (−∞, 0); at
    512² a flat image scores about −0.01 and uniform RGB noise about −0.6. Needs Pillow.
    The size depends on the resolution, so compare images of one size. Per image (no batching).
    """

    higher_is_better = True
    uses_prompt = False
    needs = "cpu"

    def __init__(self, batch_size: int = 16, device: str = "cpu", quality: int = 95) -> None:
        super().__init__(batch_size=batch_size, device=device)
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must lie in [1, 100], got {quality}")
        self.quality = quality

    def score(self, images, prompts, metadata):
        from PIL import Image

        pixels = _pixels(images)
        as_uint8 = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        sizes = []
        for array in as_uint8:
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000.0)
        return -np.asarray(sizes, dtype=np.float64) / 500.0


class TotalVariation(Reward):
    """Total variation per pixel: the mean absolute difference between vertically neighbouring
    pixels plus that between horizontally neighbouring ones, over the three channels in [0, 1].

    An anisotropic discretisation of the total variation (the regulariser of Rudin, Osher &
    Fatemi, Physica D 60, 1992), normalised by the number of neighbour pairs so it does not grow
    with resolution. Range [0, 2]: 0 for a flat image, 2 for a
    one-pixel black/white checkerboard. **Lower is better** (smoother): ``higher_is_better`` is
    False and the raw TV is returned, not negated; :class:`~calibri.rewards.combine.CombinedReward`
    negates it in a total. A direction along which the image is one pixel wide contributes 0.
    """

    higher_is_better = False
    uses_prompt = False
    needs = "cpu"

    def score(self, images, prompts, metadata):
        pixels = _pixels(images)
        n = pixels.shape[0]
        total = np.zeros(n)
        if pixels.shape[2] > 1:
            total += _mean(np.abs(pixels[:, :, 1:, :] - pixels[:, :, :-1, :]))
        if pixels.shape[3] > 1:
            total += _mean(np.abs(pixels[:, :, :, 1:] - pixels[:, :, :, :-1]))
        return total


class Brightness(Reward):
    """Mean luma in [0, 1]: 0 for black, 1 for white; higher is brighter.

    A trivially predictable reward for demos and tests (an optimiser should find the brightest
    setting), not a quality measure.
    """

    higher_is_better = True
    uses_prompt = False
    needs = "cpu"

    def score(self, images, prompts, metadata):
        return np.clip(_mean(_luma(_pixels(images))), 0.0, 1.0)


#: The eleven basic colour terms (Berlin & Kay, 1969), each with prototypes: CSS named colours
#: (CSS Color Module Level 4 sRGB values) of that colour family.
COLOR_PROTOTYPES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((255, 0, 0), (220, 20, 60), (178, 34, 34), (139, 0, 0), (255, 99, 71)),
    "orange": ((255, 165, 0), (255, 140, 0), (255, 127, 80)),
    "yellow": ((255, 255, 0), (255, 215, 0), (240, 230, 140), (255, 255, 224)),
    "green": ((0, 128, 0), (0, 255, 0), (50, 205, 50), (34, 139, 34), (0, 100, 0), (144, 238, 144),
              (128, 128, 0), (46, 139, 87)),
    "blue": ((0, 0, 255), (0, 0, 128), (30, 144, 255), (135, 206, 235), (70, 130, 180), (0, 255, 255),
             (0, 128, 128), (65, 105, 225)),
    "purple": ((128, 0, 128), (75, 0, 130), (238, 130, 238), (255, 0, 255), (147, 112, 219)),
    "pink": ((255, 192, 203), (255, 105, 180), (219, 112, 147), (255, 20, 147)),
    "brown": ((139, 69, 19), (165, 42, 42), (160, 82, 45), (210, 105, 30), (128, 0, 0), (210, 180, 140),
              (222, 184, 135)),
    "black": ((0, 0, 0), (28, 28, 28)),
    "grey": ((128, 128, 128), (169, 169, 169), (192, 192, 192), (80, 80, 80), (112, 128, 144)),
    "white": ((255, 255, 255), (245, 245, 220), (240, 248, 255), (255, 250, 240)),
}

#: Words in prompts that name a colour family.
COLOR_WORDS: dict[str, str] = {
    **{name: name for name in COLOR_PROTOTYPES},
    "gray": "grey", "violet": "purple", "magenta": "purple", "cyan": "blue", "turquoise": "blue",
}

_COLOR_PATTERN = re.compile(r"\b(" + "|".join(sorted(COLOR_WORDS, key=len, reverse=True)) + r")\b")


def colors_in(prompt: str) -> list[str]:
    """The colour families named in ``prompt`` (lower-cased whole words), in order, without repeats."""
    found = [COLOR_WORDS[word] for word in _COLOR_PATTERN.findall(prompt.lower())]
    return list(dict.fromkeys(found))


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1], channels on axis 1 → CIELAB (D65 white), channels on axis 1."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    r, g, b = linear[:, 0], linear[:, 1], linear[:, 2]
    x = (0.4124564 * r + 0.3575761 * g + 0.1804375 * b) / 0.95047
    y = 0.2126729 * r + 0.7151522 * g + 0.0721750 * b
    z = (0.0193339 * r + 0.1191920 * g + 0.9503041 * b) / 1.08883
    delta = 6.0 / 29.0

    def f(t: np.ndarray) -> np.ndarray:
        return np.where(t > delta ** 3, np.cbrt(t), t / (3 * delta ** 2) + 4.0 / 29.0)

    fx, fy, fz = f(x), f(y), f(z)
    return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=1)


def _prototype_table() -> tuple[np.ndarray, np.ndarray, list[str]]:
    families = list(COLOR_PROTOTYPES)
    rgb = np.array([c for name in families for c in COLOR_PROTOTYPES[name]], dtype=np.float64) / 255.0
    owner = np.array([i for i, name in enumerate(families) for _ in COLOR_PROTOTYPES[name]])
    lab = _srgb_to_lab(rgb.reshape(-1, 3, 1, 1)).reshape(-1, 3)
    return lab, owner, families


_PROTOTYPES_LAB, _PROTOTYPE_FAMILY, _FAMILIES = _prototype_table()


class ColorMatch(Reward):
    """How much of the image is in the colour the prompt names: the share of pixels whose nearest
    colour prototype belongs to a colour word of the prompt. Range [0, 1]; higher is better.

    Prompt-aware. The colour words are the eleven basic colour terms (red, orange, yellow, green,
    blue, purple, pink, brown, black, grey, white; also gray, violet, magenta, cyan, turquoise),
    matched as whole words; with several, a pixel counts if it is in any of them. Each pixel is
    given the family of its nearest prototype in CIELAB, the prototypes being CSS named colours
    grouped into those eleven families (:data:`COLOR_PROTOTYPES`). The image is first
    area-averaged to at most ``size`` pixels per side (0 keeps the full resolution), which makes
    the score about the dominant colours rather than single pixels, and cheap.

    A hand-made classifier for demos and tests (e.g. "a red apple": does the optimiser make the
    image red?), not a learned image–text model: it knows nothing about objects, so a prompt's
    background colour counts as much as the subject's. A prompt without a colour word scores
    ``no_color_score`` (default 0).
    """

    higher_is_better = True
    uses_prompt = True
    needs = "cpu"

    def __init__(self, batch_size: int = 16, device: str = "cpu", size: int = 64,
                 no_color_score: float = 0.0) -> None:
        super().__init__(batch_size=batch_size, device=device)
        if size < 0:
            raise ValueError(f"size must be 0 (full resolution) or positive, got {size}")
        self.size = size
        self.no_color_score = float(no_color_score)

    def families(self, images: Any) -> np.ndarray:
        """The colour-family index (into :data:`COLOR_PROTOTYPES`' order) of every analysed pixel,
        N×h×w, of a canonical batch."""
        if self.size and max(images.shape[-2:]) > self.size:
            import torch
            import torch.nn.functional as F

            images = torch.as_tensor(images)
            h, w = images.shape[-2:]
            scale = self.size / max(h, w)
            target = (max(1, round(h * scale)), max(1, round(w * scale)))
            images = F.adaptive_avg_pool2d(images.float(), target)
        lab = _srgb_to_lab(_pixels(images))
        best = np.full(lab.shape[:1] + lab.shape[2:], np.inf)
        family = np.zeros(best.shape, dtype=np.int64)
        for prototype, owner in zip(_PROTOTYPES_LAB, _PROTOTYPE_FAMILY):
            distance = ((lab[:, 0] - prototype[0]) ** 2 + (lab[:, 1] - prototype[1]) ** 2
                        + (lab[:, 2] - prototype[2]) ** 2)
            closer = distance < best
            best = np.where(closer, distance, best)
            family = np.where(closer, owner, family)
        return family

    def score(self, images, prompts, metadata):
        _pixels(images[:0])  # checks the shape even when no prompt names a colour
        wanted = [colors_in(prompt) for prompt in prompts]
        scores = np.full(len(prompts), self.no_color_score, dtype=np.float64)
        rows = [i for i, names in enumerate(wanted) if names]
        if not rows:
            return scores
        family = _flat(self.families(images[rows]))
        for row, labels in zip(rows, family):
            targets = [_FAMILIES.index(name) for name in wanted[row]]
            scores[row] = np.isin(labels, targets).mean()
        return scores


#: Registry name → reward class, in the order they are registered.
OFFLINE_REWARDS: dict[str, type[Reward]] = {
    "sharpness": Sharpness,
    "colorfulness": Colorfulness,
    "contrast": Contrast,
    "entropy": Entropy,
    "jpeg_compressibility": JpegCompressibility,
    "total_variation": TotalVariation,
    "brightness": Brightness,
    "color_match": ColorMatch,
}


@hookimpl
def calibri_register_rewards(register):
    from .combine import combined

    for name, factory in OFFLINE_REWARDS.items():
        register(name, factory)
    # The combination of any registered rewards (calibri.rewards.combine), by spec.
    register("combined", combined)


__all__ = [
    "COLOR_PROTOTYPES", "COLOR_WORDS", "OFFLINE_REWARDS", "Brightness", "ColorMatch", "Colorfulness",
    "Contrast", "Entropy", "JpegCompressibility", "Sharpness", "TotalVariation", "colors_in",
]
