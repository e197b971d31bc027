"""What an ablation study evaluates: its cells, each cell's candidate, and the fixed images.

A cell is one site set to one value with every other parameter at identity (scales 1, ω at its
initial value), or the identity itself. With ensemble copies or time buckets a site has one
parameter per copy and bucket; a cell sets all of them. Every cell is scored on the same images:
the first ``N`` prompts of the config's validation set (its training set when it has none), each
with ``K`` seeds; image ``j`` of the list ``prompts × K`` (seed-major) is sampled with
``image_seed(validation_seed, j)``, so with ``K = 1`` the identity cell is the run's validation
baseline exactly.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibri.core.errors import ConfigError, UserError
from calibri.core.objective import RoundContext
from calibri.core.space import Params, Space

#: Most images per cell: a cell's rewards travel as one result's artifact (see MAX_EXTRA_ITEMS).
MAX_IMAGES = 10_000
#: Values further from 1 than this are refused as typos (the search's bounds are [-1, 2]).
MAX_MAGNITUDE = 100.0
DEFAULT_VALUES = (0.0, 0.5, 0.8, 1.2, 1.5)


@dataclass(frozen=True)
class Cell:
    """``site`` set to ``value`` (both None: the identity)."""

    site: str | None
    value: float | None

    @property
    def key(self) -> str:
        return "identity" if self.site is None else f"{self.site}={self.value!r}"

    @property
    def is_identity(self) -> bool:
        return self.site is None


IDENTITY = Cell(None, None)


def parse_values(text: str) -> list[float]:
    """``--values``: comma-separated finite numbers, each once; ascending."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise UserError(f"--values: expected comma-separated numbers (e.g. 0,0.5,1.5), got {text!r}")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise UserError(f"--values: expected comma-separated numbers (e.g. 0,0.5,1.5), got {text!r}") from None
    for value in values:
        if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
            raise UserError(f"--values: {value!r} is not a finite number between {-MAX_MAGNITUDE:g} "
                            f"and {MAX_MAGNITUDE:g}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise UserError(f"--values: lists {', '.join(f'{v:g}' for v in repeated)} more than once")
    return sorted(values)


@dataclass(frozen=True)
class ImageSet:
    """The fixed prompts and seeds every cell is scored on."""

    prompts: tuple[str, ...]
    metadata: tuple[Mapping[str, Any], ...]
    source: str  # as the config names it (a file, a shipped set's name)
    split: str  # "validation" or "training"
    seeds: int
    seed: int
    digest: str  # of the whole prompt set, so a changed prompt file changes the study

    @property
    def n_images(self) -> int:
        return len(self.prompts) * self.seeds

    def context(self) -> RoundContext:
        """Every cell's context: prompts repeated per seed, one base seed (see the module docstring)."""
        return RoundContext(round=0, seed=self.seed, data={"split": f"ablation ({self.split})",
                                                           "prompts": list(self.prompts) * self.seeds,
                                                           "metadata": list(self.metadata) * self.seeds})


def prompt_digest(prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> str:
    """The first 16 hex digits of the sha256 of prompts and metadata."""
    text = json.dumps([list(prompts), [dict(m) for m in metadata]], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def image_set(options: Mapping[str, Any], n_prompts: int | None, seeds: int) -> ImageSet:
    """The first ``n_prompts`` (all by default) of the validation prompts, else of the training ones."""
    from .objective import FIELD, CalibriOptions
    from .prompts import load_prompts

    opts = CalibriOptions.trusted(options)
    field, split, spec = ((f"{FIELD}.validation_prompts", "validation", opts.validation_prompts)
                          if opts.validation_prompts is not None else (f"{FIELD}.prompts", "training", opts.prompts))
    prompts = load_prompts(spec, field)
    if n_prompts is not None and n_prompts > len(prompts):
        raise UserError(f"--prompts: {field} holds {len(prompts)} prompts, fewer than {n_prompts}")
    n = len(prompts) if n_prompts is None else n_prompts
    if n * seeds > MAX_IMAGES:
        raise UserError(f"--prompts/--seeds: {n} prompts × {seeds} seeds = {n * seeds} images per cell, "
                        f"more than {MAX_IMAGES}; take fewer prompts (--prompts) or seeds")
    if n * seeds < 2:
        raise UserError("--prompts/--seeds: a standard error needs at least 2 images per cell")
    chosen = list(range(n))
    texts, metadata = prompts.subset(chosen)
    source = str(spec) if isinstance(spec, (str, Path)) else "an inline list"
    return ImageSet(tuple(texts), tuple(metadata), source, split, seeds, int(opts.validation_seed),
                    prompt_digest(prompts.prompts, prompts.metadata))


@dataclass(frozen=True)
class Sites:
    """A calibration's sites and, per site, its parameter in every copy and time bucket."""

    names: tuple[str, ...]
    parameters: Mapping[str, tuple[str, ...]]
    granularity: str
    model_class: str

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> "Sites":
        """From the transformer's config on the meta device (no weights are loaded)."""
        from .objective import FIELD, meta_calibrator

        meta, calibrator, opts = meta_calibrator(options)
        names = calibrator.site_names
        if not names:
            field = f"{FIELD}.model_config" if opts.transformer_config is not None else f"{FIELD}.model"
            raise ConfigError(field, f"this {type(meta).__name__} has no Calibri sites to ablate")
        scales = calibrator.parameter_names(with_omega=False)  # row-major: (bucket, copy) × site
        per_site = {site: tuple(scales[row * len(names) + i] for row in range(len(scales) // len(names)))
                    for i, site in enumerate(names)}
        return cls(tuple(names), per_site, opts.granularity, type(meta).__name__)


def cells(sites: Sites, values: Sequence[float]) -> list[Cell]:
    """The identity, then every site (in model order) at every value (ascending)."""
    return [IDENTITY, *(Cell(site, float(value)) for site in sites.names for value in values)]


def candidate(cell: Cell, sites: Sites, space: Space) -> Params:
    """The cell's point of the objective's space: identity, with the cell's site at its value."""
    params = dict(space.init_params())
    if not cell.is_identity:
        for name in sites.parameters[cell.site]:  # type: ignore[index]
            params[name] = cell.value
    return params
