"""The executor contract: evaluate one round's candidates, with objectives built once per worker.

Workers never receive an objective object, only an :class:`ObjectiveRecipe` (plugin name +
options + plugin modules) from which each builds its own copy once and keeps it. That is what lets
the same contract run in-process, in local processes, or on a distributed cluster.
"""
from __future__ import annotations

import inspect
import re
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .objective import Direction, EvalResult, Objective, RoundContext, as_result
from .space import Params, Space


@dataclass(frozen=True)
class ObjectiveRecipe:
    """How to build an objective anywhere: picklable, small, and enough for a fresh process."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    plugin_modules: tuple[str, ...] = ()

    def build(self, device: str | None = None) -> Objective:
        from .plugins import add_plugin_modules, build_from, get_registry

        registry = add_plugin_modules(*self.plugin_modules) if self.plugin_modules else get_registry()
        registration = registry.get("objectives", self.name, "objective.name")
        options = dict(self.options)
        if device is not None and "device" in _parameters(registration.factory):
            options["device"] = device
        objective = build_from(registration, registration.factory, **options)
        if not isinstance(objective, Objective):
            raise TypeError(f"objective factory {self.name!r} returned {type(objective).__name__}, not an Objective")
        return objective


@dataclass(frozen=True)
class ObjectiveInfo:
    """What the run loop needs to know of a built objective."""

    direction: Direction
    space: Space | None


def _parameters(factory: Any) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


_DEVICE = re.compile(r"(?P<kind>cuda|mps)(:(?P<index>[0-9]+))?")


def check_devices(devices: Sequence[str] | None) -> None:
    """Refuse an ``executor.devices`` entry that cannot work, before any worker starts: a
    malformed ``cuda``/``mps`` name, or a GPU this machine's torch does not see. Other names
    (``cpu``, or one an objective defines) are passed through. torch is imported only when an
    entry names cuda or mps."""
    for entry in devices or ():
        if not isinstance(entry, str) or not entry.strip() or entry != entry.strip():
            raise ConfigError("executor.devices", f"{entry!r} is not a device name")
        lower = entry.lower()
        if lower.startswith("gpu"):
            raise ConfigError("executor.devices", f"unknown device {entry!r} (CUDA devices are cuda:0, cuda:1, ...)")
        if not lower.startswith(("cuda", "mps")):
            continue
        match = _DEVICE.fullmatch(entry)
        if match is None:
            kind = "cuda" if lower.startswith("cuda") else "mps"
            raise ConfigError("executor.devices", f"unknown device {entry!r} (expected {kind} or {kind}:N)")
        try:
            import torch
        except ImportError:
            raise ConfigError("executor.devices", f"{entry!r} needs torch, which is not installed") from None
        index = int(match["index"] or 0)
        if match["kind"] == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("executor.devices", f"{entry!r}: CUDA is not available "
                                                      f"(torch {torch.__version__} sees no CUDA device)")
            count = torch.cuda.device_count()
            if index >= count:
                have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
                raise ConfigError("executor.devices", f"{entry!r}: device index out of range (this machine has "
                                                      f"{count} CUDA device{'s' if count != 1 else ''}: {have})")
        else:
            mps = getattr(torch.backends, "mps", None)
            if mps is None or not mps.is_available():
                raise ConfigError("executor.devices", f"{entry!r}: MPS is not available "
                                                      f"(torch {torch.__version__})")
            if index > 0:
                raise ConfigError("executor.devices", f"{entry!r}: device index out of range "
                                                      f"(MPS has one device, mps:0)")


def _error_text(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def evaluate_batch(objective: Objective, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
    """Evaluate a batch, isolating failures.

    If the batch call raises or returns the wrong number of values, each candidate is retried
    alone so one bad point fails by itself. NaN/inf values become failures. Each result's
    ``metrics["wall_time"]`` is its share of the batch's wall time.
    """
    if not candidates:
        return []
    start = time.perf_counter()
    try:
        raw = list(objective.evaluate(list(candidates), ctx))
        if len(raw) != len(candidates):
            raise ValueError(f"objective returned {len(raw)} values for {len(candidates)} candidates")
        results = [as_result(item) for item in raw]
        share = (time.perf_counter() - start) / len(candidates)
        for result in results:
            result.wall_time = share
        return results
    except (Exception, SystemExit) as batch_error:  # sys.exit() in an objective fails its candidate
        if len(candidates) == 1:
            result = EvalResult.failure(_error_text(batch_error))
            result.wall_time = time.perf_counter() - start
            return [result]
    return [result for params in candidates for result in evaluate_batch(objective, [params], ctx)]


class Executor(ABC):
    """Evaluates one round's candidates; keeps its workers (and their objectives) between rounds."""

    @abstractmethod
    def describe(self) -> ObjectiveInfo:
        """Direction and space of the objective, as built by a worker."""

    @abstractmethod
    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        """Results in the order of ``candidates``; never raises for a failing candidate."""

    def close(self) -> None:
        """Stop workers and release their objectives."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
