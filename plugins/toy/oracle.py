"""The oracle reward of the toy world: checks an image against its prompt with code.

Five terms, each in [0, 1]:

* ``colour``   — the painted pixels' mean colour against the prompt's colour;
* ``shape``    — IoU of the painted region with the prompt's shape fitted at the same centre and
  area, and how much better that shape fits than the best other one;
* ``position`` — distance of the painted region's centre from the prompt's position;
* ``size``     — the radius implied by the painted area against the prompt's size range;
* ``clean``    — no stray paint or noise outside the shape, a uniform colour inside.

The reward is their geometric mean: a product cannot be gamed by trading one term for another
(a weighted sum could — CMA-ES will find such trades), and an image missing any one property
scores near zero. Ground-truth renders score about 0.95; pure noise and empty canvases about 0.
Every position term can fail (five positions seven pixels apart), so each carries signal.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from calibri.rewards.base import Reward, batch_text, to_canonical

from .world import BACKGROUND, COLOURS, POSITIONS, SHAPES, SIZES, Scene, area_per_radius2, parse_prompt, shape_mask

TERMS = ("colour", "shape", "position", "size", "clean")
_FG_LOW = 0.12  # a pixel this far from the background colour (per-channel RMS) is painted


def _scene_of(prompt: str, meta: Mapping[str, Any]) -> Scene:
    if all(key in meta for key in ("size", "colour", "shape", "position")):
        scene = Scene(str(meta["size"]), str(meta["colour"]), str(meta["shape"]), str(meta["position"]))
        if scene.size in SIZES and scene.colour in COLOURS and scene.shape in SHAPES and scene.position in POSITIONS:
            return scene
    return parse_prompt(prompt)


def score_terms(image: np.ndarray, scene: Scene) -> dict[str, float]:
    """The five terms and the reward for one H×W×3 image in [0, 1]."""
    size = image.shape[0]
    scale = size / 32.0
    background = np.asarray(BACKGROUND)
    distance = np.sqrt(((image - background) ** 2).mean(axis=-1))
    zero = dict.fromkeys((*TERMS, "reward"), 0.0)
    painted = distance > _FG_LOW
    if painted.sum() < 4.0 * scale * scale:
        return zero
    # The paint colour: the most distinct pixels; each pixel's coverage is its projection on the
    # background→paint line, so anti-aliased edges count by their share (not as whole pixels).
    strongest = distance >= 0.7 * np.percentile(distance[painted], 90)
    paint = image[strongest].mean(axis=0) - background
    weight = np.clip(((image - background) @ paint) / max(float(paint @ paint), 1e-9), 0.0, 1.0)
    weight = weight * (distance > _FG_LOW / 2)
    mass = float(weight.sum())
    if mass < 4.0 * scale * scale:
        return zero
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    cx, cy = float((weight * xs).sum() / mass), float((weight * ys).sum() / mass)

    fits = {}
    for shape in SHAPES:
        radius = np.sqrt(mass / area_per_radius2(shape)) / scale
        template = shape_mask(shape, cx / scale, cy / scale, radius, 32)
        if size != 32:
            template = np.kron(template, np.ones((int(scale), int(scale))))[:size, :size]
        iou = float(np.minimum(weight, template).sum() / max(np.maximum(weight, template).sum(), 1e-9))
        fits[shape] = (iou, radius, template)
    iou, radius, template = fits[scene.shape]
    best_other = max(v[0] for k, v in fits.items() if k != scene.shape)
    shape_term = float(np.clip((iou - 0.5) / 0.4, 0.0, 1.0) * np.clip(0.5 + (iou - best_other) / 0.08, 0.0, 1.0))

    inside = _erode(template > 0.99)
    core = weight * inside
    mean_colour = ((image * core[..., None]).sum(axis=(0, 1)) / max(core.sum(), 1e-9)) if core.sum() > 1 else \
        (image * weight[..., None]).sum(axis=(0, 1)) / mass
    colour_error = float(np.linalg.norm(mean_colour - np.asarray(COLOURS[scene.colour])))
    colour_term = float(np.exp(-((colour_error / 0.2) ** 2)))

    _, px, py = POSITIONS[scene.position]
    offset = float(np.hypot(cx / scale - px, cy / scale - py))
    position_term = float(np.exp(-0.5 * (max(offset - 1.5, 0.0) / 2.0) ** 2))

    low, high = SIZES[scene.size]
    outside_range = max(low - 0.3 - radius, radius - high - 0.3, 0.0)
    size_term = float(np.exp(-0.5 * (outside_range / 0.8) ** 2))

    halo = _dilate(template > 0.01, int(round(1 * scale)))
    outside = ~halo
    noise = float(distance[outside].mean()) if outside.any() else 0.0
    spread = float(np.sqrt(((image[inside] - mean_colour) ** 2).sum(axis=-1).mean())) if inside.any() else 1.0
    clean_term = float(np.exp(-max(noise - 0.01, 0.0) / 0.03) * np.exp(-max(spread - 0.03, 0.0) / 0.12))

    terms = {"colour": colour_term, "shape": shape_term, "position": position_term, "size": size_term,
             "clean": clean_term}
    terms["reward"] = float(np.prod([max(v, 0.0) for v in terms.values()]) ** (1.0 / len(TERMS)))
    return terms


def _erode(mask: np.ndarray) -> np.ndarray:
    """One-pixel erosion, or the mask itself if that would leave nothing."""
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out if out.sum() >= 2 else mask


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


class ToyOracle(Reward):
    """The toy world's oracle reward (see the module docstring); higher is better, in [0, 1].

    Reads each image's scene from its metadata (``size``, ``colour``, ``shape``, ``position``) or,
    failing that, parses its prompt; a prompt outside the toy world is an error.
    ``term`` selects one term instead of the geometric mean (e.g. to watch cleanliness alone).
    """

    uses_prompt = True

    def __init__(self, term: str = "reward", batch_size: int = 256, device: str = "cpu") -> None:
        super().__init__(batch_size=batch_size, device=device)
        if term not in (*TERMS, "reward"):
            raise ValueError(f"unknown term {term!r} (known: reward, {', '.join(TERMS)})")
        self.term = term

    def score(self, images: Any, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return self.score_with_terms(images, prompts, metadata)[self.term]

    def score_with_terms(self, images: Any, prompts: Sequence[str],
                         metadata: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Every term (and the reward) for a canonical batch, as arrays."""
        array = images.permute(0, 2, 3, 1).numpy().astype(np.float64)
        rows = [score_terms(array[i], _scene_of(prompts[i], metadata[i])) for i in range(array.shape[0])]
        return {key: np.asarray([row[key] for row in rows]) for key in (*TERMS, "reward")}

    def score_with_details(self, images: Any, prompts: Sequence[str] | None = None,
                           metadata: Sequence[Mapping[str, Any]] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(scores, terms)``: the selected score per image and each term's per-image values."""
        canonical = to_canonical(images)
        prompts, metadata = batch_text(canonical.shape[0], prompts, metadata)
        terms = self.score_with_terms(canonical, prompts, metadata)
        return terms[self.term], {key: terms[key] for key in TERMS}
