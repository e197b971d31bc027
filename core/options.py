"""Validating a plugin's options from config: against the factory's declared options model, or
else against its signature.

A factory declares its options once, either by its keyword parameters (checked with their type
annotations) or by a pydantic model attached with :func:`options_model` (for many options, or
options with constraints and checks that involve several of them). Either way
:func:`validate_options` turns every mistake into a one-line :class:`ConfigError` naming the
option (``objective.options.steps: must be at least 1, got 0``).
"""
from __future__ import annotations

import inspect
import sys
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import pydantic

from .errors import ConfigError

F = TypeVar("F")


def options_model(model: type[pydantic.BaseModel]) -> Callable[[F], F]:
    """Declare a factory's options by a pydantic ``model`` (a decorator; sets ``factory.options_model``).

    :func:`validate_options` then checks options against ``model`` instead of the factory's
    signature: a key that is not one of its fields (by alias, where a field has one) is an unknown
    option; types, constraints and validators are the model's. A validator raising
    ``ValueError(message)`` gives ``<field>.<option>: message``. Reserved options (an objective's
    ``device``) may be fields of the model but are refused in a config. The factory then receives,
    as keyword arguments, the validated values of the options the config gave (plus the reserved
    ones calibri supplies), and may build the model from them without validating again
    (``model.model_construct(**options)``).
    """
    if not (isinstance(model, type) and issubclass(model, pydantic.BaseModel)):
        raise TypeError(f"options_model() needs a pydantic model class, got {model!r}")

    def declare(factory: F) -> F:
        factory.options_model = model  # type: ignore[attr-defined]
        return factory

    return declare


def _type_hints(target: Callable[..., Any]) -> dict[str, Any]:
    """The parameters' annotations, each resolved on its own: one unresolvable annotation (a
    library's ``Callable`` imported only for type checkers) leaves that parameter unchecked
    (``Any``), not all of them."""
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - resolve one by one below
        pass
    namespace = dict(getattr(sys.modules.get(getattr(target, "__module__", "")), "__dict__", {}))
    hints: dict[str, Any] = {}
    for name, annotation in getattr(target, "__annotations__", {}).items():
        try:
            hints[name] = typing.get_type_hints(_Annotated(annotation), namespace)["value"]
        except Exception:  # noqa: BLE001 - this one stays unchecked
            continue
    return hints


class _Annotated:
    """A stand-in object with one annotation, for resolving it with :func:`typing.get_type_hints`."""

    def __init__(self, annotation: Any) -> None:
        self.__annotations__ = {"value": annotation}


def _model_for(factory: Callable[..., Any], skip: int,
               reserved: tuple[str, ...]) -> type[pydantic.BaseModel] | None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = _type_hints(target)
    fields: dict[str, Any] = {}
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.POSITIONAL_ONLY):
            continue
        if param in positional[:skip] or param.name in reserved:
            continue
        annotation = hints.get(param.name, Any)
        default = ... if param.default is inspect.Parameter.empty else param.default
        # Internal names with the parameter as alias: a parameter may be called like one of
        # pydantic's own attributes (model_config, ...).
        fields[f"option_{len(fields)}"] = (annotation, pydantic.Field(default, alias=param.name))
    config = pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    try:
        return pydantic.create_model(f"{getattr(factory, '__name__', 'Factory')}Options",
                                     __config__=config, **fields)
    except Exception:  # unresolvable annotations: fall back to no checking
        return None


def option_names(model: type[pydantic.BaseModel]) -> dict[str, str]:
    """``{option: attribute}``: the keys a config gives (a field's alias where it has one)."""
    return {info.alias or name: name for name, info in model.model_fields.items()}


def _config_error(exc: pydantic.ValidationError, field: str, known: list[str]) -> ConfigError:
    """The one-line :class:`ConfigError` for the first of ``exc``'s errors, under ``field``."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = f"unknown option (known: {', '.join(known) or 'none'})"
    elif error["type"] == "value_error" and "error" in error.get("ctx", {}):
        message = str(error["ctx"]["error"])  # a validator's own message, without pydantic's prefix
    elif "input" in error and error["type"] != "missing":
        message = f"{message} (got {error['input']!r})"
    return ConfigError(f"{field}.{where}" if where else field, message)


def validate_options(factory: Callable[..., Any], options: Mapping[str, Any], field: str,
                     skip: int = 0, reserved: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check ``options`` against ``factory``'s options; return them validated (same keys).

    The options are those of ``factory.options_model`` (see :func:`options_model`) when it has
    one, else ``factory``'s keyword parameters, of which ``skip`` positional ones are supplied by
    calibri (e.g. ``space, settings``). ``reserved`` options are supplied by calibri too, never
    by the config. Unknown keys, missing required ones, wrong types and failed checks raise
    :class:`ConfigError` naming ``field.<key>``. A factory taking ``**kwargs`` without an options
    model is not checked.
    """
    declared = getattr(factory, "options_model", None)
    if declared is not None:
        return _validate_declared(declared, options, field, reserved)
    model = _model_for(factory, skip, reserved)
    if model is None:
        return dict(options)
    known = sorted(option_names(model))
    try:
        validated = model.model_validate(dict(options))
    except pydantic.ValidationError as exc:
        raise _config_error(exc, field, known) from None
    values = validated.model_dump(by_alias=True)
    return {name: values[name] for name in options}


def _validate_declared(model: type[pydantic.BaseModel], options: Mapping[str, Any], field: str,
                       reserved: tuple[str, ...]) -> dict[str, Any]:
    names = {key: name for key, name in option_names(model).items() if key not in reserved}
    known = sorted(names)
    for key in options:
        if key not in names:  # whatever the model's own ``extra`` setting
            raise ConfigError(f"{field}.{key}", f"unknown option (known: {', '.join(known) or 'none'})")
    try:
        validated = model.model_validate(dict(options))
    except pydantic.ValidationError as exc:
        raise _config_error(exc, field, known) from None
    return {key: getattr(validated, names[key]) for key in options}
