"""pycma's CMA-ES, the optimiser the Calibri paper used: σ0, x0 injection, bounds, ``CMA_stds``."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from calibri.core.hookspecs import hookimpl
from calibri.core.optimizer import Optimizer, OptimizerSettings, fill_failed
from calibri.core.space import Params, Space


class PycmaCMA(Optimizer):
    """CMA-ES from pycma with per-dimension σ (``CMA_stds``) and pycma's own bound handling.

    Sampling draws from a private ``RandomState`` (pycma's ``randn`` option), so no global
    numpy state is touched and the state pickles with the strategy. ``cma_options`` passes
    further pycma options through unchanged.
    """

    def __init__(self, space: Space, settings: OptimizerSettings, *, active: bool = True,
                 cma_options: dict[str, Any] | None = None) -> None:
        super().__init__(space, settings)
        import cma

        lows, highs = space.search_bounds()
        self._rng = np.random.RandomState(settings.seed % 2**32)
        options: dict[str, Any] = {
            "popsize": self.popsize,
            "bounds": [list(lows), list(highs)],
            "CMA_stds": list(space.search_sigmas(settings.sigma)),
            "CMA_active": active,
            "randn": self._rng.randn,
            "seed": np.nan,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "tolx": 0, "tolfun": 0, "tolfunhist": 0, "tolstagnation": 10**9, "tolflatfitness": 10**9,
        }
        options.update(cma_options or {})
        self.es = cma.CMAEvolutionStrategy(list(space.search_x0()), 1.0, options)
        self.es.inject([space.search_x0()], force=True)
        self._pending: list[np.ndarray] = []

    def ask(self, n: int) -> list[Params]:
        solutions = self.es.ask(self.popsize)
        self._pending = [np.asarray(z) for z in solutions[:n]]
        return [self.space.from_search(z) for z in self._pending]

    def tell(self, candidates: Sequence[Params], losses: Sequence[float | None]) -> None:
        if len(losses) != len(self._pending):
            raise ValueError(f"told {len(losses)} losses for {len(self._pending)} asked candidates")
        if len(losses) == self.popsize:
            self.es.tell(self._pending, fill_failed(losses))
        # A partial generation (the budget's last round) is not told: pycma needs a full one.
        self._pending = []

    def recommend(self) -> Params:
        return self.space.from_search(self.es.mean)

    def state_dict(self) -> dict[str, Any]:
        return {"es": self.es, "rng": self._rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.es, self._rng = state["es"], state["rng"]
        self.es.opts["randn"] = self._rng.randn


@hookimpl
def calibri_register_optimizers(register):
    register("pycma", PycmaCMA)
