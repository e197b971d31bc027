"""The cell matrix: every problem × optimiser × seed, each a normal calibri run.

A cell runs to the bench's largest budget; smaller budgets are prefixes of the same run
(calibri's optimisers do not know the budget), which is how fixed-budget views are read off
COCO and IOHprofiler data too.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
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
    #: A calibration problem's run YAML without what the bench sets per cell (optimiser, seed,
    #: budget, callbacks): its validation, executor, space and failure rate.
    run: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    sigma: float | None = None                   # the calibration YAML's optimizer.sigma
    popsize: int | None = None                   # the calibration YAML's optimizer.popsize
    images_per_evaluation: int | None = None     # bucket_size × step counts (in round 0)
    #: A bucket-size schedule's images per evaluation: ``(first_round, images)`` steps; None when fixed.
    images_schedule: tuple[tuple[int, int], ...] | None = None
    images_per_validation: int | None = None     # validation prompts × step counts
    plugins: tuple[str, ...] = ()

    @property
    def images_label(self) -> str:
        """Images per evaluation: ``32``, or a schedule's ``8→16@10→32@20`` (from the round after @)."""
        from calibri.plugins.dit.buckets import BucketSchedule

        if self.images_schedule:
            return BucketSchedule(self.images_schedule).label()
        return str(self.images_per_evaluation or "")

    @property
    def is_calibration(self) -> bool:
        return self.run is not None

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
        plugins = list(dict.fromkeys([*self.problem.plugins, *self.plugins]))
        return {"name": self.key, "seed": self.seed, **copy.deepcopy(self.problem.run or {}),
                "objective": {"name": self.problem.objective, "options": copy.deepcopy(self.problem.options)},
                "optimizer": optimizer, "budget": {"evaluations": self.evaluations},
                "callbacks": [], "plugins": plugins}


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
        if spec.calibration is not None:
            out.append(calibration_problem(i, spec))
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


#: The run-YAML keys a calibration problem keeps; the bench sets the rest per cell.
CALIBRATION_KEEPS = ("space", "executor", "validation", "max_failure_rate")


def calibration_problem(i: int, spec: ProblemSpec) -> Problem:
    """A calibration run YAML (with its overrides) as a problem: checked like ``calibri run``
    checks it (objective options, space, validation prompts), nothing loaded. Its cost unit is
    the image: a candidate makes ``bucket_size`` images at each of its step counts."""
    from calibri.core.config import apply_overrides, read_yaml, validate
    from calibri.core.errors import UserError
    from calibri.core.run import plan

    assert spec.calibration is not None
    field_path = f"problems.{i}.calibration"
    try:
        data = read_yaml(spec.calibration.config)
    except UserError as exc:
        raise ConfigError(f"{field_path}.config", str(exc)) from None
    overrides = [f"{key}={json.dumps(value)}" for key, value in spec.calibration.overrides.items()]
    try:
        data = apply_overrides(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{field_path}.overrides.{exc.field}", exc.message) from None
    try:
        run = validate({**data, "callbacks": []})
        planned = plan(run)
    except ConfigError as exc:  # the run YAML's own field, after the overrides
        raise ConfigError(f"{field_path}.config", f"{exc.field}: {exc.message}" if exc.field else exc.message) \
            from None
    if run.objective.name != "calibri":
        raise ConfigError(f"{field_path}.config", f"objective is {run.objective.name!r}; a calibration problem "
                                                  f"needs the calibri objective (its images are the cost)")
    if run.validation.every is None:
        raise ConfigError(f"{field_path}.config", "has no validation.every; the score of a calibration problem "
                                                  "is its held-out validation reward")
    from calibri.plugins.dit.objective import FIELD, CalibriOptions
    from calibri.plugins.dit.prompts import load_prompts

    options = CalibriOptions.trusted(planned.recipe.options)
    if options.validation_prompts is None:
        raise ConfigError(f"{field_path}.config", "objective.options.validation_prompts is null; the score of a "
                                                  "calibration problem is its held-out validation reward")
    held_out = load_prompts(options.validation_prompts, f"{FIELD}.validation_prompts")
    nfes = len(options.step_counts)
    dumped = run.model_dump(mode="json", exclude_none=True)
    label = spec.label or run.name or Path(spec.calibration.config).stem
    return Problem(label, run.objective.name, dict(run.objective.options), len(planned.space or ()), None,
                   run={key: dumped[key] for key in CALIBRATION_KEEPS if key in dumped},
                   sigma=run.optimizer.sigma, popsize=run.optimizer.popsize,
                   images_per_validation=len(held_out.prompts) * nfes, plugins=tuple(run.plugins),
                   **image_cost(options))


def image_cost(options: Any) -> dict[str, Any]:
    """A calibration's images per evaluation (:class:`Problem` fields) from its checked options:
    each candidate makes its round's bucket of prompts at each step count."""
    schedule, nfes = options.bucket_schedule, len(options.step_counts)
    steps = None if schedule.fixed else tuple((first, size * nfes) for first, size in schedule.steps)
    return {"images_per_evaluation": schedule.size(0) * nfes, "images_schedule": steps}


def popsize_for(config: BenchConfig, dimension: int, problem: Problem | None = None) -> int:
    from calibri.core.optimizer import default_popsize

    return config.popsize or (problem.popsize if problem is not None else None) or default_popsize(dimension)


def budget_evaluations(config: BenchConfig, dimension: int, problem: Problem | None = None,
                       images_per_evaluation: int | None = None) -> list[int]:
    """Each budget of the bench in evaluations, for a problem of ``dimension`` (an image budget:
    for candidates of ``images_per_evaluation`` images, by default the problem's)."""
    from calibri.plugins.dit.buckets import BucketSchedule, evaluations_for_images

    popsize = popsize_for(config, dimension, problem)
    per = images_per_evaluation or (problem.images_per_evaluation if problem is not None else None)
    schedule = problem.images_schedule if problem is not None and not images_per_evaluation else None
    out = []
    for i, budget in enumerate(config.budgets):
        try:
            if schedule and budget.images is not None:
                out.append(evaluations_for_images(BucketSchedule(schedule), popsize, budget.images))
                continue
            out.append(budget.evaluations_for(dimension, popsize, per))
        except ValueError as exc:
            raise ConfigError(f"budgets.{i}.images", f"{exc}; problem {problem.label if problem else '?'!r} "
                                                     f"is not one") from None
    return out


def setup_problem(problem: Problem, spec: Any, index: int) -> Problem:
    """``problem`` as optimiser entry ``index`` runs it: a calibration with the entry's
    ``objective_options`` merged into its objective's options (checked, errors naming the entry);
    any other problem unchanged (and refused with objective options)."""
    if not spec.objective_options:
        return problem
    field_path = f"optimizers.{index}.objective_options"
    if not problem.is_calibration:
        raise ConfigError(field_path, f"only calibration problems take objective options; {problem.label!r} is not one")
    from dataclasses import replace

    from calibri.core.options import validate_options
    from calibri.core.plugins import get_registry
    from calibri.plugins.dit.objective import CalibriOptions

    if {"validation_prompts", "validation_seed"} & set(spec.objective_options):
        raise ConfigError(field_path, "every set-up of a calibration is scored on the same held-out prompts and "
                                      "seed; leave validation_prompts and validation_seed to the problem")
    registration = get_registry().get("objectives", problem.objective)
    base = CalibriOptions.trusted(validate_options(registration.factory, problem.options, field_path,
                                                   reserved=("device",)))
    options = {**problem.options, **spec.objective_options}
    opts = CalibriOptions.trusted(validate_options(registration.factory, options, field_path, reserved=("device",)))
    held_out = (problem.images_per_validation or 0) // len(base.step_counts)  # validation prompts
    return replace(problem, options=options, images_per_validation=held_out * len(opts.step_counts),
                   **image_cost(opts))


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
        sigma = config.sigma if config.sigma is not None else problem.sigma
        popsize = config.popsize or problem.popsize
        for index, spec in enumerate(config.optimizers):
            setup = setup_problem(problem, spec, index)
            evaluations = max(budget_evaluations(config, setup.dimension, setup))
            for seed in config.seeds:
                cells.append(Cell(setup, spec.key, spec.name, dict(spec.options), seed, evaluations,
                                  sigma, popsize, tuple(config.plugins)))
    return cells
