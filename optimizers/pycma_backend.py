"""pycma's CMA-ES, the optimiser the Calibri paper used: σ0, x0 injection, bounds, ``CMA_stds``."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from calibri.core.errors import ConfigError
from calibri.core.hookspecs import hookimpl
from calibri.core.optimizer import FailurePenalty, Optimizer, OptimizerSettings
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
        if len(space) == 1:  # pycma fails on a bounded 1-d space once σ exceeds a third of the range
            options["maxstd_boundrange"] = np.inf
        unknown = sorted(set(cma_options or {}) - set(cma.CMAOptions()))
        if unknown:
            raise ConfigError(f"optimizer.options.cma_options.{unknown[0]}",
                              "unknown pycma option (the known ones: python -c 'import cma; print(cma.CMAOptions())')")
        options.update(cma_options or {})
        self.es = cma.CMAEvolutionStrategy(list(space.search_x0()), 1.0, options)
        # Inject x0 in pycma's genotype, so that an x0 lying on a bound is told where it really is.
        self.es.inject([self.es.gp.geno(np.asarray(space.search_x0()), from_bounds=self.es.boundary_handler.inverse)],
                       force=True)
        self._pending: list[np.ndarray] = []
        self._x0_pending = True
        self._penalty = FailurePenalty()

    def ask(self, n: int) -> list[Params]:
        if n > self.popsize:
            raise ValueError(f"pycma asks one generation at a time: n={n} > popsize={self.popsize}")
        solutions = self.es.ask(self.popsize)
        self._pending = [np.asarray(z) for z in solutions[:n]]
        params = [self.space.from_search(z) for z in self._pending]
        if self._x0_pending and params:  # the injected x0, exactly (ln/exp may move a log value by an ulp)
            params[0] = self.space.init_params()
            self._x0_pending = False
        return params

    def tell(self, candidates: Sequence[Params], losses: Sequence[float | None]) -> None:
        if len(losses) != len(self._pending):
            raise ValueError(f"told {len(losses)} losses for {len(self._pending)} asked candidates")
        if len(losses) == self.popsize:
            self.es.tell(self._pending, self._penalty(losses))
        # A partial generation (the budget's last round) is not told: pycma needs a full one.
        self._pending = []

    def recommend(self) -> Params:
        return self.space.from_search(self.es.mean)

    def state_dict(self) -> dict[str, Any]:
        return {"es": self.es, "rng": self._rng, "x0_pending": self._x0_pending, "penalty": self._penalty}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.es, self._rng, self._x0_pending = state["es"], state["rng"], state["x0_pending"]
        self._penalty = state["penalty"]
        self.es.opts["randn"] = self._rng.randn


@hookimpl
def calibri_register_optimizers(register):
    register("pycma", PycmaCMA)
