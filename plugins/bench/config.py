"""The bench YAML: optimisers × problems × budgets × seeds, validated with one-line errors."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from calibri.core.config import apply_overrides, config_error, read_yaml
from calibri.core.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def parse_indices(value: Any) -> list[int]:
    """``1-24``, ``"1-5,8"``, ``7`` or ``[1, 2, 3]`` → a sorted list of distinct integers."""
    if isinstance(value, bool):
        raise ValueError(f"expected integers or ranges like 1-24, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        out: list[int] = []
        for part in value.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not match:
                raise ValueError(f"expected integers or ranges like 1-24, got {value!r}")
            low, high = int(match[1]), int(match[2] or match[1])
            if high < low:
                raise ValueError(f"empty range {part.strip()!r}")
            out.extend(range(low, high + 1))
        return sorted(set(out))
    if isinstance(value, Sequence):
        out = []
        for item in value:
            out.extend(parse_indices(item))
        return sorted(set(out))
    raise ValueError(f"expected integers or ranges like 1-24, got {value!r}")


class BBOBSet(_Strict):
    """A block of BBOB problems: every function × dimension × instance."""

    functions: list[int] = Field(default_factory=lambda: list(range(1, 25)))
    dimensions: list[int] = Field(default_factory=lambda: [10])
    instances: list[int] = Field(default_factory=lambda: [1])
    library: Literal["ioh", "coco"] = "ioh"
    init: Literal["origin", "uniform"] = "origin"

    @field_validator("functions", "dimensions", "instances", mode="before")
    @classmethod
    def _ranges(cls, value: Any) -> list[int]:
        return parse_indices(value)

    @field_validator("functions")
    @classmethod
    def _functions(cls, value: list[int]) -> list[int]:
        if not value or any(not (1 <= f <= 24 or 101 <= f <= 130) for f in value):
            raise ValueError("BBOB has functions 1 to 24 (noiseless) and 101 to 130 (noisy)")
        return value

    @field_validator("dimensions", "instances")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or value[0] < 1:
            raise ValueError("must be positive integers")
        return value

    @model_validator(mode="after")
    def _coco_dimensions(self) -> "BBOBSet":
        from calibri.plugins.bbob import COCO_DIMENSIONS

        from calibri.core.errors import ConfigError
        from calibri.plugins.bbob import check_noisy_library

        noisy = any(f > 100 for f in self.functions)
        if noisy:
            try:
                check_noisy_library(self.library, "library")
            except ConfigError as exc:
                raise ValueError(f"library: {exc.message}") from None
        if self.library == "coco" or noisy:
            bad = [d for d in self.dimensions if d not in COCO_DIMENSIONS]
            if bad:
                raise ValueError(f"COCO's {'bbob-noisy' if noisy else 'bbob'} suite has dimensions "
                                 f"{', '.join(map(str, COCO_DIMENSIONS))}, not {bad[0]}"
                                 + ("" if noisy else " (library: ioh allows any)"))
        return self


class CalibrationSet(_Strict):
    """A calibration as a problem: a calibri run YAML (its objective, space, validation and
    executor; the bench gives optimiser, seed and budget), with ``overrides`` of its keys
    (``{objective.options.bucket_size: 8}``). Cost is counted in generated images, the score is
    the held-out validation reward, so the YAML needs ``validation.every`` and validation prompts."""

    config: str = Field(min_length=1, description="a calibri run YAML, relative to the current directory")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key: value")


class ProblemSpec(_Strict):
    """One problem: a BBOB block (``bbob:``), a calibration (``calibration:``), or a registered
    objective by ``name`` + ``options``."""

    bbob: BBOBSet | None = None
    calibration: CalibrationSet | None = None
    name: str | None = Field(default=None, min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)
    label: str | None = Field(default=None, min_length=1)
    f_opt: float | None = Field(default=None, description="the optimum value, to report precision f - f_opt")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_kind(self) -> "ProblemSpec":
        if sum(x is not None for x in (self.bbob, self.calibration, self.name)) != 1:
            raise ValueError("give one of bbob: {functions, dimensions, instances}, calibration: {config: RUN.yaml} "
                             "or name: <objective>")
        if self.bbob is not None and (self.options or self.label or self.f_opt is not None):
            raise ValueError("a bbob: block takes no name, options, label or f_opt")
        if self.calibration is not None and (self.options or self.f_opt is not None):
            raise ValueError("a calibration takes no options or f_opt (use calibration.overrides)")
        return self


class OptimizerSpec(_Strict):
    """An optimiser plugin with its options; ``label`` names it in reports (default: ``name``).
    ``objective_options`` make a calibration set-up more than its optimiser: they replace the
    calibration objective's options in this set-up's cells (``{bucket_size: 8}``)."""

    name: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)
    label: str | None = Field(default=None, min_length=1)
    objective_options: dict[str, Any] = Field(default_factory=dict, description=(
        "calibration problems: objective options of this set-up's cells, e.g. {bucket_size: 8}"))

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @property
    def key(self) -> str:
        return self.label or self.name


class BudgetSpec(_Strict):
    """One budget, in exactly one unit: evaluations, evaluations per dimension, rounds (of the
    bench's popsize), or training images (calibration problems only)."""

    evaluations: int | None = Field(default=None, ge=1)
    evaluations_per_dim: float | None = Field(default=None, gt=0)
    rounds: int | None = Field(default=None, ge=1)
    images: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:  # a bare number means evaluations per dimension
        return {"evaluations_per_dim": value} if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else value

    @model_validator(mode="after")
    def _exactly_one(self) -> "BudgetSpec":
        given = [k for k in ("evaluations", "evaluations_per_dim", "rounds", "images") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of evaluations, evaluations_per_dim, rounds, images")
        return self

    def evaluations_for(self, dimension: int, popsize: int, images_per_evaluation: int | None = None) -> int:
        """This budget in evaluations; an image budget needs the images each evaluation makes
        (the last candidate may take it past the budget, never short of it)."""
        if self.evaluations is not None:
            return self.evaluations
        if self.rounds is not None:
            return self.rounds * popsize
        if self.images is not None:
            if not images_per_evaluation:
                raise ValueError("only calibration problems count images")
            return max(1, -(-self.images // images_per_evaluation))
        return max(1, int(round(self.evaluations_per_dim * dimension)))

    @property
    def label(self) -> str:
        if self.images is not None:
            return f"{self.images} images"
        if self.evaluations is not None:
            return f"{self.evaluations} evals"
        if self.rounds is not None:
            return f"{self.rounds} rounds"
        return f"{self.evaluations_per_dim:g}·d evals"


class BenchConfig(_Strict):
    """The whole bench. Every optimiser gets the same x0 (the problem's), the same user-space
    ``sigma``, the same ``popsize`` (default: CMA-ES's 4 + ⌊3 ln d⌋) and the same evaluation
    budget (the largest of ``budgets``; the others are read off the same runs)."""

    name: str | None = None
    problems: list[ProblemSpec] = Field(min_length=1)
    optimizers: list[OptimizerSpec] = Field(min_length=1)
    budgets: list[BudgetSpec] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: list(range(5)))
    sigma: float | None = Field(default=None, gt=0)
    popsize: int | None = Field(default=None, ge=1)
    workers: int | None = Field(default=None, ge=1)
    threads: Annotated[int, Field(ge=1)] | Literal["auto", "inherit"] = Field(
        default="auto", description="BLAS/OpenMP/torch threads of each parallel cell: auto (the cores "
                                    "split between cells), a number, or inherit")
    plugins: list[str] = Field(default_factory=list, description="extra plugin modules to import")
    reference: str | None = Field(default=None, min_length=1, description=(
        "calibration problems: the optimiser label whose final validation reward is the target "
        "(default: the first optimiser)"))
    target: float | Literal["median", "worst"] = Field(default="median", description=(
        "calibration problems: the target validation reward, the median or the worst of the reference's "
        "final rewards over seeds, or a number"))

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError("must be at least 1")
            return list(range(value))
        if isinstance(value, str):
            return parse_indices(value)
        return value

    @field_validator("seeds")
    @classmethod
    def _seed_values(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 0 or len(set(value)) != len(value):
            raise ValueError("seeds must be distinct non-negative integers (or a count)")
        return value

    @model_validator(mode="after")
    def _unique_labels(self) -> "BenchConfig":
        keys = [spec.key for spec in self.optimizers]
        for i, key in enumerate(keys):
            if key in keys[:i]:
                raise _FieldError(f"optimizers.{i}.label", f"{key!r} is used twice; give each optimiser a label")
        if self.reference is not None and self.reference not in keys:
            raise _FieldError("reference", f"{self.reference!r} is not an optimiser label of this bench "
                                           f"(labels: {', '.join(keys)})")
        return self

    @property
    def reference_key(self) -> str:
        """The optimiser whose final validation reward sets a calibration problem's target."""
        return self.reference or self.optimizers[0].key


class _FieldError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def validate_bench(data: Mapping[str, Any]) -> BenchConfig:
    """Schema validation; the first error as a one-line :class:`ConfigError` naming the field."""
    try:
        return BenchConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        cause = (exc.errors()[0].get("ctx") or {}).get("error")
        if isinstance(cause, _FieldError):
            raise ConfigError(cause.field, str(cause)) from None
        raise config_error(exc, BenchConfig, "bench") from None


def load_bench(path: str | Path, overrides: Sequence[str] = ()) -> BenchConfig:
    return validate_bench(apply_overrides(read_yaml(path), overrides))


def dump_bench(config: BenchConfig) -> str:
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)
