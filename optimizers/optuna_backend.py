"""optuna samplers through ask-and-tell: TPE (default), CMA-ES, GP, random and QMC.

The study lives in a Journal file inside the run directory (``optimizer/optuna.journal``), so
optuna's own tools (optuna-dashboard) can read it. For exact resume the journal is cut back to
its length at the last checkpoint and the pickled sampler (with its random state) restored.
"""
from __future__ import annotations

import math
import os
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from calibri.core.hookspecs import hookimpl
from calibri.core.optimizer import Optimizer, OptimizerSettings
from calibri.core.space import Categorical, Float, Params, Space

SamplerName = Literal["tpe", "cmaes", "gp", "random", "qmc"]
JOURNAL_NAME = "optuna.journal"


def _distributions(space: Space) -> dict[str, Any]:
    import optuna.distributions as d

    out: dict[str, Any] = {}
    for dim in space.dims:
        if isinstance(dim, Categorical):
            out[dim.name] = d.CategoricalDistribution(dim.choices)
        elif isinstance(dim, Float):
            out[dim.name] = d.FloatDistribution(dim.low, dim.high, log=dim.log)
        else:
            out[dim.name] = d.IntDistribution(dim.low, dim.high, log=dim.log)
    return out


class OptunaOptimizer(Optimizer):
    """An optuna sampler driven by ask-and-tell, one full round asked per generation.

    ``sampler_options`` go to the sampler's constructor unchanged (e.g. ``n_startup_trials``).
    """

    kinds = frozenset({"float", "int", "categorical"})
    sampler_name: SamplerName = "tpe"

    def __init__(self, space: Space, settings: OptimizerSettings, *,
                 sampler_options: dict[str, Any] | None = None) -> None:
        super().__init__(space, settings)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._sampler_options = dict(sampler_options or {})
        self._distributions = _distributions(space)
        self._journal = Path(settings.workdir) / JOURNAL_NAME if settings.workdir else None
        self._open_study(self._make_sampler())
        self._enqueue_pending = True
        self._pending: list[Any] = []

    # -- construction ---------------------------------------------------------------------
    def _make_sampler(self) -> Any:
        import optuna.samplers as s

        seed = self.settings.seed % 2**32
        opts = dict(self._sampler_options)
        if self.sampler_name == "tpe":
            return s.TPESampler(seed=seed, **opts)
        if self.sampler_name == "random":
            return s.RandomSampler(seed=seed, **opts)
        if self.sampler_name == "qmc":
            opts.setdefault("scramble", True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "QMCSampler is experimental"
                return s.QMCSampler(seed=seed, warn_independent_sampling=False, **opts)
        if self.sampler_name == "gp":
            return s.GPSampler(seed=seed, **opts)
        # CMA-ES: optuna scales every dimension to [0, 1] and has one σ, so the user's σ is
        # given as the geometric mean of σ_i / range_i; x0 is the space's initial point.
        lows, highs = self.space.search_bounds()
        relative = self.space.search_sigmas(self.settings.sigma) / (highs - lows)
        opts.setdefault("sigma0", float(math.exp(np.mean(np.log(relative)))))
        opts.setdefault("x0", self.space.init_params())
        opts.setdefault("popsize", self.popsize)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # x0/sigma0 deprecated, still honoured
            return s.CmaEsSampler(seed=seed, **opts)

    def _open_study(self, sampler: Any) -> None:
        import optuna

        if self._journal is not None:
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            self._journal.parent.mkdir(parents=True, exist_ok=True)
            lock_path = f"{self._journal}.lock"
            if os.path.exists(lock_path):  # left by a killed run; this process is the only writer
                os.remove(lock_path)
            backend = JournalFileBackend(str(self._journal), lock_obj=JournalFileOpenLock(lock_path))
            storage: Any = optuna.storages.JournalStorage(backend)
        else:
            storage = optuna.storages.InMemoryStorage()
        self.sampler = sampler
        self.study = optuna.create_study(storage=storage, sampler=sampler, study_name="calibri",
                                         direction="minimize", load_if_exists=True)

    # -- ask and tell -----------------------------------------------------------------------
    def ask(self, n: int) -> list[Params]:
        if self._enqueue_pending and n > 0:
            self.study.enqueue_trial(self.space.init_params())
            self._enqueue_pending = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna warns about experimental samplers
            self._pending = [self.study.ask(self._distributions) for _ in range(n)]
        return [self._params_of(trial) for trial in self._pending]

    def _params_of(self, trial: Any) -> Params:
        return {name: trial.params[name] for name in self.space.names}

    def tell(self, candidates: Sequence[Params], losses: Sequence[float | None]) -> None:
        import optuna

        if len(losses) != len(self._pending):
            raise ValueError(f"told {len(losses)} losses for {len(self._pending)} asked candidates")
        for trial, loss in zip(self._pending, losses):
            if loss is None:
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(trial, float(loss))
        self._pending = []

    def recommend(self) -> Params:
        try:
            return dict(self.study.best_trial.params)
        except ValueError:  # nothing completed yet
            return self.space.init_params()

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        size = self._journal.stat().st_size if self._journal is not None and self._journal.exists() else 0
        state: dict[str, Any] = {"sampler": pickle.dumps(self.sampler), "journal_size": size,
                                 "enqueue_pending": self._enqueue_pending}
        if self._journal is None:
            state["storage"] = pickle.dumps(self.study._storage)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import optuna

        sampler = pickle.loads(state["sampler"])
        if self._journal is not None:
            with open(self._journal, "r+b") as handle:  # drop what was logged after the checkpoint
                handle.truncate(state["journal_size"])
            self._open_study(sampler)
        else:
            self.sampler = sampler
            self.study = optuna.create_study(storage=pickle.loads(state["storage"]), sampler=sampler,
                                             study_name="calibri", direction="minimize", load_if_exists=True)
        self._enqueue_pending = state["enqueue_pending"]
        self._pending = []


def _sampler_class(name: SamplerName, doc: str, *, uses_sigma: bool = False,
                   kinds: frozenset[str] = OptunaOptimizer.kinds) -> type[OptunaOptimizer]:
    attrs = {"sampler_name": name, "__doc__": doc, "uses_sigma": uses_sigma, "kinds": kinds}
    return type(f"Optuna{name.upper()}", (OptunaOptimizer,), attrs)


OPTUNA_OPTIMIZERS: dict[str, type[OptunaOptimizer]] = {
    "optuna.tpe": _sampler_class("tpe", "Tree-structured Parzen estimator (optuna TPESampler)."),
    "optuna.cmaes": _sampler_class("cmaes", "CMA-ES (optuna CmaEsSampler), x0 and one relative σ.",
                                   uses_sigma=True, kinds=frozenset({"float", "int"})),
    "optuna.gp": _sampler_class("gp", "Gaussian-process Bayesian optimisation (optuna GPSampler; needs torch)."),
    "optuna.random": _sampler_class("random", "Uniform random sampling (optuna RandomSampler)."),
    "optuna.qmc": _sampler_class("qmc", "Scrambled Sobol quasi-Monte Carlo (optuna QMCSampler)."),
}


@hookimpl
def calibri_register_optimizers(register):
    for name, cls in OPTUNA_OPTIMIZERS.items():
        register(name, cls, kinds=cls.kinds)
