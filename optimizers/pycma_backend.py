"""pycma's CMA-ES, the optimiser the Calibri paper used: σ0, x0 injection, bounds, ``CMA_stds``;
with IPOP / BIPOP restarts (pycma runs those inside ``cma.fmin``, which owns the loop; here they
are driven from ask/tell, with ``cma.fmin``'s schedule)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pydantic

from calibri.core.errors import ConfigError
from calibri.core.hookspecs import hookimpl
from calibri.core.optimizer import FailurePenalty, Optimizer, OptimizerSettings
from calibri.core.space import Params, Space

#: pycma's termination criteria, switched off without restarts: a run stops on its budget only.
NO_STOPPING = {"tolx": 0, "tolfun": 0, "tolfunhist": 0, "tolstagnation": 10**9, "tolflatfitness": 10**9}


class Restarts(pydantic.BaseModel):
    """Restarts when pycma's termination criteria fire. ``ipop``: each restart doubles λ
    (``incpopsize``); ``bipop``: interleaves those with runs of a small random λ and a σ0 shrunk by
    up to 100, whichever regime has used fewer evaluations (Hansen 2009, as ``cma.fmin``).
    ``max``: restarts with a large population (a run of the small regime does not count)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    regime: Literal["ipop", "bipop"] = "ipop"
    max: int = pydantic.Field(default=9, ge=0)
    incpopsize: float = pydantic.Field(default=2.0, gt=1)


class PycmaCMA(Optimizer):
    """CMA-ES from pycma with per-dimension σ (``CMA_stds``) and pycma's own bound handling.

    Sampling draws from a private ``RandomState`` (pycma's ``randn`` option), so no global
    numpy state is touched and the state pickles with the strategy. ``cma_options`` passes
    further pycma options through unchanged (``CMA_diagonal: true`` is sep-CMA-ES).
    ``restarts`` (``{regime: ipop|bipop, max, incpopsize}``) restarts from x0 when pycma's
    termination criteria fire — its defaults then, or those ``cma_options`` sets — with the
    round size following the population.
    """

    def __init__(self, space: Space, settings: OptimizerSettings, *, active: bool = True,
                 cma_options: dict[str, Any] | None = None, restarts: dict[str, Any] | None = None) -> None:
        super().__init__(space, settings)
        import cma

        self._rng = np.random.RandomState(settings.seed % 2**32)
        unknown = sorted(set(cma_options or {}) - set(cma.CMAOptions()))
        if unknown:
            raise ConfigError(f"optimizer.options.cma_options.{unknown[0]}",
                              "unknown pycma option (the known ones: python -c 'import cma; print(cma.CMAOptions())')")
        if "popsize" in (cma_options or {}):
            raise ConfigError("optimizer.options.cma_options.popsize", "set the round size with optimizer.popsize")
        try:
            self._restarts = None if restarts is None else Restarts.model_validate(restarts)
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise ConfigError(f"optimizer.options.restarts{'.' + where if where else ''}",
                              error["msg"].removeprefix("Value error, ")) from None
        self._active, self._cma_options = active, dict(cma_options or {})
        self._popsize0 = super().popsize
        #: restart bookkeeping: runs so far, small-regime runs, evaluations per regime, the regime now
        self._restart = {"runs": 0, "small_runs": 0, "small": [], "large": [], "regime": "large", "evals": 0}
        self.es = self._new_es(self._popsize0, 1.0, None)
        self._maxiter0 = float(self.es.opts["maxiter"])
        # Inject x0 in pycma's genotype, so that an x0 lying on a bound is told where it really is.
        self.es.inject([self.es.gp.geno(np.asarray(space.search_x0()), from_bounds=self.es.boundary_handler.inverse)],
                       force=True)
        self._pending: list[np.ndarray] = []
        self._x0_pending = True
        self._penalty = FailurePenalty()

    def _new_es(self, popsize: int, sigma_factor: float, maxiter: float | None) -> Any:
        import cma

        lows, highs = self.space.search_bounds()
        options: dict[str, Any] = {
            "popsize": popsize,
            "bounds": [list(lows), list(highs)],
            "CMA_stds": list(self.space.search_sigmas(self.settings.sigma)),
            "CMA_active": self._active,
            "randn": self._rng.randn,
            "seed": np.nan,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            **({} if self._restarts is not None else NO_STOPPING),
        }
        if len(self.space) == 1:  # pycma fails on a bounded 1-d space once σ exceeds a third of the range
            options["maxstd_boundrange"] = np.inf
        options.update(self._cma_options)
        if maxiter is not None:
            options["maxiter"] = maxiter
        return cma.CMAEvolutionStrategy(list(self.space.search_x0()), sigma_factor, options)

    @property
    def popsize(self) -> int:
        """The current run's population: it grows with IPOP / BIPOP restarts."""
        es = getattr(self, "es", None)
        return int(es.popsize) if es is not None else self._popsize0

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
            self._restart["evals"] += len(losses)
            if self._restarts is not None and self.es.stop():
                self._restart_now()
        # A partial generation (the budget's last round) is not told: pycma needs a full one.
        self._pending = []

    def _restart_now(self) -> None:
        """``cma.fmin``'s restart schedule: IPOP doubles λ; BIPOP runs the small regime (random
        λ between λ0 and the last large one, σ0 × 10^(−2u), at most half the large runs' budget)
        whenever it has used fewer evaluations than the large one."""
        assert self._restarts is not None
        r, spec = self._restart, self._restarts
        (r["small"] if r["regime"] == "small" else r["large"]).append(r["evals"])
        if r["runs"] - r["small_runs"] >= spec.max:  # restarts with a large population so far
            return  # restarts spent: carry on with the stopped strategy (its ask still samples)
        r["runs"] += 1
        sigma_factor, maxiter = 1.0, None
        if spec.regime == "bipop" and sum(r["small"]) < max(1, sum(r["large"])):
            r["regime"], r["small_runs"] = "small", r["small_runs"] + 1
            sigma_factor = 0.01 ** self._rng.uniform()
            multiplier = spec.incpopsize ** (r["runs"] - r["small_runs"])
            popsize = max(2, int(self._popsize0 * multiplier ** (self._rng.uniform() ** 2)))
            maxiter = max(1.0, min(self._maxiter0, 0.5 * sum(r["large"]) / popsize))
        else:
            r["regime"] = "large"
            popsize = int(self._popsize0 * spec.incpopsize ** (r["runs"] - r["small_runs"]))
        r["evals"] = 0
        self.es = self._new_es(popsize, sigma_factor, maxiter)

    def recommend(self) -> Params:
        return self.space.from_search(self.es.mean)

    def state_dict(self) -> dict[str, Any]:
        return {"es": self.es, "rng": self._rng, "x0_pending": self._x0_pending, "penalty": self._penalty,
                "restart": {k: list(v) if isinstance(v, list) else v for k, v in self._restart.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.es, self._rng, self._x0_pending = state["es"], state["rng"], state["x0_pending"]
        self._penalty = state["penalty"]
        if "restart" in state:
            self._restart = {k: list(v) if isinstance(v, list) else v for k, v in state["restart"].items()}
        self.es.opts["randn"] = self._rng.randn


@hookimpl
def calibri_register_optimizers(register):
    register("pycma", PycmaCMA)
