"""Built-in executors: ``serial`` (in-process) and ``process`` (one local process per device).

The ``process`` executor owns its worker processes (no ``ProcessPoolExecutor``): one worker's
death must cost only the candidates it was evaluating, and a pool marks every pending task
broken when any worker dies. Each worker talks to the run through its own pipe, and the run
waits on the pipes and on the processes' exit sentinels together, so it sees a death at once.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import pickle
import signal
import sys
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, PluginError
from .executor import Executor, ObjectiveInfo, ObjectiveRecipe, check_devices, evaluate_batch
from .hookspecs import hookimpl
from .objective import EvalResult, Objective, RoundContext
from .space import Params


class SerialExecutor(Executor):
    """Evaluates each round as one batch in this process; the objective is built once."""

    def __init__(self, recipe: ObjectiveRecipe, *, workers: int = 1, devices: list[str] | None = None) -> None:
        check_devices(devices)
        self.objective: Objective = recipe.build(devices[0] if devices else None)

    def describe(self) -> ObjectiveInfo:
        return ObjectiveInfo(self.objective.direction, self.objective.space)

    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        return evaluate_batch(self.objective, candidates, ctx)

    def close(self) -> None:
        self.objective.close()


# -- threads: how many each worker's numeric libraries use ----------------------------------------
#: Thread-count variables of OpenMP (torch's intra-op pool too), OpenBLAS, MKL, Accelerate, numexpr.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS")
_START_LOCK = threading.Lock()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """Each of ``workers`` processes' equal share of the cores (at least one thread)."""
    return max(1, available_cores() // max(1, workers))


def resolve_threads(threads: int | str, workers: int, field: str) -> int | None:
    """The thread count each of ``workers`` processes gets for an ``auto | N | inherit`` option
    (None: inherit, leave the libraries' own defaults)."""
    if threads == "inherit":
        return None
    if threads == "auto":
        return threads_per_worker(workers)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(field, f"expected a number of threads (1 or more), auto or inherit, got {threads!r}")
    return threads


def limit_threads(threads: int) -> None:
    """Cap this process's numeric thread pools at ``threads``, even when the libraries are loaded
    already (a forked worker inherits its parent's BLAS and torch): BLAS/OpenMP through
    threadpoolctl, torch through its own setting, and the environment for what starts later."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ModuleNotFoundError:  # pragma: no cover - a dependency of the bench extra
        pass
    else:
        threadpool_limits(limits=threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _thread_environment(threads: int | None, keep_set: bool) -> Iterator[None]:
    """The environment a worker starts with: the thread variables set to ``threads`` (those the
    environment already sets are kept if ``keep_set``). They must be in place before the worker
    imports numpy (as it unpickles its task), so they are set around the start and restored."""
    if threads is None:
        yield
        return
    with _START_LOCK:
        saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
        for name in THREAD_VARIABLES:
            if not (keep_set and name in os.environ):
                os.environ[name] = str(threads)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


# -- worker-process side ----------------------------------------------------------------------
#: Seconds between a worker's checks that the run that started it is still alive.
PARENT_POLL_SECONDS = 1.0


def _exit_with_parent(parent_pid: int, deathsig: bool) -> None:
    """End this worker when the run that started it dies (``kill -9`` leaves no time to stop it).

    On Linux the kernel sends SIGKILL at once (``PR_SET_PDEATHSIG``; only when the run started
    the worker from its main thread: the signal follows the starting thread, not the process).
    Everywhere, a thread waits on the parent's sentinel and checks ``getppid()`` every second.
    """
    if deathsig and sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the watchdog alone
            pass
    if os.getppid() != parent_pid:  # the run died before this worker got here
        os._exit(1)
    parent = multiprocessing.parent_process()
    sentinel = parent.sentinel if parent is not None else None

    def watch() -> None:
        while True:
            if sentinel is not None:
                try:
                    gone = bool(multiprocessing.connection.wait([sentinel], timeout=PARENT_POLL_SECONDS))
                except OSError:
                    gone = True
            else:  # pragma: no cover - spawn always gives a parent sentinel
                threading.Event().wait(PARENT_POLL_SECONDS)
                gone = False
            if gone or os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="calibri-parent-watch", daemon=True).start()


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - whatever pickling raises
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _worker_main(conn: Any, recipe: ObjectiveRecipe, device: str | None, parent_pid: int, deathsig: bool) -> None:
    """A worker's life: build the objective on first use (so a build error reaches the run as an
    exception), answer tasks until told to stop or the run is gone, then close the objective."""
    _exit_with_parent(parent_pid, deathsig)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the run's to handle; it stops us
    objective: Objective | None = None
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the run closed its end
                return
            if message[0] == "stop":
                return
            try:
                if objective is None:
                    objective = recipe.build(device)
                if message[0] == "describe":
                    reply: tuple[Any, ...] = ("ok", ObjectiveInfo(objective.direction, objective.space))
                else:
                    reply = ("ok", evaluate_batch(objective, message[1], message[2]))
            except KeyboardInterrupt:
                reply = ("interrupt",)
            except Exception as exc:  # noqa: BLE001 - the run raises it
                reply = ("error", _portable(exc))
            except BaseException as exc:  # noqa: BLE001 - SystemExit while building: not the run's exit
                reply = ("error", PluginError(f"objective {recipe.name!r} raised {type(exc).__name__}({exc}) "
                                              f"in a worker process"))
            try:
                conn.send(reply)
            except (EOFError, OSError):
                return
    finally:
        if objective is not None:
            objective.close()


# -- run side -------------------------------------------------------------------------------------
def _exit_text(exitcode: int | None) -> str:
    if exitcode is None:
        return "its pipe closed"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


class _Worker:
    """One worker process and the run's end of its pipe."""

    def __init__(self, recipe: ObjectiveRecipe, device: str | None, threads: int | None, keep_set: bool) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        deathsig = threading.current_thread() is threading.main_thread()
        self.process = context.Process(target=_worker_main, name="calibri-worker",
                                       args=(child, recipe, device, os.getpid(), deathsig))
        with _thread_environment(threads, keep_set):
            self.process.start()
        child.close()

    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, message: tuple[Any, ...]) -> bool:
        """False when the worker is gone."""
        try:
            self.conn.send(message)
            return True
        except (OSError, EOFError):
            return False

    def reply(self) -> tuple[Any, ...] | None:
        """The worker's answer, or None if it died instead (it is then reaped)."""
        try:
            if self.conn.poll():
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        self.kill()
        return None

    def cause(self) -> str:
        return _exit_text(self.process.exitcode)

    def stop(self) -> None:
        """Ask the worker to close its objective and exit (it was idle)."""
        self.send(("stop",))
        self.conn.close()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=30)
        self.conn.close()


def _stop_all(workers: list[_Worker | None], timeout: float = 30.0) -> None:
    """Stop idle workers (their objectives close), then kill any that take longer than ``timeout``."""
    for worker in workers:
        if worker is not None:
            worker.stop()
    for worker in workers:
        if worker is not None:
            worker.process.join(timeout=timeout)
            worker.kill()
    workers[:] = [None] * len(workers)


@dataclass
class _Task:
    """Candidates (indices into the round) one worker evaluates as one batch."""

    indices: list[int]
    deaths: int = 0
    alone: bool = False  # split off a batch that kept killing its workers


def _chunks(n: int, parts: int) -> list[list[int]]:
    """``range(n)`` in at most ``parts`` contiguous, non-empty chunks whose sizes differ by one."""
    size, extra = divmod(n, parts)
    out, start = [], 0
    for part in range(parts):
        stop = start + size + (part < extra)
        if stop > start:
            out.append(list(range(start, stop)))
        start = stop
    return out


DIED = "worker process died while evaluating this candidate"


class ProcessExecutor(Executor):
    """Local worker processes (``spawn``), each building the objective once.

    ``devices`` assigns one device string per worker (``["cuda:0", "cuda:1"]``); the objective
    factory receives it as ``device=`` if it takes that argument. A round is split into
    contiguous chunks, one per worker, and reassembled in order, so results do not depend on
    the number of workers.

    ``threads`` sets each worker's BLAS/OpenMP/torch thread counts: ``auto`` (the default) gives
    each worker its share of the cores, keeping variables the environment already sets (two
    workers each using every core's threads run several times slower); a number forces it;
    ``inherit`` leaves this process's environment as it is. Torch on a CPU computes values that
    differ in the last bits at another thread count (matrix products are split by thread), so
    CPU runs compare bit for bit across worker counts at equal threads per evaluation: set
    ``threads`` to the same number for both (GPU objectives are unaffected).

    A worker that dies costs only its chunk: the chunk is re-run on a fresh worker, up to
    ``retries`` times, so the run's trajectory is the uninterrupted one. A chunk that keeps
    killing its workers is then evaluated one candidate at a time, and a candidate that kills
    its worker on its own fails alone. Workers exit when the run's process dies.
    """

    def __init__(self, recipe: ObjectiveRecipe, *, workers: int = 2, devices: list[str] | None = None,
                 retries: int = 2, threads: int | str = "auto") -> None:
        if retries < 0:
            raise ConfigError("executor.options.retries", f"must be 0 or more (got {retries})")
        check_devices(devices)
        if devices:
            workers = len(devices)
        self.recipe, self.workers, self.devices, self.retries = recipe, max(1, workers), devices, retries
        self.threads = resolve_threads(threads, self.workers, "executor.options.threads")
        self._keep_set = threads == "auto"
        self._workers: list[_Worker | None] = [None] * self.workers
        # at interpreter exit, before multiprocessing joins its children (an unclosed executor's
        # idle workers would wait for a task forever)
        self._finalizer = multiprocessing.util.Finalize(self, _stop_all, args=(self._workers,), exitpriority=20)
        for slot in range(self.workers):
            self._worker(slot)

    def _worker(self, slot: int) -> _Worker:
        """The slot's worker, a fresh one if it has none or its process has ended."""
        worker = self._workers[slot]
        if worker is not None and not worker.alive():
            worker.kill()
            worker = None
        if worker is None:
            device = self.devices[slot] if self.devices else None
            worker = self._workers[slot] = _Worker(self.recipe, device, self.threads, self._keep_set)
        return worker

    def _discard(self, slot: int) -> None:
        worker = self._workers[slot]
        if worker is not None:
            worker.kill()
        self._workers[slot] = None

    def describe(self) -> ObjectiveInfo:
        cause = ""
        for _ in range(self.retries + 1):
            worker = self._worker(0)
            worker.send(("describe",))  # a failed send shows as the worker's death
            multiprocessing.connection.wait([worker.conn, worker.process.sentinel])
            reply = worker.reply()
            if reply is not None:
                return self._unwrap(reply)
            cause = worker.cause()
            self._discard(0)
        raise PluginError(f"a worker process died while building objective {self.recipe.name!r} "
                          f"({cause}; {self.retries + 1} attempts)")

    @staticmethod
    def _unwrap(reply: tuple[Any, ...]) -> Any:
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "interrupt":
            raise KeyboardInterrupt
        raise reply[1]

    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        if not candidates:
            return []
        results: list[EvalResult | None] = [None] * len(candidates)
        pending = deque(_Task(chunk) for chunk in _chunks(len(candidates), self.workers))
        running: dict[int, _Task] = {}
        try:
            while pending or running:
                for slot in range(self.workers):
                    if pending and slot not in running:
                        task = pending.popleft()
                        worker = self._worker(slot)
                        running[slot] = task
                        worker.send(("evaluate", [candidates[i] for i in task.indices], ctx))  # a failed
                        # send shows as the worker's death below
                busy = {slot: self._workers[slot] for slot in running}
                waitables = [w.conn for w in busy.values()] + [w.process.sentinel for w in busy.values()]
                ready = set(multiprocessing.connection.wait(waitables))  # type: ignore[arg-type]
                for slot, worker in busy.items():
                    if worker.conn not in ready and worker.process.sentinel not in ready:
                        continue
                    task = running.pop(slot)
                    reply = worker.reply()
                    if reply is None:
                        self._lost(task, worker.cause(), pending, results, ctx)
                        self._discard(slot)
                        continue
                    for index, result in zip(task.indices, self._unwrap(reply)):
                        results[index] = result
        except BaseException:
            for slot in running:  # their replies would reach the next round: stop them now
                self._discard(slot)
            raise
        return results  # type: ignore[return-value]

    def _lost(self, task: _Task, cause: str, pending: deque[_Task], results: list[EvalResult | None],
              ctx: RoundContext) -> None:
        """A worker died evaluating ``task``: re-run it, split it, or fail its one candidate."""
        task.deaths += 1
        count = len(task.indices)
        them = "them" if count > 1 else "it"
        if not task.alone and task.deaths <= self.retries:
            pending.append(task)
            action = f"re-running {them} on a fresh worker (retry {task.deaths} of {self.retries})"
        elif count > 1:
            pending.extend(_Task([index], alone=True) for index in task.indices)
            action = "evaluating them one at a time"
        else:
            results[task.indices[0]] = EvalResult.failure(f"{DIED} ({cause})")
            action = "it fails"
        where = "validation" if ctx.round < 0 else f"round {ctx.round}"
        warnings.warn(f"calibri: a worker process died ({cause}) while evaluating {count} "
                      f"candidate{'s' if count > 1 else ''} of {where}; {action}", RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        self._finalizer()


@hookimpl
def calibri_register_executors(register):
    register("serial", SerialExecutor)
    register("process", ProcessExecutor)
