"""An example calibri plugin: a (1+λ) evolution strategy and a small test objective.

Installed, it registers through the ``calibri`` entry-point group (see ``pyproject.toml``)::

    [project.entry-points.calibri]
    example = "calibri_example_plugin"

and ``calibri plugins`` lists it as ``example`` with

* the optimiser ``example.es``: a (1+λ) evolution strategy with Gaussian mutation and a step
  size adapted by the 1/5th success rule;
* the objective ``example.shifted-sphere``: ``sum((x - shift)**2)``, minimised at ``x = shift``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from calibri.core import ConfigError, EvalResult, Float, Objective, Optimizer, OptimizerSettings, RoundContext, Space
from calibri.core import hookimpl
from calibri.core.space import Params

__version__ = "0.1.0"


class OnePlusLambdaES(Optimizer):
    """(1+λ) evolution strategy: Gaussian mutations of one parent, σ by the 1/5th success rule.

    Each round samples λ offspring ``z = parent + s · σ_i · N(0, 1)`` in the space's search
    coordinates (log dimensions in log units, integers as rounded reals), clipped into the
    bounds; ``σ_i`` are the per-dimension step sizes of :meth:`Space.search_sigmas` and ``s`` a
    global scale, 1 at the start. The best offspring replaces the parent if its loss is no worse
    (elitist selection). The scale then follows the 1/5th success rule on the fraction ``p`` of
    offspring strictly better than the parent: ``s ← s · exp((p − target_success) / damping)``,
    so steps grow while more than a fifth of the mutations improve and shrink otherwise.

    The first round starts with the space's initial point (x0), whose loss becomes the parent's.
    A failed evaluation (loss ``None``) counts as an unsuccessful offspring.
    """

    kinds = frozenset({"float", "int"})
    uses_sigma = True

    def __init__(self, space: Space, settings: OptimizerSettings, *, target_success: float = 0.2,
                 damping: float = 1.0) -> None:
        super().__init__(space, settings)
        if not 0.0 < target_success < 1.0:
            raise ConfigError("optimizer.options.target_success",
                              f"must be strictly between 0 and 1, got {target_success!r}")
        if not damping > 0:
            raise ConfigError("optimizer.options.damping", f"must be positive, got {damping!r}")
        self.target_success = float(target_success)
        self.damping = float(damping)
        self._rng = np.random.Generator(np.random.PCG64(settings.seed))
        self._lows, self._highs = space.search_bounds()
        self._sigmas = space.search_sigmas(settings.sigma)
        self._parent_z = space.search_x0()
        self._parent_params: Params = space.init_params()
        self._parent_loss: float | None = None
        self._scale = 1.0
        self._x0_pending = True
        self._pending: list[tuple[np.ndarray, Params]] = []
        self._pending_x0 = False

    # -- ask and tell -----------------------------------------------------------------------------
    def ask(self, n: int) -> list[Params]:
        pending: list[tuple[np.ndarray, Params]] = []
        self._pending_x0 = False
        if self._x0_pending and n > 0:
            # The initial point exactly as the user wrote it (not a round trip through log space).
            pending.append((self.space.search_x0(), self.space.init_params()))
            self._pending_x0 = True
            self._x0_pending = False
        while len(pending) < n:
            noise = self._rng.standard_normal(len(self.space))
            z = np.clip(self._parent_z + self._scale * self._sigmas * noise, self._lows, self._highs)
            pending.append((z, self.space.from_search(z)))
        self._pending = pending
        return [dict(params) for _, params in pending]

    def tell(self, candidates: Sequence[Params], losses: Sequence[float | None]) -> None:
        if len(candidates) != len(self._pending) or len(losses) != len(self._pending):
            raise ValueError(f"told {len(candidates)} candidates and {len(losses)} losses for "
                             f"{len(self._pending)} asked")
        pending, self._pending = self._pending, []
        offspring = list(zip(pending, losses))
        if self._pending_x0:
            _, x0_loss = offspring.pop(0)
            if x0_loss is not None and math.isfinite(x0_loss):
                self._parent_loss = float(x0_loss)
            self._pending_x0 = False
        if not offspring:
            return
        parent_loss = self._parent_loss
        finite = [(float(loss), z, params) for (z, params), loss in offspring
                  if loss is not None and math.isfinite(loss)]
        if finite:
            best_loss, best_z, best_params = min(finite, key=lambda item: item[0])
            if parent_loss is None or best_loss <= parent_loss:
                self._parent_z, self._parent_params, self._parent_loss = best_z.copy(), dict(best_params), best_loss
        if parent_loss is not None:  # the success rate needs a parent to compare with
            successes = sum(loss < parent_loss for loss, _, _ in finite)
            rate = successes / len(offspring)
            self._scale *= math.exp((rate - self.target_success) / self.damping)
            self._scale = min(max(self._scale, 1e-12), 1e6)

    def recommend(self) -> Params:
        """The parent: the best point evaluated so far (x0 before any tell)."""
        return dict(self._parent_params)

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self._rng.bit_generator.state,
            "parent_z": self._parent_z.copy(),
            "parent_params": dict(self._parent_params),
            "parent_loss": self._parent_loss,
            "scale": self._scale,
            "x0_pending": self._x0_pending,
            "pending": [(z.copy(), dict(params)) for z, params in self._pending],
            "pending_x0": self._pending_x0,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._parent_z = np.array(state["parent_z"], dtype=np.float64)
        self._parent_params = dict(state["parent_params"])
        self._parent_loss = state["parent_loss"]
        self._scale = float(state["scale"])
        self._x0_pending = bool(state["x0_pending"])
        self._pending = [(np.array(z, dtype=np.float64), dict(params)) for z, params in state["pending"]]
        self._pending_x0 = bool(state["pending_x0"])


class ShiftedSphere(Objective):
    """``sum((x - shift)**2)`` over ``x[0..dim-1]`` on ``[low, high]``, starting at ``init``."""

    direction = "minimize"

    def __init__(self, dim: int = 5, shift: float = 1.0, low: float = -5.0, high: float = 5.0,
                 init: float = -3.0) -> None:
        self.shift = float(shift)
        self.space = shifted_sphere_space(dim, low, high, init)

    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        x = np.array([self.space.to_vector(params) for params in candidates])
        squared = (x - self.shift) ** 2
        return [EvalResult(value=float(row.sum()), metrics={"max_error": float(np.sqrt(row.max()))})
                for row in squared]


def shifted_sphere_space(dim: int = 5, low: float = -5.0, high: float = 5.0, init: float = -3.0,
                         shift: float = 1.0) -> Space:
    """The space of ``example.shifted-sphere``, without building the objective."""
    if dim < 1:
        raise ConfigError("objective.options.dim", f"must be at least 1, got {dim}")
    return Space(Float(f"x[{i}]", low, high, init=init) for i in range(dim))


@hookimpl
def calibri_register_optimizers(register):
    register("example.es", OnePlusLambdaES, kinds=OnePlusLambdaES.kinds,
             description="(1+λ) evolution strategy with the 1/5th success rule")


@hookimpl
def calibri_register_objectives(register):
    register("example.shifted-sphere", ShiftedSphere, space=shifted_sphere_space,
             description="sum((x - shift)**2), minimised at x = shift")
