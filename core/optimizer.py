"""The optimiser contract: ask a round, tell its losses, recommend, save and restore state."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .space import Params, Space


def default_popsize(dimension: int) -> int:
    """CMA-ES's default population size, ``4 + floor(3 ln d)``."""
    return 4 + int(3 * math.log(max(dimension, 1)))


@dataclass(frozen=True)
class OptimizerSettings:
    """Settings every optimiser receives, whatever its backend.

    ``sigma`` is the initial step size in user units for dimensions that set none (see
    :meth:`Space.search_sigmas`); ``popsize`` the round size (``None``: the backend's default);
    ``workdir`` a folder inside the run directory the optimiser may keep files in.
    """

    seed: int = 0
    sigma: float | None = None
    popsize: int | None = None
    workdir: Path | None = None


class Optimizer(ABC):
    """Ask-and-tell optimiser over a :class:`Space`. Minimises losses.

    Rules every backend follows (checked by :mod:`calibri.core.testing.optimizer_contract`):

    * ``ask(n)`` returns ``n`` in-bounds parameter dicts; the first ask of a run returns the
      space's initial point first (x0 injection).
    * ``tell(candidates, losses)`` follows each ask, with the same candidates in the same order;
      a loss of ``None`` marks a failed evaluation.
    * The same seed gives the same asks for the same tells, and ``load_state_dict(state_dict())``
      continues exactly as the original would (bit-identical).
    """

    #: Dimension kinds this backend can search.
    kinds: ClassVar[frozenset[str]] = frozenset({"float", "int"})
    #: Whether the backend samples around x0 with step size σ (False for global samplers).
    uses_sigma: ClassVar[bool] = True

    def __init__(self, space: Space, settings: OptimizerSettings) -> None:
        self.space = space
        self.settings = settings

    @property
    def popsize(self) -> int:
        """The round size this optimiser prefers (one CMA-ES generation)."""
        return self.settings.popsize or default_popsize(len(self.space))

    @abstractmethod
    def ask(self, n: int) -> list[Params]:
        """``n`` candidates to evaluate next."""

    @abstractmethod
    def tell(self, candidates: Sequence[Params], losses: Sequence[float | None]) -> None:
        """Losses (lower is better; ``None`` = failed) of the last asked candidates."""

    @abstractmethod
    def recommend(self) -> Params:
        """The optimiser's current best guess (e.g. the CMA-ES mean), not necessarily evaluated."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly; must be picklable."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class FailurePenalty:
    """:func:`fill_failed` that remembers the worst loss told, the penalty for a round in which
    every evaluation failed. Picklable; keep it in the optimiser's state."""

    def __init__(self) -> None:
        self.worst: float | None = None

    def __call__(self, losses: Sequence[float | None]) -> list[float]:
        filled = fill_failed(losses, None if self.worst is None else self.worst + max(abs(self.worst), 1.0))
        self.worst = max(filled if self.worst is None else [self.worst, *filled])
        return filled


def fill_failed(losses: Sequence[float | None], fallback: float | None = None) -> list[float]:
    """Replace failed losses by a penalty worse than every finite loss of the round.

    Backends that need a loss for every member of a generation (CMA-ES) use this; the penalty
    ranks failures last without pulling the distribution's statistics to infinity.
    """
    finite = [loss for loss in losses if loss is not None]
    if finite:
        worst, spread = max(finite), max(finite) - min(finite)
        penalty = worst + max(spread, abs(worst), 1.0)
    else:
        penalty = fallback if fallback is not None else 1e30
    return [penalty if loss is None else float(loss) for loss in losses]
