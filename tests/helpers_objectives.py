"""Small objectives for the run-loop, resume and executor tests.

Plain functions are used through the built-in ``python`` objective
(``function: helpers_objectives:NAME``). The module is also a calibri plugin (list it under
``plugins:``) registering ``test.counting``, an objective whose factory leaves one marker file
per construction so tests can count how often, in which process and on which device it was built.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibri.core.hookspecs import hookimpl
from calibri.core.objective import EvalResult, Objective, RoundContext
from calibri.core.space import Float, Params, Space
from calibri.optimizers.random_search import RandomSearch


def _sphere(params: Params) -> float:
    return float(sum(float(v) ** 2 for v in params.values()))


def sphere(params: Params) -> float:
    return _sphere(params)


def slow_sphere(params: Params) -> float:
    """The sphere function after a few milliseconds of "work" (so kills land mid-round)."""
    time.sleep(0.003)
    return _sphere(params)


HOLD_FILE = "hold-round-0"


def slow_first_round(params: Params, ctx: RoundContext) -> float:
    """Round 0 waits while a file ``hold-round-0`` exists in the working directory (at most 60 s),
    so a test can kill a run before its first checkpoint however busy the machine is."""
    deadline = time.monotonic() + 60
    while ctx.round == 0 and os.path.exists(HOLD_FILE) and time.monotonic() < deadline:
        time.sleep(0.005)
    return _sphere(params)


def neg_sphere(params: Params) -> float:
    """To be maximised: optimum 0 at the origin."""
    return -_sphere(params)


def _candidate_noise(params: Params, seed: int) -> float:
    """Noise that depends only on the candidate and the round seed."""
    key = [seed] + [int(np.float64(float(v)).view(np.uint64) % 2**32) for v in params.values()]
    return float(np.random.default_rng(key).standard_normal())


def noisy_sphere(params: Params, ctx: RoundContext) -> dict[str, Any]:
    """Sphere plus a round-shared offset and a per-candidate term, both drawn from ``ctx.seed``."""
    shared = float(np.random.default_rng(ctx.seed).standard_normal())
    value = _sphere(params) + 0.5 * shared + 0.1 * _candidate_noise(params, ctx.seed)
    return {"value": value, "metrics": {"shared_noise": shared, "round": float(ctx.round)}}


def with_metrics(params: Params) -> dict[str, Any]:
    return {"value": _sphere(params), "metrics": {"abs_x": abs(float(params["x"])), "one": 1.0}}


def numpy_metrics(params: Params) -> dict[str, Any]:
    """Values and metrics as numpy scalars, as array code naturally returns them."""
    return {"value": np.float32(_sphere(params)), "metrics": {"abs_x": np.float32(abs(float(params["x"])))}}


def nan_metric(params: Params) -> dict[str, Any]:
    """A valid value with a metric that could not be computed."""
    return {"value": _sphere(params), "metrics": {"ratio": float("nan"), "one": 1.0}}


def flaky(params: Params) -> float:
    """Fails in three ways depending on ``x``: raises above 2, NaN in (1, 2], +inf in (0.5, 1]."""
    x = float(params["x"])
    if x > 2.0:
        raise ValueError(f"x={x:.3f} is too large")
    if x > 1.0:
        return float("nan")
    if x > 0.5:
        return math.inf
    return _sphere(params)


def crash_above(params: Params) -> float:
    """Kills its (worker) process when ``x > 2.5``, a moment after the round's batches were
    handed out: only for use with the process executor."""
    if float(params["x"]) > 2.5:
        time.sleep(0.2)
        os._exit(3)
    return _sphere(params)


_exit_scheduled = False


def dies_after_round_0(params: Params, ctx: RoundContext) -> float:
    """Round 0 evaluates normally, then the (worker) process dies while idle, 50 ms later."""
    global _exit_scheduled
    if ctx.round == 0 and not _exit_scheduled:
        _exit_scheduled = True
        threading.Timer(0.05, os._exit, args=(3,)).start()
    return _sphere(params)


def always_fails(params: Params) -> float:
    raise RuntimeError("this objective always fails")


def fails_multiline(params: Params) -> float:
    raise RuntimeError("first line of the error\nsecond line of the error")


# -- the ``test.counting`` plugin objective ---------------------------------------------------
class CountingObjective(Objective):
    """``x[0..dim-1]`` sphere, plus ``ctx.seed``-dependent noise if ``noise``.

    Evaluates a whole batch at once and raises for the whole batch if any candidate has
    ``x[0] > fail_above``, like a batched model would. Records the worker's PID in artifacts.
    With ``rendezvous=n``, a round-0 batch waits until batches of ``n`` different processes have
    started, which forces a round to be spread over ``n`` workers.
    """

    def __init__(self, marker_dir: str, dim: int = 2, sleep: float = 0.0, fail_above: float | None = None,
                 noise: bool = False, rendezvous: int = 0, device: str | None = None) -> None:
        self.space = counting_space(dim)
        self.sleep, self.fail_above, self.noise, self.device = sleep, fail_above, noise, device
        self.rendezvous = rendezvous
        self.marker_dir = Path(marker_dir)
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        self.build_id = uuid.uuid4().hex
        record = {"pid": os.getpid(), "device": device, "build": self.build_id}
        (self.marker_dir / f"build-{os.getpid()}-{self.build_id}.json").write_text(json.dumps(record))

    def _wait_for_others(self) -> None:
        (self.marker_dir / f"arrived-{os.getpid()}").write_text("")
        deadline = time.monotonic() + 60
        while len(list(self.marker_dir.glob("arrived-*"))) < self.rendezvous:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {self.rendezvous} worker processes took a batch")
            time.sleep(0.005)

    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        if self.rendezvous and ctx.round == 0:
            self._wait_for_others()
        if self.sleep:
            time.sleep(self.sleep * len(candidates))
        if self.fail_above is not None:
            bad = [p for p in candidates if float(p["x[0]"]) > self.fail_above]
            if bad:
                raise ValueError(f"x[0]={float(bad[0]['x[0]']):.3f} above {self.fail_above}")
        out = []
        for params in candidates:
            value = _sphere(params)
            if self.noise:
                value += 0.3 * float(np.random.default_rng(ctx.seed).standard_normal())
                value += 0.1 * _candidate_noise(params, ctx.seed)
            out.append(EvalResult(value=value, artifacts={"pid": os.getpid(), "device": self.device,
                                                          "build": self.build_id}))
        return out

    def close(self) -> None:
        (self.marker_dir / f"close-{os.getpid()}-{self.build_id}").write_text("")


def counting_space(dim: int = 2, **_: Any) -> Space:
    return Space(Float(f"x[{i}]", -2.0, 2.0, init=1.0) for i in range(dim))


def counting_objective(marker_dir: str, dim: int = 2, sleep: float = 0.0, fail_above: float | None = None,
                       noise: bool = False, rendezvous: int = 0, device: str | None = None) -> Objective:
    """Sphere objective that leaves a marker file each time it is built."""
    return CountingObjective(marker_dir, dim, sleep, fail_above, noise, rendezvous, device)


# -- the ``test.faulty`` plugin objective: workers that die on cue --------------------------------
def _claim(path: Path) -> bool:
    """True for exactly one caller across processes: whoever creates ``path`` first."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _die(how: str) -> None:
    if how == "exit":
        os._exit(3)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "systemexit":
        raise SystemExit(3)
    raise ValueError(f"unknown way to die: {how!r}")


class FaultyObjective(Objective):
    """``x[0..dim-1]`` sphere evaluated in batches, whose process dies on cue (``how``: ``exit``
    is ``os._exit(3)``, ``kill`` a SIGKILL to itself, ``systemexit`` raises ``SystemExit(3)``).

    ``die_above``: a batch holding a candidate with ``x[0]`` above it dies, every time (a
    poisoned candidate). ``die_once``: round indices (``-1``: validation) whose first
    ``die_count`` batches die once; marker files in ``marker_dir`` let the re-runs succeed.
    ``die_in_build``: ``once`` or ``always``, while the objective is built. ``hold``: each
    batch leaves ``busy-<pid>`` and waits while ``marker_dir/hold`` exists (at most 60 s).
    Each batch that completes leaves ``batch-<round>-<pid>-<id>`` holding its size, and each
    result reports its process and ``OMP_NUM_THREADS`` in artifacts.
    """

    def __init__(self, marker_dir: str, dim: int = 2, how: str = "exit", die_above: float | None = None,
                 die_once: Sequence[int] = (), die_count: int = 1, die_in_build: str | None = None,
                 hold: bool = False) -> None:
        self.marker_dir = Path(marker_dir)
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        if die_in_build == "always" or (die_in_build == "once" and _claim(self.marker_dir / "died-build")):
            _die(how)
        self.space = counting_space(dim)
        self.how, self.die_above, self.die_once, self.die_count = how, die_above, tuple(die_once), die_count
        self.hold = hold

    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        if self.hold:
            (self.marker_dir / f"busy-{os.getpid()}").write_text("")
            deadline = time.monotonic() + 60
            while (self.marker_dir / "hold").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        if self.die_above is not None and any(float(p["x[0]"]) > self.die_above for p in candidates):
            _die(self.how)
        if ctx.round in self.die_once and any(_claim(self.marker_dir / f"died-{ctx.round}-{i}")
                                              for i in range(self.die_count)):
            _die(self.how)
        (self.marker_dir / f"batch-{ctx.round}-{os.getpid()}-{uuid.uuid4().hex}").write_text(str(len(candidates)))
        artifacts = {"pid": os.getpid(), "threads": os.environ.get("OMP_NUM_THREADS")}
        return [EvalResult(value=_sphere(p), artifacts=artifacts) for p in candidates]


class FaultyStream:
    """No training data; a validation set (seed 11), so runs of ``test.faulty`` can validate."""

    has_validation = True

    def next_round(self, round_index: int) -> dict[str, Any]:
        return {}

    def validation_data(self) -> tuple[int, dict[str, Any]]:
        return 11, {"split": "validation"}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Any) -> None:
        pass


def faulty_stream(seed: int = 0, **_: Any) -> FaultyStream:
    return FaultyStream()


def read_batches(marker_dir: str | Path, round_index: int | None = None) -> list[int]:
    """Sizes of the completed batches of ``test.faulty`` (of one round, or of all)."""
    pattern = "batch-*" if round_index is None else f"batch-{round_index}-*"
    return sorted(int(p.read_text()) for p in Path(marker_dir).glob(pattern))


class Pause:
    """A run callback that sleeps after each round (the main process is busy between rounds)."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_round_end(self, record: Any) -> None:
        time.sleep(self.seconds)


@hookimpl
def calibri_register_objectives(register):
    register("test.counting", counting_objective, space=counting_space)
    register("test.faulty", FaultyObjective, space=counting_space, stream=faulty_stream)


@hookimpl
def calibri_register_callbacks(register):
    register("test.pause", Pause)


def read_builds(marker_dir: str | Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(marker_dir).glob("build-*.json"))]


def read_closes(marker_dir: str | Path) -> list[str]:
    return sorted(p.name for p in Path(marker_dir).glob("close-*"))


def interrupted_at_round_3(params: Params, ctx: RoundContext) -> float:
    """Ctrl-C while round 3 is being evaluated (raised in-process: deterministic, no signal timing)."""
    if ctx.round == 3:
        raise KeyboardInterrupt
    return _sphere(params)


class ShortAsk(RandomSearch):
    """A buggy optimiser plugin: asked for n candidates, it returns n - 1."""

    def ask(self, n: int) -> list[Params]:
        return super().ask(n)[:-1]


@hookimpl
def calibri_register_optimizers(register):
    register("test.short-ask", ShortAsk)
