"""Validating a plugin's options from config against its factory's signature."""
from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

import pydantic

from .errors import ConfigError


def _model_for(factory: Callable[..., Any], skip: int,
               reserved: tuple[str, ...]) -> type[pydantic.BaseModel] | None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: treat as untyped
        hints = {}
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


def validate_options(factory: Callable[..., Any], options: Mapping[str, Any], field: str,
                     skip: int = 0, reserved: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check ``options`` against ``factory``'s keyword parameters; return them coerced.

    ``skip`` positional parameters are supplied by calibri (e.g. ``space, settings``);
    ``reserved`` keyword parameters too. Unknown keys, missing required ones and wrong types
    raise :class:`ConfigError` naming ``field.<key>``.
    """
    model = _model_for(factory, skip, reserved)
    if model is None:
        return dict(options)
    try:
        validated = model.model_validate(dict(options))
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            known = ", ".join(sorted(f.alias for f in model.model_fields.values())) or "none"
            message = f"unknown option (known: {known})"
        elif "input" in error and error["type"] != "missing":
            message = f"{message} (got {error['input']!r})"
        raise ConfigError(f"{field}.{where}" if where else field, message) from None
    values = validated.model_dump(by_alias=True)
    return {name: values[name] for name in options}
