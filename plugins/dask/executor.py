"""The run's side of the ``dask`` executor: the cluster, the chunks of a round, and their faults.

A round is cut into small chunks (contiguous candidates) submitted as independent tasks; idle
workers take the next one, so a fast worker does more, and the results are put back in candidate
order. A candidate's value depends only on the candidate and its round context, so the trajectory
is the ``serial`` one whatever the number of workers or the chunk size.

Faults, in the order Dask and then calibri handle them:

- a worker that dies running a chunk: the scheduler re-runs the chunk on another worker, up to
  its ``allowed-failures`` times (``retries`` on a local cluster). A chunk that still fails is
  then evaluated one candidate at a time, and a candidate that kills its worker on its own fails
  alone (counted against ``max_failure_rate``), as with the ``process`` executor;
- a candidate that raises: one failure (``evaluate_batch``, on the worker);
- a chunk evaluating longer than ``task_timeout``: its candidates fail and its worker is restarted
  (through its nanny) so that the hung evaluation does not hold the worker;
- no worker able to run a chunk for ``worker_wait`` seconds, or the scheduler gone: the run stops
  with a one-line error naming the scheduler; the last finished round is checkpointed, so
  ``calibri resume`` continues it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import queue
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import distributed
from distributed.scheduler import KilledWorker

from calibri.core.errors import CalibriError, ConfigError, PluginError
from calibri.core.executor import Executor, ObjectiveInfo, ObjectiveRecipe, check_devices
from calibri.core.executors import THREAD_VARIABLES, threads_per_worker
from calibri.core.objective import EvalResult, RoundContext
from calibri.core.space import Params

from .worker import START_TOPIC, ObjectivePlugin, describe_objective, evaluate_chunk

#: Chunks per worker and round when ``chunk_size`` is not set: enough for idle workers to take
#: work from slow ones, few enough that a batched objective still sees batches.
CHUNKS_PER_WORKER = 4
#: Seconds between the run's checks of timeouts and of the cluster's workers while it waits.
POLL_SECONDS = 0.25
#: Seconds between asking the scheduler which workers it has.
WORKER_CHECK_SECONDS = 1.0
#: Name of the file in the run directory that records the cluster's addresses.
INFO_FILE = "dask.json"

SCHEDULER_FIELD = "executor.options.scheduler"


class ClusterLost(CalibriError):
    """No Dask worker is left to evaluate the round, or the scheduler is gone (exit status 1;
    the run is resumable from its last finished round)."""


@dataclass
class _Chunk:
    """Candidates (indices into the round) one task evaluates as one batch."""

    indices: list[int]
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    alone: bool = False  # split off a chunk whose workers kept dying


class DaskExecutor(Executor):
    """Evaluates rounds on a Dask distributed cluster; see the module docstring."""

    def __init__(self, recipe: ObjectiveRecipe, *, workers: int = 1, devices: list[str] | None = None,
                 scheduler: str | None = None, chunk_size: int | None = None, retries: int = 2,
                 task_timeout: float | None = None, resources: dict[str, float] | None = None,
                 connect_timeout: float = 30.0, worker_wait: float = 60.0,
                 dashboard: str | None = "127.0.0.1:8787", run_dir: str | Path | None = None) -> None:
        _check_options(scheduler, devices, chunk_size, retries, task_timeout, resources, connect_timeout,
                       worker_wait)
        self.recipe = recipe
        self.devices = list(devices) if devices else None
        self.workers = len(self.devices) if self.devices else max(1, workers)
        self.chunk_size, self.retries, self.task_timeout = chunk_size, retries, task_timeout
        self.worker_wait = worker_wait
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._dashboard_on = dashboard is not None
        self.cluster: distributed.LocalCluster | None = None
        self.client: distributed.Client | None = None
        self._environ: dict[str, str | None] = {}
        self._started: dict[str, tuple[float, str]] = {}
        self._info_written = False
        self._last_check = 0.0
        self._no_worker_since: float | None = None
        self.plugin_name = f"calibri-objective-{uuid.uuid4().hex[:12]}"
        try:
            if scheduler is None:
                self._start_local(dashboard)
            else:
                self._connect(scheduler, connect_timeout)
            self.address: str = self.client.scheduler.address  # type: ignore[union-attr]
            self.resources = self._resources(resources)
            self.client.register_plugin(ObjectivePlugin(recipe, self.devices or ()),  # type: ignore[union-attr]
                                        name=self.plugin_name)
            self.client.subscribe_topic(START_TOPIC, self._on_start)  # type: ignore[union-attr]
        except BaseException:
            self.close()
            raise
        self._announce()

    # -- the cluster ------------------------------------------------------------------------------
    def _start_local(self, dashboard: str | None) -> None:
        """A loopback cluster of worker processes with one task thread each; each worker's
        BLAS/OpenMP/torch threads are its share of the cores, unless the environment sets them."""
        check_devices(self.devices)
        threads = threads_per_worker(self.workers)
        # The nanny puts these in os.environ before it spawns a worker (and again when it
        # restarts one); this process's own values are put back once the workers are up, and
        # again in close(), so that another cluster or a `process` executor started here later
        # does not take them for the user's.
        self._environ = {name: os.environ.get(name) for name in (*THREAD_VARIABLES, "MALLOC_TRIM_THRESHOLD_",
                                                                   "PYTHONHASHSEED")}
        environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"),
                   **{name: threads for name in THREAD_VARIABLES},
                   # Dask's memory trimming (65536) makes every large allocation an mmap: it slows
                   # a CPU torch model several-fold. Workers allocate as `process` workers do.
                   "MALLOC_TRIM_THRESHOLD_": None}
        settings = {
            "distributed.nanny.pre-spawn-environ": environ,
            "distributed.scheduler.allowed-failures": self.retries,
            "distributed.scheduler.worker-saturation": 1.0,  # a worker holds only the chunk it runs
        }
        where = f" ({', '.join(self.devices)})" if self.devices else ""
        print(f"calibri: starting a Dask cluster of {self.workers} worker{'s' if self.workers > 1 else ''}"
              f"{where} on 127.0.0.1", file=sys.stderr, flush=True)
        with dask.config.set(settings), warnings.catch_warnings():
            # a busy dashboard port moves to a free one; the address printed below is the real one
            warnings.filterwarnings("ignore", message="Port .* is already in use")
            self.cluster = distributed.LocalCluster(
                n_workers=self.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                # without a dashboard the scheduler still serves /health: on a free port
                dashboard_address=dashboard or "127.0.0.1:0", memory_limit=0, silence_logs=logging.ERROR)
            self.client = distributed.Client(self.cluster, set_as_default=False)
        self._restore_environ()

    def _connect(self, address: str, timeout: float) -> None:
        try:
            self.client = distributed.Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ConfigError(SCHEDULER_FIELD, f"cannot reach {address} ({reason})") from None
        wanted = self.workers
        deadline = time.monotonic() + self.worker_wait
        while len(self._worker_addresses()) < wanted:
            if time.monotonic() > deadline:
                have = len(self._worker_addresses())
                raise ConfigError(SCHEDULER_FIELD, f"{address} has {have} of the {wanted} worker"
                                                   f"{'s' if wanted > 1 else ''} asked for (executor.workers) "
                                                   f"after {self.worker_wait:g} s; start workers with: "
                                                   f"dask worker {address}")
            time.sleep(POLL_SECONDS)

    def _worker_addresses(self, resources: dict[str, float] | None = None) -> list[str]:
        """Workers that can run a chunk (that have ``resources``)."""
        try:
            info = self.client.scheduler_info(n_workers=-1)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - the scheduler is gone
            raise ClusterLost(f"{SCHEDULER_FIELD}: lost the Dask scheduler at {self._address()} "
                              f"({type(exc).__name__}: {exc}); {self._resume_hint()}") from None
        return [address for address, worker in info.get("workers", {}).items()
                if all(worker.get("resources", {}).get(name, 0) >= amount
                       for name, amount in (resources or {}).items())]

    def _resources(self, resources: dict[str, float] | None) -> dict[str, float] | None:
        """What a chunk needs of a worker: the option, else one GPU if the workers advertise GPUs
        (so a GPU worker with several threads still evaluates one chunk at a time)."""
        if resources is not None:
            return dict(resources) or None
        if self.cluster is None and self._worker_addresses({"GPU": 1}):
            return {"GPU": 1}
        return None

    def _resume_hint(self) -> str:
        return f"continue the run with: calibri resume {self.run_dir or 'RUN_DIR'}"

    def _address(self) -> str:
        return getattr(self, "address", None) or "the scheduler"

    def _dashboard(self) -> str | None:
        """The dashboard's address: the local cluster's unless disabled, the remote scheduler's."""
        if self.cluster is not None and not self._dashboard_on:
            return None
        return self.client.dashboard_link  # type: ignore[union-attr]

    def _announce(self) -> None:
        """Print where the scheduler and its dashboard are."""
        count = len(self._worker_addresses())
        kind = "local" if self.cluster is not None else "remote"
        line = f"calibri: Dask {kind} scheduler {self.address}, {count} worker{'s' if count != 1 else ''}"
        link = self._dashboard()
        if link:
            line += f"; dashboard {link}"
            if self.cluster is not None and not _have("bokeh"):
                line += " (its plots need: pip install bokeh)"
        print(line, file=sys.stderr, flush=True)

    def _write_info(self) -> None:
        """``dask.json`` in the run directory: where the cluster and its dashboard are."""
        self._info_written = True
        if self.run_dir is None or not self.run_dir.is_dir():
            return
        info = {"scheduler": self.address, "local": self.cluster is not None,
                "dashboard": self._dashboard(),
                "workers": sorted(self._worker_addresses())}
        try:
            (self.run_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            warnings.warn(f"calibri: could not write {self.run_dir / INFO_FILE}: {exc}", RuntimeWarning,
                          stacklevel=3)

    # -- the contract -----------------------------------------------------------------------------
    def describe(self) -> ObjectiveInfo:
        future = self.client.submit(describe_objective, self.plugin_name, key=f"calibri-describe-{uuid.uuid4().hex}",  # type: ignore[union-attr]
                                    pure=False, resources=self.resources)
        done: queue.Queue = queue.Queue()
        future.add_done_callback(done.put)
        try:
            self._wait(done, {future.key: future}, "while building the objective")
            if future.status == "error" and isinstance(future.exception(), KilledWorker):
                raise PluginError(f"a Dask worker died while building objective {self.recipe.name!r} "
                                  f"({self.retries + 1 if self.cluster is not None else 'several'} attempts)")
            self._raise_if_lost(future)
            return future.result()
        finally:
            future.cancel()

    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        if not candidates:
            return []
        if not self._info_written:
            self._write_info()
        results: list[EvalResult | None] = [None] * len(candidates)
        done: queue.Queue = queue.Queue()
        running: dict[str, tuple[Any, _Chunk]] = {}
        where = "validation" if ctx.round < 0 else f"round {ctx.round}"

        def submit(chunk: _Chunk) -> None:
            future = self.client.submit(evaluate_chunk, self.plugin_name, chunk.token,  # type: ignore[union-attr]
                                        [candidates[i] for i in chunk.indices], ctx, pure=False,
                                        key=f"calibri-chunk-{chunk.token}", resources=self.resources)
            running[future.key] = (future, chunk)
            future.add_done_callback(done.put)

        try:
            for chunk in self._chunks(len(candidates)):
                submit(chunk)
            while running:
                future = self._wait(done, {key: f for key, (f, _) in running.items()}, f"in {where}", running,
                                    results)
                if future is None:  # timed out chunks were failed
                    continue
                future, chunk = running.pop(future.key)
                self._started.pop(chunk.token, None)
                if future.status == "finished":
                    for index, result in zip(chunk.indices, future.result()):
                        results[index] = result
                    continue
                self._raise_if_lost(future)
                error = future.exception()
                if not isinstance(error, KilledWorker):
                    raise error  # building the objective failed: the run's error, as with `process`
                for replacement in self._lost(chunk, where, results):
                    submit(replacement)
        except BaseException:
            for future, _ in running.values():  # a stopped round must not run on
                future.cancel()
            raise
        return results  # type: ignore[return-value]

    def close(self) -> None:
        client, cluster, self.client, self.cluster = self.client, self.cluster, None, None
        try:
            if client is not None:
                if client.status == "running":
                    try:  # each worker closes its objective (a remote cluster keeps running)
                        client.unregister_worker_plugin(self.plugin_name)
                    except Exception:  # noqa: BLE001 - not registered, or the cluster is gone
                        pass
                client.close()
            if cluster is not None:
                cluster.close()
        finally:
            self._restore_environ()
            self._environ = {}

    def _restore_environ(self) -> None:
        for name, value in self._environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    # -- rounds -----------------------------------------------------------------------------------
    def _chunks(self, n: int) -> Iterator[_Chunk]:
        size = self.chunk_size
        if size is None:
            workers = len(self._worker_addresses(self.resources)) if self.cluster is None else self.workers
            size = max(1, math.ceil(n / (CHUNKS_PER_WORKER * max(1, workers))))
        for start in range(0, n, size):
            yield _Chunk(list(range(start, min(n, start + size))))

    def _on_start(self, event: tuple[float, dict[str, str]]) -> None:
        """A worker began evaluating a chunk (runs in the client's thread)."""
        message = event[1]
        self._started[message["token"]] = (time.monotonic(), message["worker"])

    def _wait(self, done: queue.Queue, futures: dict[str, Any], what: str,
              running: dict[str, tuple[Any, _Chunk]] | None = None,
              results: list[EvalResult | None] | None = None) -> Any:
        """The next of ``futures`` to finish, or None after failing chunks that timed out; raises
        :class:`ClusterLost` when no worker could run them for ``worker_wait`` seconds."""
        while True:
            try:
                future = done.get(timeout=POLL_SECONDS)
            except queue.Empty:
                future = None
            if future is not None and future.key in futures:
                self._no_worker_since = None
                return future
            if running is not None and results is not None and self._timed_out(running, results):
                return None
            self._check_workers(what)

    def _check_workers(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_check < WORKER_CHECK_SECONDS:
            return
        self._last_check = now
        if self.client is None or self.client.status not in ("running", "connecting"):
            raise ClusterLost(f"{SCHEDULER_FIELD}: lost the Dask scheduler at {self._address()} {what}; "
                              f"{self._resume_hint()}")
        if self._worker_addresses(self.resources):
            self._no_worker_since = None
            return
        if self._no_worker_since is None:
            self._no_worker_since = now
        elif now - self._no_worker_since > self.worker_wait:
            need = f" with resources {self.resources}" if self.resources else ""
            raise ClusterLost(f"{SCHEDULER_FIELD}: no Dask worker{need} left at {self.address} {what} "
                              f"(waited {self.worker_wait:g} s); start workers, then {self._resume_hint()}")

    def _raise_if_lost(self, future: Any) -> None:
        if future.status in ("cancelled", "lost"):
            raise ClusterLost(f"{SCHEDULER_FIELD}: the Dask scheduler at {self.address} dropped a task "
                              f"({future.status}); {self._resume_hint()}")

    def _timed_out(self, running: dict[str, tuple[Any, _Chunk]], results: list[EvalResult | None]) -> bool:
        """Fail the chunks that have evaluated longer than ``task_timeout`` and restart their workers."""
        if self.task_timeout is None:
            return False
        now, hung = time.monotonic(), []
        for key, (future, chunk) in list(running.items()):
            started = self._started.get(chunk.token)
            if started is not None and now - started[0] > self.task_timeout:
                hung.append((key, future, chunk, started[1]))
        for key, future, chunk, worker in hung:
            running.pop(key)
            self._started.pop(chunk.token, None)
            future.cancel()
            for index in chunk.indices:
                results[index] = EvalResult.failure(f"timed out: evaluating its chunk took more than "
                                                    f"{self.task_timeout:g} s (executor.options.task_timeout)")
            warnings.warn(f"calibri: a chunk of {len(chunk.indices)} candidate{'s' if len(chunk.indices) > 1 else ''} "
                          f"ran longer than task_timeout={self.task_timeout:g} s on Dask worker {worker}; "
                          f"they fail and the worker is restarted", RuntimeWarning, stacklevel=4)
            try:
                self.client.restart_workers([worker], raise_for_error=False)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - no nanny: the worker stays busy until it returns
                warnings.warn(f"calibri: could not restart Dask worker {worker}: {type(exc).__name__}: {exc}",
                              RuntimeWarning, stacklevel=4)
        return bool(hung)

    def _lost(self, chunk: _Chunk, where: str, results: list[EvalResult | None]) -> list[_Chunk]:
        """Workers kept dying on ``chunk``: evaluate its candidates alone, or fail its one candidate."""
        count = len(chunk.indices)
        if not chunk.alone and count > 1:
            action = "evaluating them one at a time"
            replacements = [_Chunk([index], alone=True) for index in chunk.indices]
        else:
            tries = f"{self.retries + 1} attempts" if self.cluster is not None else "the scheduler's allowed-failures"
            results[chunk.indices[0]] = EvalResult.failure(f"{DIED} ({tries})")
            action, replacements = "it fails", []
        warnings.warn(f"calibri: Dask workers kept dying while evaluating {count} candidate{'s' if count > 1 else ''} "
                      f"of {where}; {action}", RuntimeWarning, stacklevel=4)
        return replacements


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


DIED = "Dask worker died while evaluating this candidate"


def _check_options(scheduler: str | None, devices: list[str] | None, chunk_size: int | None, retries: int,
                   task_timeout: float | None, resources: dict[str, float] | None, connect_timeout: float,
                   worker_wait: float) -> None:
    if scheduler is not None and (not isinstance(scheduler, str) or not scheduler.strip()):
        raise ConfigError(SCHEDULER_FIELD, f"expected an address like tcp://host:8786, got {scheduler!r}")
    if scheduler is not None and devices:
        raise ConfigError("executor.devices", "applies to a local Dask cluster; with executor.options.scheduler "
                                              "each worker's device is set where it starts (CALIBRI_DEVICE, or "
                                              "CUDA_VISIBLE_DEVICES)")
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError("executor.options.chunk_size", f"must be at least 1 (got {chunk_size})")
    if retries < 0:
        raise ConfigError("executor.options.retries", f"must be 0 or more (got {retries})")
    for name, value in (("task_timeout", task_timeout), ("connect_timeout", connect_timeout),
                        ("worker_wait", worker_wait)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"executor.options.{name}", f"must be a positive number of seconds (got {value})")
    for name, amount in (resources or {}).items():
        if not (isinstance(amount, (int, float)) and amount > 0):
            raise ConfigError(f"executor.options.resources.{name}", f"must be a positive amount (got {amount!r})")
