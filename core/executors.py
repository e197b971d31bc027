"""Built-in executors: ``serial`` (in-process) and ``process`` (one local process per device)."""
from __future__ import annotations

import multiprocessing
import multiprocessing.util
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from .executor import Executor, ObjectiveInfo, ObjectiveRecipe, evaluate_batch
from .errors import PluginError
from .hookspecs import hookimpl
from .objective import EvalResult, Objective, RoundContext
from .space import Params


class SerialExecutor(Executor):
    """Evaluates each round as one batch in this process; the objective is built once."""

    def __init__(self, recipe: ObjectiveRecipe, *, workers: int = 1, devices: list[str] | None = None) -> None:
        self.objective: Objective = recipe.build(devices[0] if devices else None)

    def describe(self) -> ObjectiveInfo:
        return ObjectiveInfo(self.objective.direction, self.objective.space)

    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        return evaluate_batch(self.objective, candidates, ctx)

    def close(self) -> None:
        self.objective.close()


# -- worker-process side ----------------------------------------------------------------------
_worker_recipe: ObjectiveRecipe | None = None
_worker_device: str | None = None
_worker_objective: Objective | None = None


def _init_worker(recipe: ObjectiveRecipe, devices: Any) -> None:
    global _worker_recipe, _worker_device
    _worker_recipe = recipe
    _worker_device = devices.get() if devices is not None else None


def _objective() -> Objective:
    """This worker's objective, built on first use (so a build error reaches the caller as an
    exception rather than breaking the pool) and kept for the worker's life."""
    global _worker_objective
    if _worker_objective is None:
        assert _worker_recipe is not None
        _worker_objective = _worker_recipe.build(_worker_device)
        multiprocessing.util.Finalize(None, _worker_objective.close, exitpriority=10)  # at worker exit
    return _worker_objective


def _worker_describe() -> ObjectiveInfo:
    objective = _objective()
    return ObjectiveInfo(objective.direction, objective.space)


def _worker_evaluate(candidates: list[Params], ctx: RoundContext) -> list[EvalResult]:
    return evaluate_batch(_objective(), candidates, ctx)


class ProcessExecutor(Executor):
    """A pool of local worker processes (``spawn``), each building the objective once.

    ``devices`` assigns one device string per worker (``["cuda:0", "cuda:1"]``); the objective
    factory receives it as ``device=`` if it takes that argument. A round is split into
    contiguous chunks, one per worker, and reassembled in order, so results do not depend on
    the number of workers. A crashed worker fails its chunk and the pool is restarted.
    """

    def __init__(self, recipe: ObjectiveRecipe, *, workers: int = 2, devices: list[str] | None = None) -> None:
        if devices:
            workers = len(devices)
        self.recipe, self.workers, self.devices = recipe, workers, devices
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        queue = None
        if self.devices:
            queue = context.Queue()
            for device in self.devices:
                queue.put(device)
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=context,
                                   initializer=_init_worker, initargs=(self.recipe, queue))

    def describe(self) -> ObjectiveInfo:
        try:
            return self._pool.submit(_worker_describe).result()
        except BrokenProcessPool as exc:
            raise PluginError(f"a worker process died while building objective {self.recipe.name!r}: {exc}") from None

    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        if getattr(self._pool, "_broken", False):  # a worker died while idle, between rounds
            self._restart()
        chunks = [list(chunk) for chunk in np.array_split(np.arange(len(candidates)), self.workers) if len(chunk)]
        futures = []
        for chunk in chunks:
            try:
                futures.append(self._pool.submit(_worker_evaluate, [candidates[i] for i in chunk], ctx))
            except BrokenProcessPool:  # the pool broke before this chunk was submitted
                futures.append(None)
        results: list[EvalResult] = []
        broken = False
        for chunk, future in zip(chunks, futures):
            try:
                if future is None:
                    raise BrokenProcessPool("the pool broke before the chunk was submitted")
                results.extend(future.result())
            except BrokenProcessPool:
                broken = True
                results.extend(EvalResult.failure("worker process died") for _ in chunk)
        if broken:
            self._restart()
        return results

    def _restart(self) -> None:
        # Python 3.11 can start a worker while a pool breaks and never stop it, and shutdown()
        # would wait for it forever: kill the workers first (no submit is in flight here).
        for process in list((getattr(self._pool, "_processes", None) or {}).values()):
            process.kill()
        self._pool.shutdown(cancel_futures=True)
        self._pool = self._start()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


@hookimpl
def calibri_register_executors(register):
    register("serial", SerialExecutor)
    register("process", ProcessExecutor)
