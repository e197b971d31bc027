"""The toy world: one coloured shape on a dark canvas, described by a short prompt.

A scene has a size, a colour, a shape and a position; :func:`render` draws it (anti-aliased,
32×32 by default) and :func:`prompt_of` / :func:`parse_prompt` map it to and from text such as
``"a small red circle on the left"``. The domain is small enough for a DiT to learn on a CPU in
minutes and rich enough that few-step sampling visibly fails (blurred shapes, wrong colours,
stray paint), which is what a calibration can fix. The oracle reward that checks an image
against its prompt is in :mod:`calibri.plugins.toy.oracle`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import product

import numpy as np

IMAGE_SIZE = 32
#: The canvas colour (RGB in [0, 1]).
BACKGROUND = (0.06, 0.06, 0.09)
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.15, 0.78, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.12),
    "magenta": (0.88, 0.15, 0.85),
    "cyan": (0.12, 0.85, 0.88),
    "orange": (0.98, 0.55, 0.08),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle", "cross")
#: Radius ranges (pixels on a 32×32 canvas) of the two sizes.
SIZES: dict[str, tuple[float, float]] = {"small": (4.0, 5.0), "large": (7.0, 8.0)}
#: Position name → (phrase, centre x, centre y) on a 32×32 canvas; centres jitter by ±1 pixel.
POSITIONS: dict[str, tuple[str, float, float]] = {
    "left": ("on the left", 9.0, 16.0),
    "right": ("on the right", 23.0, 16.0),
    "top": ("at the top", 16.0, 9.0),
    "bottom": ("at the bottom", 16.0, 23.0),
    "center": ("in the center", 16.0, 16.0),
}
JITTER = 1.0
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    size: str
    colour: str
    shape: str
    position: str

    def as_metadata(self) -> dict[str, str]:
        return asdict(self)


def all_scenes() -> list[Scene]:
    """Every combination (2 sizes × 8 colours × 4 shapes × 5 positions = 320), in a fixed order."""
    return [Scene(*combo) for combo in product(SIZES, COLOURS, SHAPES, POSITIONS)]


def prompt_of(scene: Scene) -> str:
    return f"a {scene.size} {scene.colour} {scene.shape} {POSITIONS[scene.position][0]}"


_PROMPT = re.compile(r"^\s*an?\s+(?P<size>\w+)\s+(?P<colour>\w+)\s+(?P<shape>\w+)\s+(?P<where>.+?)\s*\.?\s*$")
_PHRASES = {phrase: name for name, (phrase, _, _) in POSITIONS.items()}


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt describes; ``ValueError`` naming the prompt if it is not of this world."""
    match = _PROMPT.match(prompt.lower())
    if match is None or match["size"] not in SIZES or match["colour"] not in COLOURS \
            or match["shape"] not in SHAPES or match["where"] not in _PHRASES:
        raise ValueError(f"not a toy-world prompt: {prompt!r} (expected e.g. 'a small red circle on the left')")
    return Scene(match["size"], match["colour"], match["shape"], _PHRASES[match["where"]])


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage (H×W in [0, 1]) of ``shape`` centred at (cx, cy) in pixel units."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float64) + 0.5) / _SUPERSAMPLE
    dx = coords[None, :] - cx
    dy = coords[:, None] - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= radius * radius
    elif shape == "square":
        half = 0.86 * radius
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":  # apex up; its centroid at (cx, cy)
        top, bottom = cy - 1.4 * radius, cy + 0.7 * radius
        frac = np.clip((coords[:, None] - top) / (bottom - top), 0.0, None)
        inside = (dy >= -1.4 * radius) & (dy <= 0.7 * radius) & (np.abs(dx) <= frac * 1.32 * radius)
    elif shape == "cross":
        arm = 0.36 * radius
        reach = 1.05 * radius
        inside = ((np.abs(dx) <= arm) & (np.abs(dy) <= reach)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= reach))
    else:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


@lru_cache(maxsize=None)
def area_per_radius2(shape: str) -> float:
    """Pixel area of ``shape`` divided by radius² (to estimate a drawn shape's radius from its area)."""
    return float(shape_mask(shape, 16.0, 16.0, 8.0).sum() / 64.0)


def sample_layout(scene: Scene, rng: np.random.Generator) -> tuple[float, float, float]:
    """A random centre and radius for ``scene`` (jittered position, radius within its size)."""
    _, cx, cy = POSITIONS[scene.position]
    low, high = SIZES[scene.size]
    return (cx + rng.uniform(-JITTER, JITTER), cy + rng.uniform(-JITTER, JITTER), rng.uniform(low, high))


def render(scene: Scene, rng: np.random.Generator | None = None,
           layout: tuple[float, float, float] | None = None) -> np.ndarray:
    """The scene as an H×W×3 float32 image in [0, 1]."""
    if layout is None:
        layout = sample_layout(scene, rng if rng is not None else np.random.default_rng(0))
    cx, cy, radius = layout
    cover = shape_mask(scene.shape, cx, cy, radius)[..., None]
    background = np.asarray(BACKGROUND)[None, None, :]
    colour = np.asarray(COLOURS[scene.colour])[None, None, :]
    return (background * (1.0 - cover) + colour * cover).astype(np.float32)


def sample_scenes(n: int, rng: np.random.Generator, scenes: list[Scene] | None = None) -> list[Scene]:
    pool = scenes if scenes is not None else all_scenes()
    return [pool[i] for i in rng.integers(0, len(pool), size=n)]


def split_scenes(validation_fraction: float = 0.25, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """A fixed split of all scenes into calibration (training) prompts and held-out ones."""
    scenes = all_scenes()
    order = np.random.default_rng(seed).permutation(len(scenes))
    n_val = int(round(validation_fraction * len(scenes)))
    held = sorted(order[:n_val].tolist())
    rest = sorted(order[n_val:].tolist())
    return [scenes[i] for i in rest], [scenes[i] for i in held]
