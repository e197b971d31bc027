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
        """This result with JSON-safe metrics and artifacts, or a failure if its value is not a
        finite number or an extra cannot be written to the trials log."""
        if not self.ok:
            return self
        try:
            metrics = {str(k): _plain(v) for k, v in dict(self.metrics).items()}
            artifacts = {str(k): _plain(v) for k, v in dict(self.artifacts).items()}
        except (TypeError, ValueError) as exc:
            return EvalResult.failure(f"objective returned {exc}")
        try:
            if isinstance(self.value, (str, bytes)):  # float("0.5") would pass: a bug, not a value
                raise TypeError
            value = float(self.value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return EvalResult.failure(f"objective returned a non-number: {_short(self.value)}")
        if not math.isfinite(value):
            return EvalResult(value=None, metrics=metrics, artifacts=artifacts, status="failed",
                              error=f"objective returned {value}")
        return EvalResult(value=value, metrics=metrics, artifacts=artifacts)


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


#: Metrics and artifacts go into every trial line: an extra larger than this is refused.
MAX_EXTRA_ITEMS = 10_000


def _plain(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy: numpy scalars and arrays become Python numbers and lists, non-finite
    floats None; anything else (bytes, objects, huge arrays) raises ``TypeError`` saying what."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        if value.size > MAX_EXTRA_ITEMS:
            raise TypeError(f"an array of {value.size} items in metrics/artifacts (at most {MAX_EXTRA_ITEMS})")
        value = value.tolist()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth < 8 and isinstance(value, (list, tuple)) and len(value) <= MAX_EXTRA_ITEMS:
        return [_plain(item, depth + 1) for item in value]
    if depth < 8 and isinstance(value, Mapping) and len(value) <= MAX_EXTRA_ITEMS:
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    raise TypeError(f"a {type(value).__name__} in metrics/artifacts ({_short(value)}); "
                    f"they must be numbers, strings, lists or mappings of them")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def as_result(raw: EvalResult | float | Mapping[str, Any]) -> EvalResult:
    """Normalise what an objective returned for one candidate.

    Accepts an :class:`EvalResult`, a number, or a mapping with ``value`` and optional ``metrics``.
    """
    if isinstance(raw, EvalResult):
        return raw.checked()
    if isinstance(raw, Mapping):
        metrics, artifacts = raw.get("metrics") or {}, raw.get("artifacts") or {}
        if not isinstance(metrics, Mapping) or not isinstance(artifacts, Mapping):
            return EvalResult.failure("objective returned metrics/artifacts that are not mappings")
        return EvalResult(value=raw.get("value"), metrics=dict(metrics), artifacts=dict(artifacts)).checked()
    return EvalResult(value=raw).checked()  # type: ignore[arg-type]


def to_loss(value: float, direction: Direction) -> float:
    """Optimisers minimise: the loss of a value in the user's direction."""
    return value if direction == "minimize" else -value
