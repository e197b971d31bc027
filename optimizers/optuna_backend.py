"""optuna samplers through ask-and-tell: TPE (default), CMA-ES, GP, random and QMC.

The study lives in a Journal file inside the run directory (``optimizer/optuna.journal``), in
the format of optuna's ``JournalFileBackend``, so optuna's own tools (optuna-dashboard) can read
it. For exact resume the journal is cut back to its length at the last checkpoint and the pickled
sampler (with its random state) restored.
"""
from __future__ import annotations

import json
import math
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from calibri.core.hookspecs import hookimpl
from calibri.core.optimizer import Optimizer, OptimizerSettings
from calibri.core.options import validate_options
from calibri.core.space import Categorical, Float, Params, Space

SamplerName = Literal["tpe", "cmaes", "gp", "random", "qmc"]
JOURNAL_NAME = "optuna.journal"


class RunJournalBackend:
    """A single-writer journal backend: optuna's JournalFileBackend format, served from memory.

    optuna's file backend takes a file lock, re-reads the file and fsyncs on every operation,
    which costs milliseconds per parameter; a run directory has one writer, so this backend
    appends lines with a flush and answers reads from the logs it holds.
    """

    def __init__(self, path: Path) -> None:
        self._logs: list[dict[str, Any]] = []
        if path.exists():
            complete = 0
            with open(path, "rb") as handle:
                for line in handle:
                    if not line.endswith(b"\n"):
                        break  # a half-written last line: the checkpoint never covered it
                    self._logs.append(json.loads(line))
                    complete += len(line)
            with open(path, "r+b") as handle:
                handle.truncate(complete)
        self._handle = open(path, "ab")

    def read_logs(self, log_number_from: int):
        return iter(self._logs[log_number_from:])

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self._logs.extend(logs)
        self._handle.write("".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode("utf-8"))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


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
        if self._journal is not None:
            self._open_journal()
        self._enqueue_pending = True
        self._pending: list[Any] = []

    # -- construction ---------------------------------------------------------------------
    def _checked_sampler_options(self) -> dict[str, Any]:
        """``sampler_options`` checked against the sampler's constructor: an unknown or mistyped
        key is a one-line config error naming it, not a traceback from deep inside optuna."""
        import optuna.samplers as s

        sampler_class = {"tpe": s.TPESampler, "random": s.RandomSampler, "qmc": s.QMCSampler, "gp": s.GPSampler,
                         "cmaes": s.CmaEsSampler}[self.sampler_name]
        return validate_options(sampler_class, self._sampler_options, "optimizer.options.sampler_options",
                                reserved=("seed",))

    def _make_sampler(self) -> Any:
        import optuna.samplers as s

        seed = self.settings.seed % 2**32
        opts = self._checked_sampler_options()
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
        opts.setdefault("n_startup_trials", 0)
        from ._optuna_cmaes import FixedSpaceCmaEsSampler

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # x0/sigma0 deprecated, still honoured
            return FixedSpaceCmaEsSampler(self._distributions, seed=seed, **opts)

    def _open_study(self, sampler: Any, trials: Sequence[Any] = (), study_attrs: dict[str, Any] | None = None) -> None:
        """The working study: in memory (optuna's journal storage re-scans and deep-copies all
        trials on every ask, O(n²) over a run), seeded with ``trials`` when resuming."""
        import optuna

        self.sampler = sampler
        self.study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), sampler=sampler,
                                         study_name="calibri", direction="minimize")
        for key, value in (study_attrs or {}).items():
            self.study._storage.set_study_system_attr(self.study._study_id, key, value)
        self.study.add_trials(trials)

    def _open_journal(self) -> None:
        """The journal mirror in the run directory; each round's finished trials are appended."""
        import optuna
        from optuna.storages.journal import BaseJournalBackend

        BaseJournalBackend.register(RunJournalBackend)
        if getattr(self, "_backend", None) is not None:
            self._backend.close()
        self._journal.parent.mkdir(parents=True, exist_ok=True)
        self._backend = RunJournalBackend(self._journal)
        self._mirror = optuna.create_study(storage=optuna.storages.JournalStorage(self._backend),
                                           study_name="calibri", direction="minimize", load_if_exists=True)

    def _study_attrs(self, study: Any) -> dict[str, Any]:
        return study._storage.get_study_system_attrs(study._study_id)

    def _mirror_round(self, trials: Sequence[Any]) -> None:
        if self._journal is None:
            return
        mirror_attrs = self._study_attrs(self._mirror)
        for key, value in self._study_attrs(self.study).items():
            if mirror_attrs.get(key, object()) != value:
                self._mirror._storage.set_study_system_attr(self._mirror._study_id, key, value)
        self._mirror.add_trials([self.study._storage.get_trial(trial._trial_id) for trial in trials])

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
        self._mirror_round(self._pending)
        self._pending = []

    def recommend(self) -> Params:
        try:
            return dict(self.study.best_trial.params)
        except ValueError:  # nothing completed yet
            return self.space.init_params()

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"sampler": pickle.dumps(self.sampler), "enqueue_pending": self._enqueue_pending}
        if self._journal is not None:  # the journal holds the trials: remember how much of it
            state["journal_size"] = self._backend._handle.tell()
        else:
            state["trials"] = self.study.get_trials(deepcopy=False)
            state["study_attrs"] = self._study_attrs(self.study)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = pickle.loads(state["sampler"])
        if self._journal is not None:
            self._backend.close()
            with open(self._journal, "r+b") as handle:  # drop what was logged after the checkpoint
                handle.truncate(state["journal_size"])
            self._open_journal()
            self._open_study(sampler, self._mirror.get_trials(deepcopy=False), self._study_attrs(self._mirror))
        else:
            self._open_study(sampler, state["trials"], state["study_attrs"])
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
