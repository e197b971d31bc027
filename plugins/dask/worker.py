"""What runs on a Dask worker: the objective, built once per worker, and the tasks that use it.

The run registers one :class:`ObjectivePlugin` (a ``distributed.WorkerPlugin``) holding only the
recipe. Dask installs it on every worker, those that join mid-run included; the objective is
built on the worker's first chunk (so a model loads once per worker, never per round, and a
build error reaches the run as the task's exception) and closed when the run unregisters the
plugin or the worker stops.
"""
from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Sequence
from typing import Any

from distributed import WorkerPlugin, get_worker

from calibri.core.errors import PluginError
from calibri.core.executor import ObjectiveInfo, ObjectiveRecipe, evaluate_batch
from calibri.core.objective import EvalResult, Objective, RoundContext
from calibri.core.space import Params

#: Event topic on which a worker announces that it starts evaluating a chunk (for task_timeout).
START_TOPIC = "calibri-chunk-start"
#: A remote worker's device for the objective (``device=``), when it has one.
DEVICE_VARIABLE = "CALIBRI_DEVICE"


def worker_device(name: Any, devices: Sequence[str]) -> str | None:
    """A local cluster's worker ``i`` (its name) gets ``devices[i]``; any other worker the device
    its environment names in ``CALIBRI_DEVICE``, else none (the objective's default)."""
    if devices:
        try:
            return devices[int(name) % len(devices)]
        except (TypeError, ValueError):
            pass
    return os.environ.get(DEVICE_VARIABLE) or None


class ObjectivePlugin(WorkerPlugin):
    """One run's objective on one worker: built on first use, kept, closed at teardown."""

    def __init__(self, recipe: ObjectiveRecipe, devices: Sequence[str] = ()) -> None:
        self.recipe = recipe
        self.devices = tuple(devices)

    def setup(self, worker: Any) -> None:
        self.device = worker_device(worker.name, self.devices)
        self.lock = threading.Lock()  # one chunk at a time uses the objective
        self.closed = False
        self._objective: Objective | None = None
        for module in self.recipe.plugin_modules:  # the config's plugins, as in the run's process
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001 - the first chunk's build reports it
                pass

    def objective(self) -> Objective:
        """The worker's objective; call with :attr:`lock` held."""
        if self._objective is None:
            try:
                self._objective = self.recipe.build(self.device)
            except SystemExit as exc:  # sys.exit() while building is not the worker's exit
                raise PluginError(f"objective {self.recipe.name!r} raised SystemExit({exc}) "
                                  f"while being built on a Dask worker") from None
        return self._objective

    def close_objective(self) -> None:
        """Close the objective; call with :attr:`lock` held."""
        objective, self._objective = self._objective, None
        if objective is not None:
            objective.close()

    def teardown(self, worker: Any) -> None:
        self.closed = True
        if self.lock.acquire(blocking=False):
            try:
                self.close_objective()
            finally:
                self.lock.release()
        # else a chunk is still running: it closes the objective when it ends


def _plugin(name: str) -> tuple[Any, ObjectivePlugin]:
    worker = get_worker()
    plugin = worker.plugins.get(name)
    if not isinstance(plugin, ObjectivePlugin):
        raise PluginError(f"this Dask worker ({worker.address}) has no calibri objective {name!r}; "
                          f"the run that registered it has ended")
    return worker, plugin


def evaluate_chunk(name: str, token: str, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
    """The task: evaluate a chunk with this worker's objective (the ``evaluate_batch`` rules: a
    raising candidate fails alone). Announces its start once the objective is built, so that
    ``task_timeout`` counts evaluation only, not a model's first load."""
    worker, plugin = _plugin(name)
    with plugin.lock:
        objective = plugin.objective()
        worker.log_event(START_TOPIC, {"token": token, "worker": worker.address})
        try:
            return evaluate_batch(objective, candidates, ctx)
        finally:
            if plugin.closed:  # the run ended while this chunk ran
                plugin.close_objective()


def describe_objective(name: str) -> ObjectiveInfo:
    """The objective's direction and space, as this worker built it."""
    _, plugin = _plugin(name)
    with plugin.lock:
        objective = plugin.objective()
        return ObjectiveInfo(objective.direction, objective.space)
