"""The plugin manager: built-ins as plugins, entry points, CALIBRI_PLUGINS, broken plugins,
duplicate names, misspelt hooks, unknown names and extra plugin modules."""
from __future__ import annotations

import importlib.metadata
import sys
import types
import warnings

import pytest

from calibri.core import plugins
from calibri.core.errors import ConfigError
from calibri.core.hookspecs import hookimpl
from calibri.core.plugins import (
    DEFAULT_PLUGINS, ENTRY_POINT_GROUP, KINDS, SINGULAR, PluginWarning, Registry, add_plugin_modules, build_manager,
    get_registry, reset_registry,
)

_real_entry_points = importlib.metadata.entry_points


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """A fresh registry per test, no CALIBRI_PLUGINS, and only the fake entry points a test adds."""
    fake: list[importlib.metadata.EntryPoint] = []

    def entry_points(**params):
        if params.get("group") == ENTRY_POINT_GROUP:
            return importlib.metadata.EntryPoints(fake)
        return _real_entry_points(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.delenv(plugins.ENV_PLUGINS, raising=False)
    reset_registry()
    yield fake
    reset_registry()


def entry_point(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


def fake_module(monkeypatch, name: str, **attributes) -> types.ModuleType:
    """A plugin module importable as ``name`` for the duration of the test."""
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def registering(kind: str, *names: str):
    """A hook implementation registering ``names`` (each factory records which plugin made it)."""

    def hook(register):
        for name in names:
            register(name, lambda *args, **kwargs: None)

    hook.__name__ = f"calibri_register_{kind}"
    return hookimpl(hook)


def plugin_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, PluginWarning)]


# -- built-ins -----------------------------------------------------------------------------------
def test_every_builtin_module_is_a_registered_plugin():
    registry = get_registry()
    listing = registry.plugins()
    for module_name in DEFAULT_PLUGINS:
        module = sys.modules[module_name]
        assert registry.manager.get_plugin(module_name) is module
        assert listing.get(module_name), f"built-in plugin {module_name} registered nothing"
    registered_by = {reg.plugin for kind in KINDS for reg in registry.items(kind)}
    assert registered_by == set(DEFAULT_PLUGINS)


@pytest.mark.parametrize(("kind", "name", "plugin"), [
    ("optimizers", "random", "calibri.optimizers.random_search"),
    ("optimizers", "pycma", "calibri.optimizers.pycma_backend"),
    ("optimizers", "nevergrad.cma", "calibri.optimizers.nevergrad_backend"),
    ("optimizers", "optuna.tpe", "calibri.optimizers.optuna_backend"),
    ("objectives", "sphere", "calibri.plugins.analytic"),
    ("objectives", "python", "calibri.plugins.analytic"),
    ("executors", "serial", "calibri.core.executors"),
    ("executors", "process", "calibri.core.executors"),
    ("callbacks", "progress", "calibri.core.callbacks"),
    ("commands", "run", "calibri.core.commands"),
    ("commands", "plugins", "calibri.core.commands"),
])
def test_builtins_register_through_the_public_hooks(kind, name, plugin):
    registration = get_registry().get(kind, name)
    assert registration.plugin == plugin
    assert registration.kind == kind and registration.name == name
    assert registration.description, "a registration gets its factory's first docstring line"


def test_builtins_load_with_installed_plugins_disabled(monkeypatch):
    monkeypatch.setenv(plugins.ENV_PLUGINS, "")
    assert set(get_registry().plugins()) == set(DEFAULT_PLUGINS)
    assert set(Registry(build_manager(load_entry_points=False)).plugins()) == set(DEFAULT_PLUGINS)


# -- entry points and CALIBRI_PLUGINS ------------------------------------------------------------
def test_entry_point_plugins_register_under_their_entry_point_name(isolated):
    isolated.append(entry_point("fixture", "plugin_fixtures"))
    registry = get_registry()
    assert registry.get("optimizers", "fixture.optimizer").plugin == "fixture"
    assert "fixture" in registry.plugins()


@pytest.mark.parametrize(("setting", "loaded"), [
    (None, {"fixture", "other"}),
    ("", set()),
    ("fixture", {"fixture"}),
    (" other , nonexistent ", {"other"}),
    ("fixture,other", {"fixture", "other"}),
])
def test_calibri_plugins_selects_installed_plugins(isolated, monkeypatch, setting, loaded):
    isolated.append(entry_point("fixture", "plugin_fixtures"))
    isolated.append(entry_point("other", "other_plugin"))
    fake_module(monkeypatch, "other_plugin", calibri_register_spaces=registering("spaces", "other.space"))
    if setting is not None:
        monkeypatch.setenv(plugins.ENV_PLUGINS, setting)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        listing = get_registry().plugins()
    assert set(listing) - set(DEFAULT_PLUGINS) == loaded
    assert ("fixture.optimizer" in get_registry().names("optimizers")) == ("fixture" in loaded)
    assert ("other.space" in get_registry().names("spaces")) == ("other" in loaded)


def test_a_plugin_that_fails_to_import_warns_naming_it_and_the_host_still_works(isolated):
    isolated.append(entry_point("broken", "calibri_test_no_such_module:plugin"))
    isolated.append(entry_point("fixture", "plugin_fixtures"))
    with pytest.warns(PluginWarning) as record:
        registry = get_registry()
    messages = plugin_warnings(record)
    assert len(messages) == 1
    assert "'broken'" in messages[0] and "calibri_test_no_such_module" in messages[0]
    assert "failed to load" in messages[0] and "ModuleNotFoundError" in messages[0]
    assert "broken" not in registry.plugins()
    assert registry.get("optimizers", "random").plugin == "calibri.optimizers.random_search"
    assert registry.get("optimizers", "fixture.optimizer").plugin == "fixture"


def test_a_plugin_raising_at_import_warns_naming_it(isolated, monkeypatch, tmp_path):
    (tmp_path / "exploding_plugin.py").write_text('raise RuntimeError("kaboom at import")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "exploding_plugin", raising=False)
    isolated.append(entry_point("explodes", "exploding_plugin"))
    with pytest.warns(PluginWarning, match=r"'explodes' \(exploding_plugin\) failed to load: "
                                           r"RuntimeError: kaboom at import; skipped"):
        registry = get_registry()
    assert "explodes" not in registry.plugins()
    assert "random" in registry.names("optimizers")


def test_a_plugin_with_a_bad_hook_signature_is_skipped_with_a_warning(isolated, monkeypatch):
    @hookimpl
    def calibri_register_optimizers(reg):  # the hook's argument is called ``register``
        reg("bad.optimizer", object)

    fake_module(monkeypatch, "bad_signature_plugin", calibri_register_optimizers=calibri_register_optimizers)
    isolated.append(entry_point("badsig", "bad_signature_plugin"))
    with pytest.warns(PluginWarning, match=r"'badsig'.*failed to load"):
        registry = get_registry()
    assert "bad.optimizer" not in registry.names("optimizers")


def test_a_plugin_whose_hook_raises_is_skipped_with_a_warning_naming_it(isolated, monkeypatch):
    @hookimpl
    def calibri_register_objectives(register):
        raise RuntimeError("no GPU here")

    fake_module(monkeypatch, "raising_plugin", calibri_register_objectives=calibri_register_objectives,
                calibri_register_spaces=registering("spaces", "raising.space"))
    isolated.append(entry_point("raising", "raising_plugin"))
    with pytest.warns(PluginWarning) as record:
        registry = get_registry()
    messages = plugin_warnings(record)
    assert len(messages) == 1
    assert "'raising'" in messages[0] and "calibri_register_objectives" in messages[0]
    assert "RuntimeError: no GPU here" in messages[0]
    # The host works, and the plugin's other hooks still count.
    assert registry.get("objectives", "sphere").plugin == "calibri.plugins.analytic"
    assert registry.get("spaces", "raising.space").plugin == "raising"


def test_a_hook_that_raises_part_way_registers_nothing(monkeypatch):
    @hookimpl
    def calibri_register_optimizers(register):
        register("partial.first", object)
        raise RuntimeError("second one broke")

    fake_module(monkeypatch, "partial_plugin", calibri_register_optimizers=calibri_register_optimizers)
    with pytest.warns(PluginWarning, match="'partial_plugin'.*second one broke.*skipped"):
        registry = add_plugin_modules("partial_plugin")
    assert "partial.first" not in registry.names("optimizers")


# -- duplicate names -----------------------------------------------------------------------------
def test_a_duplicate_name_warns_naming_both_plugins(monkeypatch):
    fake_module(monkeypatch, "dup_first", calibri_register_optimizers=registering("optimizers", "dup.es"))
    fake_module(monkeypatch, "dup_second", calibri_register_optimizers=registering("optimizers", "dup.es"))
    with pytest.warns(PluginWarning) as record:
        registry = add_plugin_modules("dup_first", "dup_second")
    messages = [m for m in plugin_warnings(record) if "'dup.es'" in m]
    assert len(messages) == 1
    assert "'dup_first'" in messages[0] and "'dup_second'" in messages[0]
    assert registry.get("optimizers", "dup.es").plugin in {"dup_first", "dup_second"}
    assert registry.names("optimizers").count("dup.es") == 1


def test_names_are_per_kind(monkeypatch):
    fake_module(monkeypatch, "same_name_plugin", calibri_register_spaces=registering("spaces", "shared"),
                calibri_register_callbacks=registering("callbacks", "shared"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        registry = add_plugin_modules("same_name_plugin")
    assert registry.get("spaces", "shared").plugin == registry.get("callbacks", "shared").plugin


def test_a_duplicate_name_keeps_the_first_registration(monkeypatch):
    fake_module(monkeypatch, "dup_first", calibri_register_optimizers=registering("optimizers", "dup.es"))
    fake_module(monkeypatch, "dup_second", calibri_register_optimizers=registering("optimizers", "dup.es"))
    with pytest.warns(PluginWarning, match=r"plugin 'dup_second' registers optimizer 'dup.es', already "
                                           r"registered by 'dup_first'; keeping 'dup_first'"):
        registry = add_plugin_modules("dup_first", "dup_second")
    assert registry.get("optimizers", "dup.es").plugin == "dup_first"


def test_an_installed_plugin_cannot_shadow_a_builtin(isolated, monkeypatch):
    fake_module(monkeypatch, "shadowing_plugin", calibri_register_optimizers=registering("optimizers", "random"))
    isolated.append(entry_point("shadow", "shadowing_plugin"))
    with pytest.warns(PluginWarning, match="'shadow'.*'random'.*'calibri.optimizers.random_search'"):
        registry = get_registry()
    assert registry.get("optimizers", "random").plugin == "calibri.optimizers.random_search"


# -- misspelt hooks ------------------------------------------------------------------------------
def test_a_misspelt_hook_implementation_warns(monkeypatch):
    @hookimpl
    def calibri_register_optimisers(register):
        register("typo.es", object)

    fake_module(monkeypatch, "typo_plugin", calibri_register_optimisers=calibri_register_optimisers)
    with pytest.warns(PluginWarning, match=r"unknown hook 'calibri_register_optimisers'.*typo_plugin"):
        registry = add_plugin_modules("typo_plugin")
    assert "typo.es" not in registry.names("optimizers")
    assert "random" in registry.names("optimizers")


def test_a_misspelt_hook_in_an_installed_plugin_warns(isolated, monkeypatch):
    @hookimpl
    def calibri_register_command(register):
        pass

    fake_module(monkeypatch, "typo_ep_plugin", calibri_register_command=calibri_register_command)
    isolated.append(entry_point("typo", "typo_ep_plugin"))
    with pytest.warns(PluginWarning, match="unknown hook 'calibri_register_command'"):
        get_registry()


def test_undecorated_functions_are_not_hooks(monkeypatch):
    def calibri_register_optimizers(register):  # no @hookimpl
        register("undecorated.es", object)

    fake_module(monkeypatch, "undecorated_plugin", calibri_register_optimizers=calibri_register_optimizers)
    registry = add_plugin_modules("undecorated_plugin")
    assert "undecorated.es" not in registry.names("optimizers")


# -- lookups ---------------------------------------------------------------------------------------
def test_unknown_name_lookups_raise_a_config_error_listing_available_names():
    registry = get_registry()
    with pytest.raises(ConfigError) as info:
        registry.get("optimizers", "nope", "optimizer.name")
    assert info.value.field == "optimizer.name"
    assert "unknown optimizer 'nope'" in info.value.message
    for name in ("random", "pycma", "nevergrad.cma", "optuna.tpe"):
        assert name in info.value.message
    assert str(info.value).startswith("optimizer.name: unknown optimizer 'nope' (available: ")


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_names_of_every_kind_are_config_errors(kind):
    singular = SINGULAR[kind]
    assert not singular.endswith("s") and not singular.endswith("ie"), singular
    with pytest.raises(ConfigError, match=rf"^{singular}: unknown {singular} 'no-such-thing' \(available: "):
        get_registry().get(kind, "no-such-thing")


def test_an_unknown_optimizer_in_a_run_config_names_the_field():
    from calibri.core.config import validate
    from calibri.core.run import plan

    config = validate({"objective": "sphere", "optimizer": "no-such-es", "budget": {"rounds": 1}})
    with pytest.raises(ConfigError, match=r"^optimizer\.name: unknown optimizer 'no-such-es' \(available: .*random"):
        plan(config)


def test_register_needs_a_name(monkeypatch):
    @hookimpl
    def calibri_register_spaces(register):
        register("", object)

    fake_module(monkeypatch, "nameless_plugin", calibri_register_spaces=calibri_register_spaces)
    with pytest.warns(PluginWarning, match="'nameless_plugin'.*non-empty name"):
        add_plugin_modules("nameless_plugin")


# -- extra plugin modules --------------------------------------------------------------------------
def test_add_plugin_modules_registrations_are_visible():
    import plugin_fixtures

    before = get_registry()
    assert "fixture.optimizer" not in before.names("optimizers")
    registry = add_plugin_modules("plugin_fixtures")
    assert registry is get_registry() and registry is not before
    assert registry.manager.get_plugin("plugin_fixtures") is plugin_fixtures
    assert add_plugin_modules("plugin_fixtures") is registry  # already there: nothing is rebuilt
    for kind, names in plugin_fixtures.REGISTERED.items():
        for name in names:
            assert registry.get(kind, name).plugin == "plugin_fixtures"
    assert registry.plugins()["plugin_fixtures"] == plugin_fixtures.REGISTERED
    # The built-ins are still there.
    assert registry.get("optimizers", "random").plugin == "calibri.optimizers.random_search"


def test_add_plugin_modules_accumulates_and_reset_forgets(monkeypatch):
    fake_module(monkeypatch, "extra_a", calibri_register_spaces=registering("spaces", "a.space"))
    fake_module(monkeypatch, "extra_b", calibri_register_spaces=registering("spaces", "b.space"))
    add_plugin_modules("extra_a")
    registry = add_plugin_modules("extra_b", "extra_a")
    loaded = [name for name, _ in registry.manager.list_name_plugin()]
    assert loaded[-2:] == ["extra_a", "extra_b"] and loaded.count("extra_a") == 1  # in order, once each
    assert registry.get("spaces", "a.space").plugin == "extra_a"
    assert registry.get("spaces", "b.space").plugin == "extra_b"
    reset_registry()
    assert not {"a.space", "b.space"} & set(get_registry().names("spaces"))
    reset_registry(("extra_b",))
    assert "b.space" in get_registry().names("spaces") and "a.space" not in get_registry().names("spaces")


def test_a_builtin_named_as_an_extra_module_is_registered_once():
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        registry = add_plugin_modules("calibri.optimizers.random_search")
    assert registry.get("optimizers", "random").plugin == "calibri.optimizers.random_search"


def test_plugins_listed_in_a_run_config_are_loaded(tmp_path):
    from calibri.core.config import validate
    from calibri.core.run import plan

    config = validate({"objective": "fixture.objective", "optimizer": "fixture.optimizer",
                       "plugins": ["plugin_fixtures"], "budget": {"rounds": 1}})
    resolved = plan(config)
    assert resolved.optimizer.plugin == "plugin_fixtures"
    assert resolved.recipe.plugin_modules == ("plugin_fixtures",)
    assert resolved.space is not None and resolved.space.names == ["x[0]", "x[1]"]


def test_a_missing_extra_plugin_module_is_a_config_error_and_does_not_poison_the_registry():
    with pytest.raises(ConfigError, match="calibri_test_no_such_module"):
        add_plugin_modules("calibri_test_no_such_module")
    assert "random" in get_registry().names("optimizers")


def test_an_installed_plugin_also_listed_as_an_extra_module_is_registered_once(isolated):
    isolated.append(entry_point("fixture", "plugin_fixtures"))
    registry = add_plugin_modules("plugin_fixtures")
    assert registry.get("optimizers", "fixture.optimizer").plugin == "fixture"


# -- options declared by a model -------------------------------------------------------------------
def _declared_objective():
    """An objective factory whose options are a pydantic model (one of them aliased)."""
    import pydantic

    from calibri.core import FunctionObjective, Float, Space
    from calibri.core.options import options_model

    class BoxOptions(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="allow", populate_by_name=True)  # unknown keys still refused

        dim: int = 2
        label: str = pydantic.Field("box", alias="model_config")
        device: str | None = None

        @pydantic.field_validator("dim")
        @classmethod
        def _positive(cls, value: int) -> int:
            if value < 1:
                raise ValueError(f"must be at least 1, got {value}")
            return value

    seen: list[dict] = []

    def box(**options):
        seen.append(options)
        opts = BoxOptions.model_construct(**options)
        return Space(Float(f"{opts.label}[{i}]", 0.0, 1.0) for i in range(opts.dim))

    @options_model(BoxOptions)
    def factory(device=None, **options):
        seen.append({**options, "device": device})
        return FunctionObjective(lambda params: sum(params.values()), space=box(**options))

    return factory, box, seen


@pytest.mark.parametrize(("options", "field", "message"), [
    ({"dims": 3}, "objective.options.dims", "unknown option (known: dim, model_config)"),
    ({"device": "cuda"}, "objective.options.device", "unknown option (known: dim, model_config)"),
    ({"dim": 0}, "objective.options.dim", "must be at least 1, got 0"),
    ({"dim": "many"}, "objective.options.dim", "Input should be a valid integer"),
    ({"model_config": 3}, "objective.options.model_config", "Input should be a valid string (got 3)"),
])
def test_options_declared_by_a_model_are_checked_against_it(options, field, message):
    from calibri.core.options import validate_options

    factory, _, _ = _declared_objective()
    with pytest.raises(ConfigError) as info:
        validate_options(factory, options, "objective.options", reserved=("device",))
    assert info.value.field == field and message in info.value.message
    assert "\n" not in str(info.value)


def test_options_declared_by_a_model_come_back_validated_with_the_keys_given():
    from calibri.core.options import options_model, validate_options

    factory, _, _ = _declared_objective()
    assert validate_options(factory, {"dim": "3", "model_config": "b"}, "objective.options",
                            reserved=("device",)) == {"dim": 3, "model_config": "b"}
    assert validate_options(factory, {}, "objective.options", reserved=("device",)) == {}
    with pytest.raises(TypeError, match="pydantic model"):
        options_model(dict)


def test_a_run_validates_model_declared_options_once_and_hands_them_to_the_factory_and_space(monkeypatch):
    from calibri.core.config import validate
    from calibri.core.run import plan

    factory, box, seen = _declared_objective()

    @hookimpl
    def calibri_register_objectives(register):
        register("declared.box", factory, space=box)

    fake_module(monkeypatch, "declared_plugin", calibri_register_objectives=calibri_register_objectives)
    config = validate({"objective": {"name": "declared.box", "options": {"dim": "3", "model_config": "b"}},
                       "optimizer": "random", "plugins": ["declared_plugin"], "budget": {"rounds": 1}})
    resolved = plan(config)
    assert resolved.space.names == ["b[0]", "b[1]", "b[2]"]
    assert resolved.recipe.options == {"dim": 3, "model_config": "b"}
    objective = resolved.recipe.build("cpu")
    assert seen[-2] == {"dim": 3, "model_config": "b", "device": "cpu"} and len(objective.space) == 3
    with pytest.raises(ConfigError, match=r"^objective\.options\.dim: must be at least 1, got 0$"):
        plan(validate({**config.model_dump(), "objective": {"name": "declared.box", "options": {"dim": 0}}}))
