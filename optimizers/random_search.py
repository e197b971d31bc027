"""Uniform random search: the baseline every benchmark needs."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from calibri.core.hookspecs import hookimpl
from calibri.core.optimizer import Optimizer, OptimizerSettings
from calibri.core.space import Params, Space


class RandomSearch(Optimizer):
    """Uniform sampling in search coordinates (log dimensions uniform in log); x0 first."""

    kinds = frozenset({"float", "int", "categorical"})
    uses_sigma = False

    def __init__(self, space: Space, settings: OptimizerSettings, *, include_x0: bool = True) -> None:
        super().__init__(space, settings)
        self._rng = np.random.Generator(np.random.PCG64(settings.seed))
        self._lows, self._highs = space.search_bounds()
        self._x0_pending = include_x0
        self._best: tuple[float, Params] | None = None

    def ask(self, n: int) -> list[Params]:
        out: list[Params] = []
        if self._x0_pending and n > 0:
            out.append(self.space.init_params())
            self._x0_pending = False
        while len(out) < n:
            z = self._rng.uniform(self._lows, self._highs)
            out.append(self.space.from_search(z))
        return out

    def tell(self, candidates: Sequence[Params], losses: Sequence[float | None]) -> None:
        for params, loss in zip(candidates, losses):
            if loss is not None and (self._best is None or loss < self._best[0]):
                self._best = (float(loss), dict(params))

    def recommend(self) -> Params:
        return dict(self._best[1]) if self._best else self.space.init_params()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state, "x0_pending": self._x0_pending, "best": self._best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._x0_pending = state["x0_pending"]
        self._best = state["best"]


@hookimpl
def calibri_register_optimizers(register):
    register("random", RandomSearch, kinds=RandomSearch.kinds)
