"""Plugin discovery and the registry of everything plugins registered.

Built-in features are plugins too (:data:`DEFAULT_PLUGINS`); installed ones are found through the
``calibri`` entry-point group. ``CALIBRI_PLUGINS`` (comma-separated entry-point names) restricts
which installed plugins load; set it to an empty string to load none. A plugin that fails to
import or whose hook raises is skipped with a warning naming it; a name registered twice keeps
the first registration and warns naming both plugins.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import ConfigError

ENTRY_POINT_GROUP = "calibri"
ENV_PLUGINS = "CALIBRI_PLUGINS"

#: Modules shipped with calibri that register through the public hooks.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "calibri.optimizers.random_search",
    "calibri.optimizers.pycma_backend",
    "calibri.optimizers.nevergrad_backend",
    "calibri.optimizers.optuna_backend",
    "calibri.plugins.analytic",
    "calibri.plugins.dit.plugin",
    "calibri.plugins.toy.plugin",
    "calibri.plugins.flow_grpo.plugin",
    "calibri.plugins.bbob",
    "calibri.plugins.bench",
    "calibri.rewards.offline",
    "calibri.rewards.models",
    "calibri.rewards.remote",
    "calibri.core.executors",
    "calibri.plugins.dask",
    "calibri.core.callbacks",
    "calibri.plugins.monitoring.plugin",
    "calibri.core.commands",
)

#: Registry kinds, one per ``calibri_register_<kind>`` hook.
KINDS: tuple[str, ...] = (
    "optimizers", "objectives", "spaces", "executors", "rewards", "architectures", "callbacks", "prompt_sources",
    "pipeline_families", "commands",
)

#: One item of each kind, for messages ("unknown optimizer 'x'").
SINGULAR: dict[str, str] = {kind: kind.removesuffix("ies") + "y" if kind.endswith("ies") else kind[:-1] for kind in KINDS}


class PluginWarning(UserWarning):
    """A plugin was skipped or one of its registrations ignored."""


@dataclass(frozen=True)
class Registration:
    """One thing a plugin registered: its ``factory`` plus keyword ``extras`` given to register."""

    kind: str
    name: str
    factory: Any
    plugin: str
    description: str = ""
    extras: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Everything registered, by kind and name. The one place code looks plugins up."""

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self.manager = manager
        self._items: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
        for kind in KINDS:
            self._collect(kind)

    def _collect(self, kind: str) -> None:
        caller = getattr(self.manager.hook, f"calibri_register_{kind}")
        order = {name: i for i, (name, _) in enumerate(self.manager.list_name_plugin())}
        impls = sorted(caller.get_hookimpls(), key=lambda impl: order.get(impl.plugin_name, len(order)))
        for impl in impls:  # plugin registration order: built-ins, installed plugins, extra modules
            plugin = impl.plugin_name
            staged: list[Registration] = []

            def register(*args: Any, _plugin: str = plugin, _staged: list = staged, **kwargs: Any) -> None:
                _staged.append(self._registration(kind, _plugin, *args, **kwargs))

            try:
                impl.function(**{name: register for name in impl.argnames})
            except Exception as exc:  # a broken plugin must not take the host down
                warnings.warn(f"calibri: plugin {plugin!r} failed in calibri_register_{kind}: "
                              f"{type(exc).__name__}: {exc}; its {kind} are skipped", PluginWarning, stacklevel=2)
                continue
            for registration in staged:
                self._add(registration)

    def _registration(self, kind: str, plugin: str, *args: Any, description: str = "",
                      **extras: Any) -> Registration:
        if kind == "commands":
            (command,) = args
            name, factory = command.name, command
        else:
            name, factory = args
        if not isinstance(name, str) or not name:
            raise TypeError(f"register() needs a non-empty name, got {name!r}")
        if not description:
            doc = getattr(factory, "__doc__", None) or ""
            description = doc.strip().splitlines()[0] if doc.strip() else ""
        return Registration(kind, name, factory, plugin, description, extras)

    def _add(self, registration: Registration) -> None:
        kind, name, plugin = registration.kind, registration.name, registration.plugin
        if name in self._items[kind]:
            first = self._items[kind][name].plugin
            warnings.warn(f"calibri: plugin {plugin!r} registers {SINGULAR[kind]} {name!r}, already registered by "
                          f"{first!r}; keeping {first!r}'s", PluginWarning, stacklevel=3)
            return
        self._items[kind][name] = registration

    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])

    def items(self, kind: str) -> list[Registration]:
        return [self._items[kind][name] for name in self.names(kind)]

    def get(self, kind: str, name: str, field_path: str | None = None) -> Registration:
        """The registration, or a :class:`ConfigError` on ``field_path`` listing what exists."""
        try:
            return self._items[kind][name]
        except KeyError:
            available = ", ".join(self.names(kind)) or "none"
            raise ConfigError(field_path or f"{SINGULAR[kind]}",
                              f"unknown {SINGULAR[kind]} {name!r} (available: {available})") from None

    def plugins(self) -> dict[str, dict[str, list[str]]]:
        """Per plugin, what it registered: ``{plugin: {kind: [names]}}``."""
        out: dict[str, dict[str, list[str]]] = {}
        for name, plugin in self.manager.list_name_plugin():
            if plugin is not None:
                out.setdefault(name, {})
        for kind in KINDS:
            for reg in self.items(kind):
                out.setdefault(reg.plugin, {}).setdefault(kind, []).append(reg.name)
        return out


def _allowed_entry_points() -> set[str] | None:
    value = os.environ.get(ENV_PLUGINS)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def build_manager(extra_modules: Iterable[str] = (), load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the built-ins, allowed installed plugins and ``extra_modules``."""
    pm = pluggy.PluginManager("calibri")
    pm.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if load_entry_points:
        allowed = _allowed_entry_points()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if allowed is not None and ep.name not in allowed:
                continue
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as exc:
                warnings.warn(f"calibri: plugin {ep.name!r} ({ep.value}) failed to load: "
                              f"{type(exc).__name__}: {exc}; skipped", PluginWarning, stacklevel=2)
    for module_name in extra_modules:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ConfigError("plugins", f"cannot import plugin module {module_name!r}: "
                                         f"{type(exc).__name__}: {exc}") from None
        if pm.get_plugin(module_name) is None and not pm.is_registered(module):
            pm.register(module, name=module_name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        warnings.warn(f"calibri: {exc}", PluginWarning, stacklevel=2)
    return pm


_registry: Registry | None = None
_extra_modules: tuple[str, ...] = ()


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    if _registry is None:
        _registry = Registry(build_manager(_extra_modules))
    return _registry


def add_plugin_modules(*module_names: str) -> Registry:
    """Register extra plugin modules by import path (they also load in worker processes)."""
    global _extra_modules, _registry
    extra_modules = tuple(dict.fromkeys(_extra_modules + module_names))
    if _registry is not None and extra_modules == _extra_modules:
        return _registry
    registry = Registry(build_manager(extra_modules))  # nothing changes if this raises
    _extra_modules, _registry = extra_modules, registry
    return registry


def reset_registry(extra_modules: tuple[str, ...] = ()) -> None:
    """Forget the registry (tests; after installing a plugin in-process)."""
    global _registry, _extra_modules
    _registry = None
    _extra_modules = tuple(extra_modules)


def build_from(registration: Registration, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a plugin's factory; an import error for an optional dependency becomes a clear message."""
    try:
        return call(*args, **kwargs)
    except ModuleNotFoundError as exc:
        from .errors import PluginError
        raise PluginError(f"{SINGULAR[registration.kind]} {registration.name!r} needs the package "
                          f"{exc.name!r}, which is not installed (try: pip install 'calibri[all]')") from None

