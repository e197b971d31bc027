"""The objective contract: batch evaluation of one round's candidates under shared randomness."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .space import Params, Space

Direction = Literal["minimize", "maximize"]


@dataclass(frozen=True)
class RoundContext:
    """What every candidate of one round shares: the round index, one seed (common random
    numbers) and the round's data (e.g. a bucket of prompts drawn by the run's data stream).

    An objective's value for a candidate must depend only on the candidate and this context,
    never on which other candidates share its batch or worker: that is what makes a run's
    trajectory independent of the number of workers.
    """

    round: int
    seed: int
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    """The outcome of one evaluation.

    ``value`` is the objective value in the user's direction; ``metrics`` are named extra
    numbers to log; ``artifacts`` are small JSON-able extras (file names, captions). A failed
    evaluation has ``status="failed"``, ``value=None`` and an ``error`` message.
    """

    value: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    status: Literal["ok", "failed"] = "ok"
    error: str | None = None
    wall_time: float = 0.0

    @classmethod
    def failure(cls, error: str) -> "EvalResult":
        return cls(value=None, status="failed", error=error)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def checked(self) -> "EvalResult":
        """This result, or a failure if its value is not a finite number."""
        if not self.ok:
            return self
        try:
            value = float(self.value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return EvalResult.failure(f"objective returned a non-number: {self.value!r}")
        if not math.isfinite(value):
            return EvalResult(value=None, metrics={k: _plain(v) for k, v in self.metrics.items()},
                              artifacts={k: _plain(v) for k, v in self.artifacts.items()},
                              status="failed", error=f"objective returned {value}")
        return EvalResult(value=value, metrics={k: _plain(v) for k, v in self.metrics.items()},
                          artifacts={k: _plain(v) for k, v in self.artifacts.items()})


class Objective(ABC):
    """Evaluates a batch of candidates. Built once per worker by a registered factory and kept.

    Subclasses set :attr:`direction` and may provide :attr:`space` (used when the run config
    gives no ``space:``). ``evaluate`` may return plain floats; they are wrapped as results.
    """

    direction: Direction = "minimize"
    space: Space | None = None

    @abstractmethod
    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> Sequence[EvalResult | float]:
        """Values for ``candidates`` in order. Raising fails the whole batch; the executor then
        retries candidates one at a time so a single bad point fails alone."""

    def close(self) -> None:
        """Release resources (models, servers). Called once when the worker shuts down."""


class FunctionObjective(Objective):
    """Wraps ``fn(params) -> float`` or ``fn(params, ctx) -> float`` as a batch objective."""

    def __init__(self, fn: Any, direction: Direction = "minimize", space: Space | None = None,
                 with_context: bool = False) -> None:
        self.fn = fn
        self.direction = direction
        self.space = space
        self.with_context = with_context

    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult | float]:
        if self.with_context:
            return [self.fn(params, ctx) for params in candidates]
        return [self.fn(params) for params in candidates]


def _plain(value: Any) -> Any:
    """A JSON-safe scalar: numpy scalars become Python ones, non-finite floats None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def as_result(raw: EvalResult | float | Mapping[str, Any]) -> EvalResult:
    """Normalise what an objective returned for one candidate.

    Accepts an :class:`EvalResult`, a number, or a mapping with ``value`` and optional ``metrics``.
    """
    if isinstance(raw, EvalResult):
        return raw.checked()
    if isinstance(raw, Mapping):
        return EvalResult(value=raw.get("value"), metrics=dict(raw.get("metrics", {})),
                          artifacts=dict(raw.get("artifacts", {}))).checked()
    return EvalResult(value=raw).checked()  # type: ignore[arg-type]


def to_loss(value: float, direction: Direction) -> float:
    """Optimisers minimise: the loss of a value in the user's direction."""
    return value if direction == "minimize" else -value
