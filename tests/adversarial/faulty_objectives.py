"""Objectives that misbehave on purpose, for the adversarial suite (``function: faulty_objectives:NAME``).

Each returns or raises something a real objective might: numpy values in its metrics, objects,
bytes, non-numbers, ``SystemExit``. ``hold`` waits while a file ``hold`` exists in the working
directory, so a test can keep a run busy for as long as it needs, however loaded the machine.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from calibri.core.objective import RoundContext


def _sphere(params: dict[str, Any]) -> float:
    return float(sum(float(v) ** 2 for v in params.values()))


def hold(params: dict[str, Any], ctx: RoundContext) -> float:
    deadline = time.monotonic() + 120
    while os.path.exists("hold") and time.monotonic() < deadline:
        time.sleep(0.01)
    return _sphere(params)


def small_array_metric(params):
    return {"value": _sphere(params), "metrics": {"per_image": np.array([0.5, np.nan, 1.5])}}


def huge_array_metric(params):
    return {"value": _sphere(params), "metrics": {"pixels": np.zeros(1_000_000)}}


def object_metric(params):
    return {"value": _sphere(params), "metrics": {"model": object()}}


def bytes_artifact(params):
    return {"value": _sphere(params), "artifacts": {"png": b"\x89PNG"}}


def nan_metric(params):
    return {"value": _sphere(params), "metrics": {"loss": float("nan"), "n": np.int64(3)}}


def string_value(params):
    return "0.5"


def none_value(params):
    return None


def list_metrics(params):
    return {"value": _sphere(params), "metrics": [1, 2]}


def array_value(params):
    return np.array([1.0, 2.0])


def exits_zero(params):
    raise SystemExit(0)


def exits_for_large_x(params):
    if float(params["x"]) > 0:
        raise SystemExit(3)
    return _sphere(params)


def infinite_value(params):
    return float("inf")


def interrupted_in_round_0(params, ctx: RoundContext):
    """Ctrl-C while the first round is evaluated (raised in-process: no signal timing)."""
    if ctx.round == 0:
        raise KeyboardInterrupt
    return _sphere(params)
