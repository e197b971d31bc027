"""Objectives for the ``dask`` executor tests.

Plain functions are used through the ``python`` objective (``function: dask_objectives:NAME``).
The module is also a calibri plugin (list it under ``plugins:``) registering ``test.dask``, whose
workers leave marker files (builds, closes, busy chunks) and can hold, hang or die on cue, so
tests wait on files, never on the clock.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibri.core.hookspecs import hookimpl
from calibri.core.objective import EvalResult, Objective, RoundContext
from calibri.core.space import Float, Params, Space
from helpers_objectives import _claim, _sphere, read_builds, read_closes  # noqa: F401  (read_* for the tests)

#: Longest any objective here waits on a file, in seconds (a test that forgets one still ends).
WAIT_LIMIT = 120


def _noise(params: Params, seed: int) -> float:
    """Depends only on the candidate and the round seed."""
    key = [seed] + [int(np.float64(float(v)).view(np.uint64) % 2**32) for v in params.values()]
    return float(np.random.default_rng(key).standard_normal())


def _wait_while(path: Path | str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def noisy_raising(params: Params, ctx: RoundContext) -> dict[str, Any]:
    """Sphere plus noise drawn from ``ctx.seed``; raises for ``x > 1.2`` (one failed candidate)."""
    x = float(params["x"])
    if x > 1.2:
        raise ValueError(f"x={x:.4f} is too large")
    return {"value": _sphere(params) + 0.2 * _noise(params, ctx.seed), "metrics": {"round": float(ctx.round)}}


HOLD_ROUND_1 = "hold-round-1"


def held_round_1(params: Params, ctx: RoundContext) -> float:
    """Round 1 leaves ``busy-<pid>`` and waits while ``hold-round-1`` exists in the working
    directory, so a test can kill the run in the middle of round 1."""
    if ctx.round == 1 and os.path.exists(HOLD_ROUND_1):
        Path(f"busy-{os.getpid()}").write_text("")
        _wait_while(HOLD_ROUND_1)
    return _sphere(params) + 0.2 * _noise(params, ctx.seed)


class DaskProbe(Objective):
    """``x[0..dim-1]`` sphere plus ``ctx.seed`` noise, evaluated in batches.

    Leaves ``build-<pid>-<id>.json`` when built and ``close-<pid>-<id>`` when closed. In round
    ``hold_round`` each chunk leaves ``busy-<pid>-<id>`` and waits while ``marker_dir/hold``
    exists. In round ``hang_round`` the first chunk to start hangs while ``marker_dir/hang``
    exists. A chunk holding a candidate with ``x[0] > die_above`` kills its process; one holding a
    candidate with ``x[1] > raise_above`` raises (as a batched model would, for the whole batch).
    Results carry the process, the build and ``OMP_NUM_THREADS`` in artifacts.
    """

    def __init__(self, marker_dir: str, dim: int = 2, hold_round: int | None = None,
                 hang_round: int | None = None, die_above: float | None = None, raise_above: float | None = None,
                 device: str | None = None) -> None:
        self.space = probe_space(dim)
        self.marker_dir = Path(marker_dir)
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        self.hold_round, self.hang_round, self.die_above, self.device = hold_round, hang_round, die_above, device
        self.raise_above = raise_above
        self.build = uuid.uuid4().hex[:8]
        record = {"pid": os.getpid(), "build": self.build, "device": device}
        (self.marker_dir / f"build-{os.getpid()}-{self.build}.json").write_text(json.dumps(record))

    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        if ctx.round == self.hold_round:
            (self.marker_dir / f"busy-{os.getpid()}-{uuid.uuid4().hex[:8]}").write_text("")
            _wait_while(self.marker_dir / "hold")
        if ctx.round == self.hang_round and _claim(self.marker_dir / "hung"):
            _wait_while(self.marker_dir / "hang")
        if self.die_above is not None and any(float(p["x[0]"]) > self.die_above for p in candidates):
            os._exit(3)
        if self.raise_above is not None:
            bad = [float(p["x[1]"]) for p in candidates if float(p["x[1]"]) > self.raise_above]
            if bad:
                raise ValueError(f"x[1]={bad[0]:.4f} above {self.raise_above}")
        artifacts = {"pid": os.getpid(), "build": self.build, "threads": os.environ.get("OMP_NUM_THREADS"),
                     "device": self.device}
        return [EvalResult(value=_sphere(p) + 0.2 * _noise(p, ctx.seed), artifacts=artifacts) for p in candidates]

    def close(self) -> None:
        (self.marker_dir / f"close-{os.getpid()}-{self.build}").write_text("")


def probe_space(dim: int = 2, **_: Any) -> Space:
    return Space(Float(f"x[{i}]", -2.0, 2.0, init=1.0) for i in range(dim))


@hookimpl
def calibri_register_objectives(register):
    register("test.dask", DaskProbe, space=probe_space)
