"""nevergrad backends: CMA-ES built explicitly with ``ParametrizedCMA``, plus DE, PSO, (1+1) and
TBPSA (noisy objectives).

nevergrad searches standardised coordinates ``u = (z - z0) / σ`` (``z`` the space's search
coordinates, ``σ`` the per-dimension user step sizes), so nevergrad's unit step size is exactly
the user's σ. For CMA-ES the parametrisation is left unbounded on purpose (nevergrad shrinks
CMA's σ by 0.15–0.3 on fully bounded spaces) and candidates are clipped into the bounds when
mapped back; the others use nevergrad's own bound handling, without which offspring of a point
outside the box all land on one face and the search stalls.

State is saved as the history of told losses and restored by replaying it into a freshly seeded
optimiser: nevergrad's ask/tell is deterministic for a seed, and pickling a nevergrad optimiser
(with its archive of every point) after each round costs O(evaluations) each time.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from calibri.core.errors import ConfigError
from calibri.core.hookspecs import hookimpl
from calibri.core.optimizer import FailurePenalty, Optimizer, OptimizerSettings
from calibri.core.space import Params, Space


class NevergradOptimizer(Optimizer):
    """Base for nevergrad backends; subclasses say how to build the nevergrad optimiser."""

    #: nevergrad's registry name, or None for a configured family built by :meth:`_build`.
    registry_name: ClassVar[str | None] = None
    #: nevergrad's bound handling in standardised coordinates (None: unbounded, then clipped).
    bound_method: ClassVar[str | None] = "bouncing"

    def __init__(self, space: Space, settings: OptimizerSettings) -> None:
        super().__init__(space, settings)
        import nevergrad as ng

        self._z0 = space.search_x0()
        self._sigmas = space.search_sigmas(settings.sigma)
        self.ng_optimizer = self._fresh(ng)
        self._pending: list[Any] = []
        self._history: list[list[float]] = []  # losses told, round by round, for replay
        self._penalty = FailurePenalty()

    def _dimension(self) -> int:
        return len(self.space)

    def _fresh(self, ng: Any) -> Any:
        dimension = self._dimension()
        parametrization = ng.p.Array(init=np.zeros(dimension))
        if self.bound_method is not None:
            lows, highs = self.space.search_bounds()
            with warnings.catch_warnings():  # "bounds are less than 3 sigma apart": the user's σ, on purpose
                warnings.simplefilter("ignore")
                parametrization.set_bounds((lows - self._z0) / self._sigmas, (highs - self._z0) / self._sigmas,
                                           method=self.bound_method, full_range_sampling=False)
        parametrization.random_state = np.random.RandomState(self.settings.seed % 2**32)
        optimizer = self._build(ng, parametrization)
        self._inject_x0(optimizer, np.zeros(dimension))
        return optimizer

    def _inject_x0(self, optimizer: Any, u0: np.ndarray) -> None:
        optimizer.suggest(u0)  # the first candidate

    def _build(self, ng: Any, parametrization: Any) -> Any:
        return ng.optimizers.registry[self.registry_name](
            parametrization=parametrization, budget=None, num_workers=self.popsize)

    def _to_params(self, u: np.ndarray) -> Params:
        u = np.asarray(u, dtype=np.float64)[: len(self.space)]  # CMA pads a 1-d space
        return self.space.from_search(self._z0 + self._sigmas * u)

    def ask(self, n: int) -> list[Params]:
        self._pending = [self.ng_optimizer.ask() for _ in range(n)]
        params = [self._to_params(candidate.value) for candidate in self._pending]
        if not self._history and params:  # the suggested x0, exactly (ln/exp may move a log value by an ulp)
            params[0] = self.space.init_params()
        return params

    def tell(self, candidates: Sequence[Params], losses: Sequence[float | None]) -> None:
        if len(losses) != len(self._pending):
            raise ValueError(f"told {len(losses)} losses for {len(self._pending)} asked candidates")
        filled = self._penalty(losses)
        with warnings.catch_warnings():  # a round that failed entirely is told a huge penalty, on purpose
            warnings.filterwarnings("ignore", message=".*[Ll]oss.*")
            for candidate, loss in zip(self._pending, filled):
                self._tell_one(candidate, loss)
        self._history.append(filled)
        self._pending = []

    def _tell_one(self, candidate: Any, loss: float) -> None:
        self.ng_optimizer.tell(candidate, loss)

    def recommend(self) -> Params:
        return self._to_params(self.ng_optimizer.provide_recommendation().value)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(losses) for losses in self._history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import nevergrad as ng

        self.ng_optimizer = self._fresh(ng)
        for losses in state["history"]:
            candidates = [self.ng_optimizer.ask() for _ in losses]
            for candidate, loss in zip(candidates, losses):
                self._tell_one(candidate, loss)
        self._history = [list(losses) for losses in state["history"]]
        self._penalty = FailurePenalty()
        self._penalty.worst = max((max(losses) for losses in self._history if losses), default=None)
        self._pending = []


class NevergradCMA(NevergradOptimizer):
    """Full-covariance, non-elitist CMA-ES (``ng.families.ParametrizedCMA``), σ in user units."""

    bound_method = None  # nevergrad shrinks CMA's σ on fully bounded spaces; clip instead

    def __init__(self, space: Space, settings: OptimizerSettings, *, diagonal: bool = False,
                 elitist: bool = False) -> None:
        self._diagonal, self._elitist = diagonal, elitist
        super().__init__(space, settings)

    def _build(self, ng: Any, parametrization: Any) -> Any:
        family = ng.families.ParametrizedCMA(scale=1.0, popsize=self.popsize, diagonal=self._diagonal,
                                             elitist=self._elitist)
        return family(parametrization=parametrization, budget=None, num_workers=self.popsize)

    def _dimension(self) -> int:
        return max(len(self.space), 2)  # nevergrad switches 1-d CMA to the optional fcmaes package

    def _inject_x0(self, optimizer: Any, u0: np.ndarray) -> None:
        # Into pycma's first generation, not as a nevergrad suggestion: a suggestion takes a slot
        # of the first round and leaves one stale sample to every later round.
        optimizer.es.inject([u0], force=True)


class NevergradDE(NevergradOptimizer):
    """Differential evolution (nevergrad ``TwoPointsDE``)."""

    registry_name = "TwoPointsDE"


class NevergradPSO(NevergradOptimizer):
    """Particle swarm optimisation (nevergrad ``ConfPSO``, swarm size = popsize)."""

    bound_method = "clipping"

    def _build(self, ng: Any, parametrization: Any) -> Any:
        family = ng.families.ConfPSO(transform="arctan", popsize=self.popsize)
        return family(parametrization=parametrization, budget=None, num_workers=self.popsize)


class NevergradOnePlusOne(NevergradOptimizer):
    """(1+1) evolution strategy with one-fifth-rule step size (nevergrad ``OnePlusOne``)."""

    registry_name = "OnePlusOne"


class NevergradTBPSA(NevergradOptimizer):
    """Test-based population-size adaptation (nevergrad ``ParametrizedTBPSA``), an evolution
    strategy for noisy objectives: it grows its population when a statistical test says the noise
    hides progress. Its population (λ = 4·mu, mu = ``initial_popsize``, default d) is its own; the
    round size only sets how many candidates are asked at once. ``naive: false`` (the default, as
    nevergrad's ``TBPSA``) recommends the mean of recent parents, not the best noisy value seen."""

    def __init__(self, space: Space, settings: OptimizerSettings, *, naive: bool = False,
                 initial_popsize: int | None = None) -> None:
        if initial_popsize is not None and initial_popsize < 1:
            raise ConfigError("optimizer.options.initial_popsize", f"must be at least 1, got {initial_popsize}")
        self._naive, self._initial_popsize = naive, initial_popsize
        super().__init__(space, settings)

    def _tell_one(self, candidate: Any, loss: float) -> None:
        # nevergrad tells the suggested x0 as "not asked" and guesses its step size from its
        # distance to the centre, which is 0 for x0: once x0 is a parent, σ collapses to 0 for
        # good. It gets the σ it would have been sampled with instead.
        sigma = self.ng_optimizer.sigma
        self.ng_optimizer.tell(candidate, loss)
        if candidate._meta.get("sigma") == 0:
            candidate._meta["sigma"] = sigma

    def _build(self, ng: Any, parametrization: Any) -> Any:
        family = ng.families.ParametrizedTBPSA(naive=self._naive, initial_popsize=self._initial_popsize)
        return family(parametrization=parametrization, budget=None, num_workers=self.popsize)


#: Only optimisers seen working with current numpy (NGOpt-family selectors crash with numpy >= 2.3).
NEVERGRAD_OPTIMIZERS: dict[str, type[NevergradOptimizer]] = {
    "nevergrad.cma": NevergradCMA,
    "nevergrad.de": NevergradDE,
    "nevergrad.pso": NevergradPSO,
    "nevergrad.oneplusone": NevergradOnePlusOne,
    "nevergrad.tbpsa": NevergradTBPSA,
}


@hookimpl
def calibri_register_optimizers(register):
    for name, cls in NEVERGRAD_OPTIMIZERS.items():
        register(name, cls)
