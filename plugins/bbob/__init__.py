"""The BBOB noiseless suite (f1–f24) as a calibri objective, through IOHprofiler (``ioh``) or
COCO (``coco-experiment``, imported as ``cocoex``).

Both libraries implement the same function instances (they agree to ~1e-13 relative); ``ioh``
allows any dimension (the calibration-sized 57, 76, 114 included), COCO's ``bbob`` suite only
2, 3, 5, 10, 20 and 40. Each evaluation's value is the raw ``f(x)``; its metrics carry
``precision = f(x) - f_opt`` (``f_opt`` from ``ioh``, which knows it for both libraries), the
quantity BBOB targets are set on.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from calibri.core.errors import ConfigError
from calibri.core.hookspecs import hookimpl
from calibri.core.objective import EvalResult, Objective, RoundContext
from calibri.core.space import Float, Params, Space

#: The dimensions of COCO's ``bbob`` suite.
COCO_DIMENSIONS = (2, 3, 5, 10, 20, 40)
#: BBOB's search domain, [-5, 5]^d; the optimum lies in [-4, 4]^d.
LOW, HIGH = -5.0, 5.0
FIELD = "objective.options"

Library = Literal["ioh", "coco"]
Init = Literal["origin", "uniform"]


def check_bbob(function: int = 1, dimension: int = 10, instance: int = 1, library: Library = "ioh",
               init: Init = "origin", init_seed: int = 0) -> None:
    """Reject impossible options before anything is built (one-line errors naming the field)."""
    if not 1 <= function <= 24:
        raise ConfigError(f"{FIELD}.function", f"BBOB has functions 1 to 24, got {function}")
    if dimension < 1 or (function in (10, 11, 12, 13, 14, 17, 18, 19, 20, 24) and dimension < 2):
        raise ConfigError(f"{FIELD}.dimension", f"must be at least {1 if dimension < 1 else 2}, got {dimension}")
    if library == "coco" and dimension not in COCO_DIMENSIONS:
        raise ConfigError(f"{FIELD}.dimension", f"COCO's bbob suite has dimensions "
                                                f"{', '.join(map(str, COCO_DIMENSIONS))}, got {dimension} "
                                                f"(library: ioh allows any)")
    if not 1 <= instance <= 10**6:
        raise ConfigError(f"{FIELD}.instance", f"must be in 1..1000000, got {instance}")


def initial_point(dimension: int, init: Init = "origin", init_seed: int = 0) -> np.ndarray:
    """x0: the origin (COCO's ``initial_solution``), or uniform in [-4, 4]^d drawn from ``init_seed``
    (COCO's recommended random start; the same for every optimiser of a bench)."""
    if init == "origin":
        return np.zeros(dimension)
    return np.random.default_rng(np.random.SeedSequence([2024, dimension, init_seed])).uniform(-4.0, 4.0, dimension)


def bbob_space(function: int = 1, dimension: int = 10, instance: int = 1, library: Library = "ioh",
               init: Init = "origin", init_seed: int = 0) -> Space:
    """``x[0] ... x[d-1]`` on BBOB's domain [-5, 5], starting at :func:`initial_point`.
    No per-dimension σ: the run's ``optimizer.sigma`` (or a quarter of the range) applies."""
    check_bbob(function, dimension, instance, library, init, init_seed)
    x0 = initial_point(dimension, init, init_seed)
    return Space(Float(f"x[{i}]", LOW, HIGH, init=float(x0[i])) for i in range(dimension))


def ioh_problem(function: int, dimension: int, instance: int) -> Any:
    import ioh

    return ioh.get_problem(function, instance=instance, dimension=dimension, problem_class=ioh.ProblemClass.BBOB)


def optimum_value(function: int, dimension: int, instance: int) -> float:
    """f_opt of the instance (the same in ioh and COCO)."""
    return float(ioh_problem(function, dimension, instance).optimum.y)


class BBOBObjective(Objective):
    """A BBOB noiseless function f1–f24 (minimise; metrics: ``precision`` = f − f_opt)."""

    direction = "minimize"

    def __init__(self, function: int = 1, dimension: int = 10, instance: int = 1, library: Library = "ioh",
                 init: Init = "origin", init_seed: int = 0) -> None:
        self.space = bbob_space(function, dimension, instance, library, init, init_seed)
        self.function, self.dimension, self.instance, self.library = function, dimension, instance, library
        self.f_opt = optimum_value(function, dimension, instance)
        if library == "ioh":
            self._problem = ioh_problem(function, dimension, instance)
            self._suite = None
        else:
            import cocoex

            self._suite = cocoex.Suite("bbob", "", f"function_indices:{function} dimensions:{dimension} "
                                                   f"instance_indices:{instance}")
            self._problem = self._suite.get_problem_by_function_dimension_instance(function, dimension, instance)

    def f(self, x: np.ndarray) -> float:
        """The raw function value at one point (a vector of length ``dimension``)."""
        return float(self._problem(np.ascontiguousarray(x, dtype=np.float64)))

    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        out = []
        for params in candidates:
            value = self.f(self.space.to_vector(params))
            out.append(EvalResult(value=value, metrics={"precision": value - self.f_opt}))
        return out

    def close(self) -> None:
        if self._suite is not None:
            self._problem.free()
            self._suite = None


@hookimpl
def calibri_register_objectives(register):
    register("bbob", BBOBObjective, space=bbob_space, check=check_bbob)
