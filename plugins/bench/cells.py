"""The cell matrix: every problem × optimiser × seed, each a normal calibri run.

A cell runs to the bench's largest budget; smaller budgets are prefixes of the same run
(calibri's optimisers do not know the budget), which is how fixed-budget views are read off
COCO and IOHprofiler data too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from calibri.core.errors import ConfigError

from .config import BenchConfig, ProblemSpec


@dataclass(frozen=True)
class Problem:
    """One concrete problem: an objective name + options, its dimension and optimum (if known)."""

    label: str
    objective: str
    options: dict[str, Any]
    dimension: int
    f_opt: float | None = None
    function: int | None = None  # BBOB function index
    instance: int | None = None  # BBOB instance
    library: str | None = None   # BBOB library (ioh / coco)

    @property
    def is_bbob(self) -> bool:
        return self.function is not None

    @property
    def function_label(self) -> str:
        """The function this problem is a repetition of. A BBOB block's instances are repetitions of
        one function (COCO's convention), so ``f3-d10-i1`` … ``f3-d10-i15`` all give ``f3-d10``;
        any other problem is its own function."""
        if self.is_bbob and self.instance is not None and \
                self.label == bbob_label(self.function, self.dimension, self.instance):
            return f"f{self.function}-d{self.dimension}"
        return self.label


@dataclass(frozen=True)
class Cell:
    """One run: ``problem`` × ``optimizer`` × ``seed``, to ``evaluations`` evaluations."""

    problem: Problem
    optimizer: str              # the optimiser's label
    optimizer_name: str
    optimizer_options: dict[str, Any] = field(hash=False)
    seed: int
    evaluations: int
    sigma: float | None
    popsize: int | None
    plugins: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.problem.label}/{self.optimizer}/seed-{self.seed}"

    @property
    def relpath(self) -> str:
        return f"runs/{safe(self.problem.label)}/{safe(self.optimizer)}/seed-{self.seed}"

    def run_config(self) -> dict[str, Any]:
        """The calibri run YAML (as a mapping) of this cell: no progress bar, no plot."""
        optimizer: dict[str, Any] = {"name": self.optimizer_name, "options": dict(self.optimizer_options)}
        if self.sigma is not None:
            optimizer["sigma"] = self.sigma
        if self.popsize is not None:
            optimizer["popsize"] = self.popsize
        return {"name": self.key, "seed": self.seed,
                "objective": {"name": self.problem.objective, "options": dict(self.problem.options)},
                "optimizer": optimizer, "budget": {"evaluations": self.evaluations},
                "callbacks": [], "plugins": list(self.plugins)}


def safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-") or "x"


def bbob_label(function: int, dimension: int, instance: int) -> str:
    return f"f{function}-d{dimension}-i{instance}"


def expand_problems(config: BenchConfig) -> list[Problem]:
    """Every concrete problem, BBOB blocks expanded, in config order; labels are unique."""
    from calibri.core.plugins import add_plugin_modules, get_registry
    from calibri.core.run import resolve_space

    registry = add_plugin_modules(*config.plugins) if config.plugins else get_registry()
    out: list[Problem] = []
    for i, spec in enumerate(config.problems):
        if spec.bbob is not None:
            block = spec.bbob
            for dimension in block.dimensions:
                for function in block.functions:
                    for instance in block.instances:
                        out.append(Problem(bbob_label(function, dimension, instance), "bbob",
                                           {"function": function, "dimension": dimension, "instance": instance,
                                            "library": block.library, "init": block.init},
                                           dimension, None, function, instance, block.library))
            continue
        out.append(_registered_problem(i, spec, registry, resolve_space))
    seen: dict[str, int] = {}
    for problem in out:
        seen[problem.label] = seen.get(problem.label, 0) + 1
    dup = [label for label, n in seen.items() if n > 1]
    if dup:
        raise ConfigError("problems", f"problem {dup[0]!r} appears twice; give the problems distinct labels")
    return out


def _registered_problem(i: int, spec: ProblemSpec, registry: Any, resolve_space: Any) -> Problem:
    from calibri.core.config import validate
    from calibri.core.options import validate_options
    from calibri.core.plugins import build_from

    field_path = f"problems.{i}"
    try:
        registration = registry.get("objectives", spec.name, f"{field_path}.name")
        options = validate_options(registration.factory, spec.options, f"{field_path}.options", reserved=("device",))
        check = registration.extras.get("check")
        if check is not None:
            build_from(registration, check, **options)
        run = validate({"objective": {"name": spec.name, "options": spec.options}, "optimizer": "random",
                        "budget": {"evaluations": 1}})
        space = resolve_space(run, registration, options)
    except ConfigError as exc:  # re-anchor objective.options.x → problems.i.options.x
        where = exc.field.replace("objective.options", f"{field_path}.options").replace("objective", field_path)
        raise ConfigError(where, exc.message) from None
    if space is None:
        raise ConfigError(f"{field_path}.name", f"objective {spec.name!r} defines no space of its own; "
                                                f"a bench needs objectives that do")
    label = spec.label or (spec.name + "".join(f"-{k}={v}" for k, v in sorted(spec.options.items())))
    function = spec.options.get("function") if spec.name == "bbob" else None
    return Problem(label, spec.name, dict(spec.options), len(space), spec.f_opt,
                   function if isinstance(function, int) else None,
                   spec.options.get("instance", 1) if spec.name == "bbob" else None,
                   spec.options.get("library", "ioh") if spec.name == "bbob" else None)


def popsize_for(config: BenchConfig, dimension: int) -> int:
    from calibri.core.optimizer import default_popsize

    return config.popsize or default_popsize(dimension)


def budget_evaluations(config: BenchConfig, dimension: int) -> list[int]:
    """Each budget of the bench in evaluations, for a problem of ``dimension``."""
    popsize = popsize_for(config, dimension)
    return [budget.evaluations_for(dimension, popsize) for budget in config.budgets]


def build_cells(config: BenchConfig, problems: list[Problem] | None = None) -> list[Cell]:
    """The matrix, problem-major then optimiser then seed (the order cells are reported in)."""
    from calibri.core.plugins import get_registry
    from calibri.core.options import validate_options

    problems = expand_problems(config) if problems is None else problems
    registry = get_registry()
    for i, spec in enumerate(config.optimizers):
        registration = registry.get("optimizers", spec.name, f"optimizers.{i}.name")
        validate_options(registration.factory, spec.options, f"optimizers.{i}.options", skip=2)
    cells = []
    for problem in problems:
        evaluations = max(budget_evaluations(config, problem.dimension))
        for spec in config.optimizers:
            for seed in config.seeds:
                cells.append(Cell(problem, spec.key, spec.name, dict(spec.options), seed, evaluations,
                                  config.sigma, config.popsize, tuple(config.plugins)))
    return cells
