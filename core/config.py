"""Run configuration: YAML + ``key=value`` overrides → a validated :class:`RunConfig`.

Every user mistake surfaces as a :class:`ConfigError` naming the field, before anything runs.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import ConfigError, UserError


#: The most candidates one round may ask for: a round's candidates, results and trial lines are
#: held in memory at once (CMA-ES's default is 4 + 3 ln d, a few dozen even at d = 10,000).
MAX_POPSIZE = 100_000
#: YAML nested deeper than this is refused (it can only be a mistake, and would exhaust the stack).
MAX_YAML_DEPTH = 100


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _shorthand(value: Any) -> Any:
    """``optimizer: pycma`` means ``optimizer: {name: pycma}``."""
    return {"name": value} if isinstance(value, str) else value


class PluginSpec(_Strict):
    """A registered plugin by name, with its own options."""

    name: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _accept_name(cls, value: Any) -> Any:
        return _shorthand(value)


class OptimizerConfig(PluginSpec):
    """``sigma``: initial step size in user units for dimensions that set none;
    ``popsize``: candidates per round (default: the backend's, 4 + ⌊3 ln d⌋ for CMA-ES)."""

    sigma: float | None = Field(default=None, gt=0)
    popsize: int | None = Field(default=None, ge=1, le=MAX_POPSIZE)


class ExecutorConfig(PluginSpec):
    name: str = "serial"
    workers: int = Field(default=1, ge=1, le=1024)
    devices: list[str] | None = None


class BudgetConfig(_Strict):
    """Stop after whichever comes first; at least one is required."""

    rounds: int | None = Field(default=None, ge=1)
    evaluations: int | None = Field(default=None, ge=1)
    seconds: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_limit(self) -> "BudgetConfig":
        if self.rounds is None and self.evaluations is None and self.seconds is None:
            raise ValueError("give at least one of rounds, evaluations, seconds")
        return self


class ValidationConfig(_Strict):
    """Held-out evaluation of the optimiser's recommendation and of the incumbent every
    ``every`` rounds (and at the end), for objectives whose data stream has a validation set.
    The run's result is the point with the best validation value, not the best noisy
    training value (the winner's curse)."""

    every: int | None = Field(default=None, ge=1)


class RunConfig(_Strict):
    """The whole run. ``space`` is a mapping of dimensions, or ``{name: ..., options: ...}``
    naming a registered parameterisation; omitted, the objective supplies its own."""

    name: str | None = None
    seed: int = Field(default=0, ge=0, strict=True)
    objective: PluginSpec
    space: dict[str, Any] | None = None
    optimizer: OptimizerConfig
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    budget: BudgetConfig
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    max_failure_rate: float = Field(default=0.2, ge=0, le=1)
    fsync: bool = Field(default=False, description="fsync run files every round: survive power loss, not "
                                                   "only a killed process (costs milliseconds per round)")
    callbacks: list[PluginSpec] = Field(default_factory=lambda: [PluginSpec(name="progress"), PluginSpec(name="plot")])
    plugins: list[str] = Field(default_factory=list, description="extra plugin modules to import")
    versions: dict[str, str] | None = Field(default=None, description="written by calibri; informational")

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            value = dict(value)
            for key in ("objective", "optimizer", "executor"):
                if key in value:
                    value[key] = _shorthand(value[key])
            if isinstance(value.get("callbacks"), list):
                value["callbacks"] = [_shorthand(item) for item in value["callbacks"]]
        return value


Direction = Literal["minimize", "maximize"]


# -- loading --------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"override {text!r}", "expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except RecursionError:
        raise ConfigError(key.strip(), "value nested too deeply") from None
    except yaml.YAMLError:
        value = raw
    if _depth(value) > MAX_YAML_DEPTH:
        raise ConfigError(key.strip(), f"value nested more than {MAX_YAML_DEPTH} levels deep")
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if isinstance(child, str) and part in ("objective", "optimizer", "executor"):
                child = {"name": child}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(path[: depth + 1]), f"is {child!r}, not a mapping, so {text!r} cannot set inside it")
            node[part] = child
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``, with one-line errors naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"{path}: invalid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        raise UserError(f"{path}: the file is empty")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    if _depth(data) > MAX_YAML_DEPTH:
        raise UserError(f"{path}: invalid YAML: nested more than {MAX_YAML_DEPTH} levels deep")
    return data


def _depth(value: Any, limit: int = MAX_YAML_DEPTH + 1) -> int:
    """Nesting depth of mappings and lists, counted up to ``limit`` (iteratively: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest >= limit:
            return deepest
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def config_error(exc: pydantic.ValidationError, model: type[BaseModel], root: str = "config") -> ConfigError:
    """A schema's first validation error as a one-line :class:`ConfigError` naming the field
    (``root`` where the error is about the whole document)."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"] if not str(part).startswith("function-")]
    field = ".".join(loc) or root
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
        if len(loc) == 1:
            message += f" (known: {', '.join(model.model_fields)})"
    elif error["type"] != "missing" and "input" in error and not isinstance(error["input"], (dict, list)):
        message = f"{message} (got {error['input']!r})"
    return ConfigError(field, message)


def validate(data: Mapping[str, Any]) -> RunConfig:
    """Schema validation with the first error as a one-line :class:`ConfigError`."""
    try:
        return RunConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        raise config_error(exc, RunConfig) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    return validate(apply_overrides(read_yaml(path), overrides))


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
