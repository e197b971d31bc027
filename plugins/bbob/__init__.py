"""The BBOB suites as a calibri objective: the noiseless f1–f24 through IOHprofiler (``ioh``) or
COCO (``coco-experiment``, imported as ``cocoex``), and the noisy f101–f130 through COCO's
``bbob-noisy`` suite (``ioh`` has none).

Both libraries implement the same function instances (they agree to ~1e-13 relative); ``ioh``
allows any dimension (the calibration-sized 57, 76, 114 included), COCO's ``bbob`` suite only
2, 3, 5, 10, 20 and 40. Each evaluation's value is the raw ``f(x)``; its metrics carry
``precision = f(x) - f_opt`` (``f_opt`` from ``ioh``, which knows it for both libraries), the
quantity BBOB targets are set on.

Noisy functions (f101–f130) follow COCO: the value is the measured, noisy ``f(x)``, and the
precision is measured against the *noiseless* optimum ``f_opt`` (that of the noiseless function
each noisy one is built on, which shares its optimum), so the same targets apply. COCO draws the
noise from its own stream, restarted for every problem it builds: a run is reproducible, and
every run of an instance sees the same noise sequence (as in COCO's own experiments).
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
#: The noiseless functions f1–f24 and the noisy f101–f130 (COCO's ``bbob-noisy``).
NOISELESS = range(1, 25)
NOISY = range(101, 131)
#: The noiseless function whose optimum (x_opt and f_opt) each noisy function shares, by the noisy
#: suite's blocks of three (Gaussian, uniform, Cauchy noise): sphere, Rosenbrock, sphere, Rosenbrock
#: (moderate, then severe noise), step ellipsoid, ellipsoid, sum of different powers, Schaffer's F7,
#: composite Griewank–Rosenbrock, Gallagher's 101 peaks.
NOISY_BASE = {101: 1, 104: 8, 107: 1, 110: 8, 113: 7, 116: 10, 119: 14, 122: 17, 125: 19, 128: 21}

Library = Literal["ioh", "coco"]
Init = Literal["origin", "uniform"]


def check_bbob(function: int = 1, dimension: int = 10, instance: int = 1, library: Library = "ioh",
               init: Init = "origin", init_seed: int = 0) -> None:
    """Reject impossible options before anything is built (one-line errors naming the field)."""
    if function not in NOISELESS and function not in NOISY:
        raise ConfigError(f"{FIELD}.function", f"BBOB has functions 1 to 24 (noiseless) and 101 to 130 (noisy), "
                                               f"got {function}")
    if function in NOISY:
        check_noisy_library(library, f"{FIELD}.library")
    if dimension < 1 or (function in (10, 11, 12, 13, 14, 17, 18, 19, 20, 24) and dimension < 2):
        raise ConfigError(f"{FIELD}.dimension", f"must be at least {1 if dimension < 1 else 2}, got {dimension}")
    if (library == "coco" or function in NOISY) and dimension not in COCO_DIMENSIONS:
        raise ConfigError(f"{FIELD}.dimension", f"COCO's {coco_suite_name(function)} suite has dimensions "
                                                f"{', '.join(map(str, COCO_DIMENSIONS))}, got {dimension}"
                                                + ("" if function in NOISY else " (library: ioh allows any)"))
    if not 1 <= instance <= 10**6:
        raise ConfigError(f"{FIELD}.instance", f"must be in 1..1000000, got {instance}")


def is_noisy(function: int) -> bool:
    return function in NOISY


def noiseless_base(function: int) -> int:
    """The noiseless function a noisy one shares its optimum with (itself for f1–f24)."""
    return NOISY_BASE[function - (function - 101) % 3] if function in NOISY else function


def check_noisy_library(library: str, field: str) -> None:
    """BBOB-noisy needs COCO: a one-line error naming ``field`` for a library without it."""
    if library != "coco":
        raise ConfigError(field, f"the BBOB-noisy functions f101-f130 need library: coco ({library} has no "
                                 f"noisy BBOB suite)")
    try:
        import cocoex
    except ImportError:
        raise ConfigError(field, "the BBOB-noisy functions need COCO: pip install coco-experiment") from None
    if "bbob-noisy" not in getattr(cocoex, "known_suite_names", ()):
        raise ConfigError(field, f"this cocoex ({getattr(cocoex, '__version__', '?')}) has no bbob-noisy suite; "
                                 f"upgrade coco-experiment")


def coco_suite_name(function: int) -> str:
    return "bbob-noisy" if function in NOISY else "bbob"


def coco_problem(function: int, dimension: int, instance: int) -> tuple[Any, Any]:
    """A cocoex suite holding just this problem, and the problem (free it, then drop the suite)."""
    import cocoex

    index = function - 100 if function in NOISY else function  # bbob-noisy numbers its functions 1..30
    # Instances by number: the suite's default instance list (a given year's) skips 6-70, so
    # ``instance_indices`` would pick another instance than the one named, or none.
    suite = cocoex.Suite(coco_suite_name(function), f"instances:{instance}",
                         f"function_indices:{index} dimensions:{dimension}")
    return suite, suite.get_problem_by_function_dimension_instance(function, dimension, instance)


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
    """f_opt of the instance (the same in ioh and COCO); for a noisy function, the noiseless optimum
    of the function it is built on, the value COCO measures its precision against."""
    return float(ioh_problem(noiseless_base(function), dimension, instance).optimum.y)


class BBOBObjective(Objective):
    """A BBOB function, noiseless f1–f24 or noisy f101–f130 (minimise; metrics: ``precision`` =
    f − f_opt, against the noiseless optimum for the noisy ones)."""

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
            self._suite, self._problem = coco_problem(function, dimension, instance)

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
