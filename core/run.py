"""The run loop: ask → evaluate → tell, one round at a time, checkpointed after every round.

Determinism: the round seed is a pure function of (run seed, round); candidate values depend only
on the candidate and its round context; the optimiser's and the data stream's states, and the
global RNGs, are checkpointed after each round. So a run killed at any point and resumed ends with
exactly the trajectory of an uninterrupted one, whatever the number of workers.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import json
import os
import platform
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from .callbacks import RoundRecord, RunInfo
from .config import RunConfig, dump_config, validate
from .errors import IMPORT_HINT, CalibriError, ConfigError, PluginError, RunDirError, RunFailed, RunInterrupted
from .executor import Executor, ObjectiveRecipe
from .objective import RoundContext, to_loss
from .optimizer import Optimizer, OptimizerSettings
from .options import validate_options
from .plugins import Registration, add_plugin_modules, build_from, get_registry
from .space import Space, to_jsonable
from .store import EMPTY_DIGEST, RunStore, atomic_write_text
from .validation import Validator

#: best.json is a convenience view (the checkpoint is the record): rewritten when the best improves,
#: at most this often in seconds, and when the run finishes. Replacing a file costs ~1 ms on ext4.
BEST_JSON_INTERVAL = 1.0

VERSIONED_PACKAGES = ("calibri", "numpy", "pluggy", "pydantic", "cma", "nevergrad", "optuna", "torch", "diffusers")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def round_seed(seed: int, round_index: int) -> int:
    """The seed all candidates of a round share (common random numbers); stateless."""
    return int(np.random.SeedSequence([seed, round_index]).generate_state(1, dtype=np.uint32)[0])


#: The config's run-defining parts: a checkpoint continues only under the same ones. The rest
#: (budget, executor, validation, callbacks, ...) may change between sessions.
RUN_DEFINING = ("seed", "objective", "space", "optimizer")
RESUMABLE_CHANGES = ("budget", "executor", "validation", "callbacks", "max_failure_rate", "fsync", "name",
                     "plugins")


def run_defining(config: RunConfig) -> dict[str, Any]:
    """The parts of ``config`` that decide the trajectory, as plain JSON values."""
    dumped = config.model_dump(mode="json")
    return {key: dumped[key] for key in RUN_DEFINING}


def config_changes(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON-like values (``optimizer.name: 'a' → 'b'``)."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in list(before) + [k for k in after if k not in before]:
            out += config_changes(before.get(key), after.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if before == after else [f"{prefix or 'config'} changed from {before!r} to {after!r}"]


def refuse_changed_config(state: dict[str, Any], defining: dict[str, Any], config_path: Path) -> None:
    """A one-line :class:`RunDirError` saying what changed when ``defining`` differs from the
    run-defining config ``state`` was checkpointed under."""
    made_with = state.get("config")
    if made_with is None or made_with == defining:
        return
    changes = config_changes(made_with, defining)
    more = f" (and {len(changes) - 3} more)" if len(changes) > 3 else ""
    raise RunDirError(f"{config_path}: {'; '.join(changes[:3])}{more} since the run started; on resume only "
                      f"{', '.join(RESUMABLE_CHANGES)} may change; start a new run for the rest")


@dataclass
class Plan:
    """A config checked against the registry: everything resolved that can be without building
    the objective."""

    config: RunConfig
    objective: Registration
    optimizer: Registration
    executor: Registration
    callbacks: list[tuple[Registration, dict[str, Any]]]
    recipe: ObjectiveRecipe
    space: Space | None
    optimizer_options: dict[str, Any]
    executor_options: dict[str, Any]

    def drop_callback(self, name: str) -> None:
        """Leave out a (validated) callback in this process, e.g. ``progress`` for ``--quiet``."""
        self.callbacks = [(reg, options) for reg, options in self.callbacks if reg.name != name]


def plan(config: RunConfig) -> Plan:
    """Resolve plugin names and options and the space; raises :class:`ConfigError` on any mistake."""
    for i, module_name in enumerate(config.plugins):
        try:
            importlib.import_module(module_name)
        except Exception as exc:
            hint = f" ({IMPORT_HINT})" if isinstance(exc, ModuleNotFoundError) else ""
            raise ConfigError(f"plugins.{i}", f"cannot import plugin module {module_name!r}: "
                                              f"{type(exc).__name__}: {exc}{hint}") from None
    registry = add_plugin_modules(*config.plugins) if config.plugins else get_registry()
    objective = registry.get("objectives", config.objective.name, "objective.name")
    objective_options = validate_options(objective.factory, config.objective.options, "objective.options",
                                         reserved=("device",))
    check = objective.extras.get("check")
    if check is not None:  # the plugin's cheap checks of its options, before anything is built
        build_from(objective, check, **objective_options)
    optimizer = registry.get("optimizers", config.optimizer.name, "optimizer.name")
    optimizer_options = validate_options(optimizer.factory, config.optimizer.options, "optimizer.options", skip=2)
    executor = registry.get("executors", config.executor.name, "executor.name")
    executor_options = validate_options(executor.factory, config.executor.options, "executor.options", skip=1,
                                        reserved=("workers", "devices", "run_dir"))
    callbacks = []
    for i, spec in enumerate(config.callbacks):
        reg = registry.get("callbacks", spec.name, f"callbacks.{i}.name")
        callback_options = validate_options(reg.factory, spec.options, f"callbacks.{i}.options")
        check = reg.extras.get("check")
        if check is not None:  # e.g. a missing optional package: said now, not after the run
            build_from(reg, check, **callback_options)
        callbacks.append((reg, callback_options))

    space = resolve_space(config, objective, objective_options)
    if space is not None:
        check_space(space, optimizer)
        # Build the optimiser once, without a run directory, so that a mistake in its options
        # (nested ones included) is reported now, before the objective is loaded.
        build_optimizer(optimizer, optimizer_options, space, config, workdir=None)
    recipe = ObjectiveRecipe(config.objective.name, objective_options, tuple(config.plugins))
    return Plan(config, objective, optimizer, executor, callbacks, recipe, space, optimizer_options,
                executor_options)


def resolve_space(config: RunConfig, objective: Registration, objective_options: dict[str, Any]) -> Space | None:
    if config.space is not None:
        named = config.space.get("name")
        if isinstance(named, str):
            registry = get_registry()
            reg = registry.get("spaces", named, "space.name")
            options = validate_options(reg.factory, config.space.get("options", {}), "space.options")
            unknown = set(config.space) - {"name", "options"}
            if unknown:
                raise ConfigError(f"space.{sorted(unknown)[0]}", "unknown key next to a named space (known: name, options)")
            return build_from(reg, reg.factory, **options)
        for key, entry in config.space.items():
            if not isinstance(entry, dict):
                raise ConfigError(f"space.{key}", f"expected a mapping with type/low/high, got {entry!r}")
        return Space.from_config(config.space)
    provider = objective.extras.get("space")
    if provider is not None:
        return build_from(objective, provider, **objective_options)
    return None


def build_optimizer(registration: Registration, options: dict[str, Any], space: Space, config: RunConfig,
                    workdir: Path | None) -> Optimizer:
    """The configured optimiser on ``space``. Whatever its constructor rejects is a config error:
    the options are the user's, and this runs before the first evaluation."""
    settings = OptimizerSettings(seed=config.seed, sigma=config.optimizer.sigma, popsize=config.optimizer.popsize,
                                 workdir=workdir)
    try:
        return build_from(registration, registration.factory, space, settings, **options)
    except CalibriError:
        raise
    except Exception as exc:
        raise ConfigError("optimizer", f"{registration.name!r} rejects this configuration: "
                                       f"{type(exc).__name__}: {exc}") from None


def check_space(space: Space, optimizer: Registration) -> None:
    kinds = optimizer.extras.get("kinds") or getattr(optimizer.factory, "kinds", None) or {"float", "int"}
    space.check_kinds(kinds, f"optimizer {optimizer.name!r}")


class Runner:
    """Executes a :class:`Plan` in a run directory (fresh, or resumed from its checkpoint)."""

    def __init__(self, plan_: Plan, store: RunStore, defining: dict[str, Any] | None = None,
                 quiet: bool = False) -> None:
        self.plan = plan_
        self.config = plan_.config
        self.store = store
        self.quiet = quiet
        #: the run-defining part of the config as written to config.yaml (what a checkpoint records)
        self.defining = defining if defining is not None else run_defining(plan_.config)

    def _build_executor(self) -> Executor:
        reg = self.plan.executor
        cfg = self.config.executor
        extra: dict[str, Any] = {}
        if "run_dir" in inspect.signature(reg.factory).parameters:  # where an executor writes what it shows
            extra["run_dir"] = str(self.store.path)
        return build_from(reg, reg.factory, self.plan.recipe, workers=cfg.workers, devices=cfg.devices,
                          **extra, **self.plan.executor_options)

    def _build_stream(self) -> Any:
        provider = self.plan.objective.extras.get("stream")
        if provider is None:
            return None
        return build_from(self.plan.objective, provider, seed=self.config.seed, **self.plan.recipe.options)

    def execute(self, resume: bool = False, create: Callable[[], None] | None = None) -> dict[str, Any]:
        """Run to the budget. ``create`` (a fresh run) makes the run directory once the objective
        is built and its space checked, so a config rejected until then leaves nothing behind."""
        try:
            return self._execute(resume, create)
        except KeyboardInterrupt:
            if not self.store.exists():
                raise RunInterrupted("interrupted before the run started") from None
            if not self.store.checkpoint_files():
                raise RunInterrupted(f"interrupted before the first round finished; start it again with: "
                                     f"calibri resume {self.store.path}") from None
            raise RunInterrupted(f"interrupted; the last finished round is saved, continue with: "
                                 f"calibri resume {self.store.path}") from None

    def _execute(self, resume: bool, create: Callable[[], None] | None) -> dict[str, Any]:
        config, store = self.config, self.store
        callbacks = [build_from(reg, reg.factory, **options) for reg, options in self.plan.callbacks]
        with self._build_executor() as executor:
            info = executor.describe()
            space = self.plan.space or info.space
            if space is None:
                raise ConfigError("space", f"objective {config.objective.name!r} defines no space; give one under space:")
            if self.plan.space is None:  # not checked by plan(): check it and the optimiser's options now
                check_space(space, self.plan.optimizer)
                build_optimizer(self.plan.optimizer, self.plan.optimizer_options, space, config, workdir=None)
            stream = self._build_stream()
            if create is not None:
                create()
            direction = info.direction
            optimizer = build_optimizer(self.plan.optimizer, self.plan.optimizer_options, space, config,
                                        workdir=store.optimizer_dir)
            validator = Validator(stream, config.validation.every, store, direction)
            state = store.load_checkpoint() if resume else None
            if state is not None:
                self._check_resumable(state, direction)
                state.setdefault("validation", Validator.initial_state())
                state["direction"] = direction
                state["config"] = self.defining
                store.truncate_trials(state["n_evals"])
                state["trials_digest"] = store.verify_trials(state["n_evals"], state.get("trials_digest"))
                store.truncate_validation(state["validation"]["count"])
                try:
                    optimizer.load_state_dict(state["optimizer"])
                except Exception as exc:  # noqa: BLE001 - a state from another optimiser or version
                    raise RunDirError(f"{store.checkpoint_dir}: the saved optimiser state does not load into "
                                      f"{self.plan.optimizer.name!r} ({type(exc).__name__}: {exc}); "
                                      f"start a new run") from None
                if stream is not None and state.get("stream") is not None:
                    stream.load_state_dict(state["stream"])
                random.setstate(state["rng"]["python"])
                np.random.set_state(state["rng"]["numpy"])
            else:
                store.truncate_trials(0)
                store.truncate_validation(0)
                state = {"round": 0, "n_evals": 0, "n_failed": 0, "elapsed": 0.0, "best": None,
                         "finished": False, "last_error": None, "validation": Validator.initial_state(),
                         "direction": direction, "config": self.defining, "trials_digest": EMPTY_DIGEST}

            budget = config.budget
            for cb in callbacks:
                _call(cb, "on_run_start", RunInfo(str(store.path), direction, state["round"], budget.rounds,
                                                  budget.evaluations, resume, self.quiet))
            started = time.monotonic() - state["elapsed"]
            saved = copy.deepcopy(state)  # the state as of the newest checkpoint
            try:
                validator.baseline(state["validation"], executor, space)
                best_pending, best_written = False, -float("inf")
                while not self._done(state, started):
                    self._one_round(state, executor, optimizer, stream, space, direction)
                    state["elapsed"] = time.monotonic() - started
                    state["finished"] = self._done(state, started)
                    if validator.due(state["round"], state["finished"]):
                        incumbent = space.from_json(json.dumps(state["best"]["params"])) if state["best"] else None
                        validator.validate(state["validation"], executor, state["round"], optimizer.recommend(),
                                           incumbent)
                    store.save_checkpoint({**state, "optimizer": optimizer.state_dict(),
                                           "stream": stream.state_dict() if stream is not None else None,
                                           "rng": {"python": random.getstate(), "numpy": np.random.get_state()}})
                    saved = copy.deepcopy(state)
                    best_pending = best_pending or state["best_changed"]
                    if state["finished"] or (best_pending and time.monotonic() - best_written >= BEST_JSON_INTERVAL):
                        store.write_best(self._best_json(state, optimizer, space, direction))
                        best_pending, best_written = False, time.monotonic()
                    selected = state["validation"]["selected"]
                    record = RoundRecord(state["round"] - 1, state["n_evals"], state["n_failed"],
                                         state["round_best"], state["best"]["value"] if state["best"] else None,
                                         state["elapsed"], selected["value"] if selected else None)
                    for cb in callbacks:
                        _call(cb, "on_round_end", record)
                    if state["n_failed"] > config.max_failure_rate * state["n_evals"]:
                        store.write_best(self._best_json(state, optimizer, space, direction))
                        raise RunFailed(f"{state['n_failed']} of {state['n_evals']} evaluations failed, more than "
                                        f"max_failure_rate={config.max_failure_rate:g}; last error: "
                                        f"{state['last_error']}")
            except KeyboardInterrupt:
                self._interrupted(saved, optimizer, space, direction, callbacks)
                raise
            except Exception as exc:  # let callbacks close what they opened (on_run_failed)
                _call_each(callbacks, "on_run_failed", exc, "the run's error")
                raise
            state["finished"] = True  # also when resumed after a kill that came before best.json
            store.write_best(self._best_json(state, optimizer, space, direction))
            summary = self._summary(state, optimizer, space, direction)
        # after the workers are gone: an end-of-run callback may load the model itself
        for cb in callbacks:
            _call(cb, "on_run_end", summary)
        return summary

    def _check_resumable(self, state: dict[str, Any], direction: str) -> None:
        """Refuse to continue a checkpoint under a config or an objective it was not made with:
        the trajectory would silently become another run's."""
        refuse_changed_config(state, self.defining, self.store.config_path)
        made_for = state.get("direction") or (self.store.read_best() or {}).get("direction")
        if made_for is not None and made_for != direction:
            raise RunDirError(f"{self.store.path}: the run was made to {made_for} and its objective now says "
                              f"{direction} (its values and best would mix both); start a new run")

    def _interrupted(self, saved: dict[str, Any], optimizer: Optimizer, space: Space, direction: str,
                     callbacks: list[Any]) -> None:
        """Ctrl-C: bring best.json up to the newest checkpoint (it may lag by many rounds) and
        let callbacks draw what they draw at the end (``on_run_interrupted``). Best effort: a
        failure here must not hide the interrupt."""
        if saved["round"] == 0 and saved["validation"]["count"] == 0:
            return
        try:
            summary = self._summary(saved, optimizer, space, direction)
            self.store.write_best({k: v for k, v in summary.items() if k != "run_dir"})
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"calibri: best.json not updated after the interrupt: {type(exc).__name__}: {exc}",
                          RuntimeWarning, stacklevel=2)
            return
        _call_each(callbacks, "on_run_interrupted", summary, "the interrupt")

    def _done(self, state: dict[str, Any], started: float) -> bool:
        budget = self.config.budget
        return ((budget.rounds is not None and state["round"] >= budget.rounds)
                or (budget.evaluations is not None and state["n_evals"] >= budget.evaluations)
                or (budget.seconds is not None and time.monotonic() - started >= budget.seconds))

    def _one_round(self, state: dict[str, Any], executor: Executor, optimizer: Optimizer, stream: Any,
                   space: Space, direction: str) -> None:
        budget = self.config.budget
        n = optimizer.popsize
        if budget.evaluations is not None:
            n = min(n, budget.evaluations - state["n_evals"])
        index = state["round"]
        data = stream.next_round(index) if stream is not None else {}
        ctx = RoundContext(round=index, seed=round_seed(self.config.seed, index), data=data)
        candidates = optimizer.ask(n)
        if len(candidates) != n:
            raise PluginError(f"optimizer {self.plan.optimizer.name!r} returned {len(candidates)} candidates "
                              f"when asked for {n} (round {index})")
        results = executor.evaluate(candidates, ctx)
        records, losses = [], []
        round_best, best, n_failed, last_error = None, state["best"], state["n_failed"], state["last_error"]
        for offset, (params, result) in enumerate(zip(candidates, results)):
            candidate_id = state["n_evals"] + offset
            records.append({"round": index, "candidate": candidate_id, "params": to_jsonable(params),
                            "value": result.value, "metrics": result.metrics, "artifacts": result.artifacts,
                            "seed": ctx.seed, "wall_time": result.wall_time, "status": result.status,
                            **({"error": result.error} if result.error else {})})
            if result.ok:
                losses.append(to_loss(result.value, direction))
                if round_best is None or to_loss(result.value, direction) < to_loss(round_best, direction):
                    round_best = result.value
                if best is None or to_loss(result.value, direction) < to_loss(best["value"], direction):
                    best = {"value": result.value, "params": to_jsonable(params), "round": index,
                            "candidate": candidate_id}
            else:
                losses.append(None)
                n_failed, last_error = n_failed + 1, result.error
        digest = self.store.append_trials(records, state["trials_digest"])
        optimizer.tell(candidates, losses)
        # the round's outcome enters the state in one step, after the trials are written and told
        state.update({"round": index + 1, "n_evals": state["n_evals"] + len(candidates), "n_failed": n_failed,
                      "last_error": last_error, "round_best": round_best, "best_changed": best is not state["best"],
                      "best": best, "trials_digest": digest})

    def _best_json(self, state: dict[str, Any], optimizer: Optimizer, space: Space, direction: str) -> dict[str, Any]:
        """best.json's content; its counts say how far the run was when it was written."""
        out = {"direction": direction, "best": state["best"], "recommendation": to_jsonable(optimizer.recommend()),
               "rounds": state["round"], "evaluations": state["n_evals"], "failures": state["n_failed"],
               "elapsed_seconds": round(state["elapsed"], 3), "finished": state["finished"]}
        validation = Validator.summary(state.get("validation") or Validator.initial_state())
        if validation is not None:
            out["validation"] = validation
        return out

    def _summary(self, state: dict[str, Any], optimizer: Optimizer, space: Space, direction: str) -> dict[str, Any]:
        return {"run_dir": str(self.store.path), **self._best_json(state, optimizer, space, direction)}


def _call(callback: Any, method: str, argument: Any) -> None:
    handler = getattr(callback, method, None)
    if handler is not None:
        handler(argument)


def _call_each(callbacks: list[Any], method: str, argument: Any, after: str) -> None:
    """Every callback's ``method``, when the run has stopped early (``after`` says why). Best
    effort: a callback's failure is a warning, so that it cannot hide the interrupt or the error."""
    for cb in callbacks:
        try:
            _call(cb, method, argument)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"calibri: callback {type(cb).__name__} failed after {after}: "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)


#: What ``quiet`` puts in the environment for the run's duration: read when a library is imported,
#: so they reach worker processes (started with this environment) and libraries imported later.
QUIET_ENVIRONMENT = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


@contextlib.contextmanager
def quiet_libraries(active: bool = True) -> Iterator[None]:
    """No progress bars from diffusers, transformers and huggingface_hub while the block runs.

    Their switches are process-wide: those already imported are switched off here and restored
    after; the environment (:data:`QUIET_ENVIRONMENT`) covers worker processes, which the executors
    start with this process's environment, and libraries first imported during the block (those
    keep their bars off for the rest of the process)."""
    if not active:
        yield
        return
    import sys

    saved_env = {name: os.environ.get(name) for name in QUIET_ENVIRONMENT}
    os.environ.update(QUIET_ENVIRONMENT)
    restore: list[Callable[[], None]] = []
    for name in ("diffusers", "transformers"):
        if name in sys.modules:
            with contextlib.suppress(Exception):
                log = importlib.import_module(f"{name}.utils.logging")
                if log.is_progress_bar_enabled():
                    log.disable_progress_bar()
                    restore.append(log.enable_progress_bar)
    if "huggingface_hub" in sys.modules:
        with contextlib.suppress(Exception):
            hub = importlib.import_module("huggingface_hub.utils")
            if not hub.are_progress_bars_disabled():
                hub.disable_progress_bars()
                restore.append(hub.enable_progress_bars)
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for undo in restore:
            with contextlib.suppress(Exception):
                undo()


def start_run(config: RunConfig, run_dir: str | Path, overwrite: bool = False,
              quiet: bool = False) -> dict[str, Any]:
    """Validate, create the run directory (config.yaml resolved) and run to the budget.
    ``quiet`` leaves out the ``progress`` callback (once validated) in this process only, and
    silences libraries' progress bars (:func:`quiet_libraries`) while the run lasts."""
    plan_ = plan(config)
    if quiet:
        plan_.drop_callback("progress")
    resolved = config.model_copy(update={"versions": package_versions()})
    if plan_.space is not None and config.space is None:
        resolved = resolved.model_copy(update={"space": plan_.space.to_config()})
    store = RunStore(run_dir, fsync=config.fsync)
    store.check_new(overwrite)  # fail fast, before the objective is built (and before any lock file)
    existed = store.path.exists()
    try:
        with store.lock(), quiet_libraries(quiet):
            store.check_new(overwrite)  # again, now that no other process can be creating it
            return Runner(plan_, store, run_defining(resolved), quiet=quiet).execute(
                resume=False, create=lambda: store.create(dump_config(resolved), overwrite=overwrite))
    finally:
        if not existed and not store.exists():  # rejected before the run began: leave nothing behind
            store.lock_path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                store.path.rmdir()


def resume_run(run_dir: str | Path, budget_overrides: dict[str, Any] | None = None,
               quiet: bool = False, trust_checkpoint: bool = False) -> dict[str, Any]:
    """Continue a run from its newest readable checkpoint (or from the start if it has none).
    ``trust_checkpoint`` loads checkpoints this user's key did not sign (they run code)."""
    from .config import read_yaml

    store = RunStore(run_dir, trust_checkpoints=trust_checkpoint)
    store.require()
    with store.lock(), quiet_libraries(quiet):
        data = read_yaml(store.config_path)
        if budget_overrides:
            data.setdefault("budget", {}).update(budget_overrides)
        config = validate(data)
        store.fsync = config.fsync
        checkpoint = store.load_checkpoint()
        if checkpoint is not None:  # before anything is built or written
            refuse_changed_config(checkpoint, run_defining(config), store.config_path)
            store.verify_trials(checkpoint["n_evals"], checkpoint.get("trials_digest"))
        plan_ = plan(config)
        if quiet:
            plan_.drop_callback("progress")
        if budget_overrides:
            atomic_write_text(store.config_path, dump_config(config))
        if checkpoint is None:  # killed before the first checkpoint: start over
            for path in store.optimizer_dir.glob("*"):
                path.unlink()
        return Runner(plan_, store, quiet=quiet).execute(resume=True)
