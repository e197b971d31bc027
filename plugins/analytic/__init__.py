"""Analytic test objectives (sphere, Rosenbrock, Rastrigin, ...) and ``python`` for any callable."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from calibri.core.errors import IMPORT_HINT, ConfigError
from calibri.core.hookspecs import hookimpl
from calibri.core.objective import EvalResult, FunctionObjective, Objective, RoundContext
from calibri.core.space import Float, Params, Space

#: The largest dimension an analytic objective builds: beyond it the space alone takes gigabytes.
MAX_DIM = 10_000


def sphere(x: np.ndarray) -> np.ndarray:
    return np.sum(x**2, axis=-1)


def ellipsoid(x: np.ndarray) -> np.ndarray:
    d = x.shape[-1]
    weights = 10.0 ** (6.0 * np.arange(d) / max(d - 1, 1))
    return np.sum(weights * x**2, axis=-1)


def rosenbrock(x: np.ndarray) -> np.ndarray:
    return np.sum(100.0 * (x[..., 1:] - x[..., :-1] ** 2) ** 2 + (1.0 - x[..., :-1]) ** 2, axis=-1)


def rastrigin(x: np.ndarray) -> np.ndarray:
    return 10.0 * x.shape[-1] + np.sum(x**2 - 10.0 * np.cos(2 * np.pi * x), axis=-1)


def ackley(x: np.ndarray) -> np.ndarray:
    d = x.shape[-1]
    return (-20.0 * np.exp(-0.2 * np.sqrt(np.sum(x**2, axis=-1) / d))
            - np.exp(np.sum(np.cos(2 * np.pi * x), axis=-1) / d) + 20.0 + np.e)


FUNCTIONS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float, float, float]] = {
    # name: (function, default low, default high, default init)
    "sphere": (sphere, -5.0, 5.0, 3.0),
    "ellipsoid": (ellipsoid, -5.0, 5.0, 3.0),
    "rosenbrock": (rosenbrock, -5.0, 10.0, 3.0),
    "rastrigin": (rastrigin, -5.12, 5.12, 3.0),
    "ackley": (ackley, -32.768, 32.768, 3.0),
}


def vector_space(dim: int, low: float, high: float, init: float, name: str = "x") -> Space:
    """``dim`` floats ``x[0] ... x[dim-1]`` on ``[low, high]``, all starting at ``init``."""
    if dim < 1:
        raise ConfigError("objective.options.dim", f"must be at least 1, got {dim}")
    if dim > MAX_DIM:
        raise ConfigError("objective.options.dim", f"must be at most {MAX_DIM}, got {dim}")
    if not low < high:
        raise ConfigError("objective.options.low", f"low ({low:g}) must be below high ({high:g})")
    if not low <= init <= high:
        raise ConfigError("objective.options.init", f"init {init:g} is outside [{low:g}, {high:g}]")
    return Space(Float(f"{name}[{i}]", low, high, init=init) for i in range(dim))


class AnalyticObjective(Objective):
    """A vectorised analytic function of ``x[0..d-1]`` (minimised; optimum value 0)."""

    direction = "minimize"

    def __init__(self, function: str, dim: int = 10, low: float | None = None, high: float | None = None,
                 init: float | None = None) -> None:
        fn, default_low, default_high, default_init = FUNCTIONS[function]
        self.function = fn
        self.space = vector_space(dim, default_low if low is None else low,
                                  default_high if high is None else high,
                                  default_init if init is None else init)

    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        x = np.array([self.space.to_vector(params) for params in candidates])
        values = self.function(x)
        return [EvalResult(value=float(v)) for v in values]


def _analytic(function: str) -> tuple[Callable[..., Objective], Callable[..., Space]]:
    def factory(dim: int = 10, low: float | None = None, high: float | None = None,
                init: float | None = None) -> Objective:
        return AnalyticObjective(function, dim, low, high, init)

    def space(dim: int = 10, low: float | None = None, high: float | None = None,
              init: float | None = None) -> Space:
        return AnalyticObjective(function, dim, low, high, init).space

    factory.__doc__ = f"The {function} function on x[0..dim-1] (minimise; optimum 0)."
    return factory, space


def resolve_callable(path: str, field: str = "objective.options.function") -> Callable[..., Any]:
    """Import ``package.module:attribute`` with a clear error naming ``field``."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(field, f"expected 'module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(field, f"cannot import module {module_name!r}: {exc} ({IMPORT_HINT})") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(field, f"module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(field, f"{path!r} is not callable")
    return target


def python_objective(function: str, direction: Literal["minimize", "maximize"] = "minimize",
                     with_context: bool = False) -> Objective:
    """Any Python callable ``fn(params) -> float`` (or ``fn(params, ctx)``) given as 'module:function'."""
    return FunctionObjective(resolve_callable(function), direction=direction, with_context=with_context)


def check_python_objective(function: str, direction: str = "minimize", with_context: bool = False) -> None:
    """Import the callable while the run is planned, before a run directory or worker exists."""
    resolve_callable(function)


@hookimpl
def calibri_register_objectives(register):
    for name in FUNCTIONS:
        factory, space = _analytic(name)
        register(name, factory, space=space)
    register("python", python_objective, check=check_python_objective)
