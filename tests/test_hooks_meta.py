"""Meta-tests: every hook is documented in docs/plugins.md and exercised by a test here.

Adding a hookspec to ``calibri.core.hookspecs`` makes these tests fail until the hook has a
``## <hook>(register)`` section with a working example in docs/plugins.md, a registry kind, an
implementation in ``plugin_fixtures`` and a test below decorated with ``@exercises(<hook>)``.
"""
from __future__ import annotations

import inspect
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import plugin_fixtures
from calibri.core import hookspecs
from calibri.core.callbacks import RoundRecord, RunInfo
from calibri.core.executor import Executor, ObjectiveRecipe
from calibri.core.objective import Objective, RoundContext
from calibri.core.optimizer import Optimizer, OptimizerSettings
from calibri.core.plugins import KINDS, Registry, add_plugin_modules, build_manager, get_registry, reset_registry
from calibri.core.space import Space

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
HOOK_PREFIX = "calibri_register_"

#: Every hookspec, by name.
HOOKS: list[str] = sorted(
    name for name, value in vars(hookspecs).items()
    if name.startswith("calibri_") and callable(value) and hasattr(value, "calibri_spec"))

#: Hook name → the tests exercising it (filled by :func:`exercises` when this module is imported).
EXERCISED: dict[str, list[str]] = {}


def exercises(hook: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Mark a test as exercising ``hook`` (checked by :func:`test_every_hook_is_exercised`)."""

    def mark(test: Callable[..., None]) -> Callable[..., None]:
        EXERCISED.setdefault(hook, []).append(test.__name__)
        return test

    return mark


def kind_of(hook: str) -> str:
    return hook.removeprefix(HOOK_PREFIX)


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    monkeypatch.setenv("CALIBRI_PLUGINS", "")
    plugin_fixtures.EVENTS.clear()
    reset_registry()
    yield
    reset_registry()
    plugin_fixtures.EVENTS.clear()


@pytest.fixture
def registry() -> Registry:
    return add_plugin_modules("plugin_fixtures")


def doc_sections() -> dict[str, str]:
    """``## heading`` → the section's text, from docs/plugins.md."""
    text = DOCS.read_text(encoding="utf-8")
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {heading.strip(): body for heading, body in zip(parts[1::2], parts[2::2])}


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)


# -- the meta-tests ----------------------------------------------------------------------------------
def test_hookspecs_are_found():
    assert len(HOOKS) >= 8
    assert "calibri_register_optimizers" in HOOKS and "calibri_register_commands" in HOOKS


def test_every_hook_has_a_registry_kind():
    assert sorted(f"{HOOK_PREFIX}{kind}" for kind in KINDS) == HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_takes_register_only(hook):
    assert list(inspect.signature(getattr(hookspecs, hook)).parameters) == ["register"]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    sections = doc_sections()
    assert f"{hook}(register)" in sections, f"docs/plugins.md has no '## {hook}(register)' section"
    body = sections[f"{hook}(register)"]
    assert re.search(r"```python\nregister\(", body), f"the {hook} section does not show register()'s signature"


def test_no_documented_hook_is_missing_from_hookspecs():
    documented = {heading.split("(")[0] for heading in doc_sections() if heading.startswith(HOOK_PREFIX)}
    assert documented == set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_exercised(hook):
    assert EXERCISED.get(hook), f"no test in {__name__} is decorated with @exercises({hook!r})"
    module = sys.modules[__name__]
    for name in EXERCISED[hook]:
        assert name.startswith("test_") and callable(getattr(module, name, None))


@pytest.mark.parametrize("hook", HOOKS)
def test_the_fixture_plugin_implements_every_hook(hook):
    assert hasattr(getattr(plugin_fixtures, hook, None), "calibri_impl")
    assert plugin_fixtures.REGISTERED.get(kind_of(hook)), f"plugin_fixtures.REGISTERED lacks {kind_of(hook)!r}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_registers_from_a_plugin_object(hook):
    """A plugin object (a class with a @hookimpl method) registers under the hook's kind."""
    kind = kind_of(hook)
    if kind == "commands":
        import click

        thing = click.Command("meta-command", callback=lambda: None)

        def implementation(register):
            register(thing)
        name = "meta-command"
    else:
        def thing(**options):
            """A thing registered by the meta-test plugin."""
        name = f"meta.{kind}"

        def implementation(register):
            register(name, thing, description=f"meta {kind}")

    implementation.__name__ = hook
    plugin = type("MetaPlugin", (), {hook: staticmethod(hookspecs.hookimpl(implementation))})
    manager = build_manager(load_entry_points=False)
    manager.register(plugin, name="meta-plugin")
    registration = Registry(manager).get(kind, name)
    assert registration.factory is thing
    assert registration.plugin == "meta-plugin"
    assert registration.kind == kind
    assert Registry(manager).plugins()["meta-plugin"] == {kind: [name]}


@pytest.mark.parametrize("hook", HOOKS)
def test_every_documented_example_plugin_registers_and_works(hook, tmp_path, monkeypatch):
    """The first python block of a hook's section containing @hookimpl is a working plugin."""
    kind = kind_of(hook)
    sources = [code for code in code_blocks(doc_sections()[f"{hook}(register)"], "python") if "@hookimpl" in code]
    assert sources, f"the {hook} section has no example plugin (a python block using @hookimpl)"
    module = types.ModuleType(f"docs_example_{kind}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(sources[0], f"docs/plugins.md:{hook}", "exec"), module.__dict__)
    manager = build_manager(load_entry_points=False)
    manager.register(module, name=module.__name__)
    registry = Registry(manager)
    mine = registry.plugins().get(module.__name__, {})
    assert set(mine) == {kind} and mine[kind], f"the {hook} example registers nothing under {kind}"
    registration = registry.get(kind, mine[kind][0])
    monkeypatch.chdir(tmp_path)
    DOC_EXAMPLE_CHECKS.get(kind, lambda registration: None)(registration)


# -- what a registered thing must do, per kind (used for the docs' examples) -------------------------
def _check_optimizer(registration, contract: bool = True):
    """Builds, asks x0 first, restores from its state; with ``contract``, the optimizer contract suite."""
    space = plugin_fixtures.fixture_space(3)
    optimizer = registration.factory(space, OptimizerSettings(seed=1, popsize=5))
    assert isinstance(optimizer, Optimizer)
    asked = optimizer.ask(5)
    assert asked[0] == space.init_params() and len(asked) == 5
    for params in asked:
        space.validate(params)
    state = optimizer.state_dict()
    optimizer.tell(asked, [float(i) for i in range(5)])
    clone = registration.factory(space, OptimizerSettings(seed=1, popsize=5))
    clone.load_state_dict(state)
    clone.tell(asked, [float(i) for i in range(5)])
    assert clone.ask(5) == optimizer.ask(5)
    space.validate(optimizer.recommend())
    if contract:
        suite = pytest.importorskip("calibri.core.testing.optimizer_contract")
        results = suite.check_optimizer_contract(registration.factory)
        assert all(outcome == "passed" for outcome in results.values()), results


def _check_objective(registration):
    objective = registration.factory()
    assert isinstance(objective, Objective)
    space = objective.space or registration.extras["space"]()
    provider = registration.extras.get("space")
    if provider is not None:
        assert provider() == space
    values = objective.evaluate([space.init_params()], RoundContext(round=0, seed=0))
    assert len(values) == 1


def _check_space(registration):
    space = registration.factory()
    assert isinstance(space, Space) and len(space) >= 1


def _check_executor(registration):
    recipe = ObjectiveRecipe("sphere", {"dim": 2})
    with registration.factory(recipe, workers=2, devices=None) as executor:
        assert isinstance(executor, Executor)
        info = executor.describe()
        candidates = [{"x[0]": float(i), "x[1]": 0.0} for i in range(5)]
        results = executor.evaluate(candidates, RoundContext(round=0, seed=0))
        assert [r.value for r in results] == [float(i * i) for i in range(5)]
        assert executor.evaluate([], RoundContext(round=1, seed=0)) == []
        assert info.direction == "minimize" and info.space is not None


def _check_reward(registration):
    reward = registration.factory()
    scores = reward([np.full((4, 4, 3), 255, dtype=np.uint8), np.zeros((4, 4, 3), dtype=np.uint8)], ["a", "b"])
    assert [float(s) for s in scores] == [1.0, 0.0]


def _check_callback(registration):
    callback = registration.factory()
    for method, argument in (("on_run_start", RunInfo(".", "minimize", 0, 2, None, False)),
                             ("on_round_end", RoundRecord(0, 4, 0, 1.0, 1.0, 0.1)),
                             ("on_run_end", {"rounds": 1, "best": None})):
        handler = getattr(callback, method, None)
        if handler is not None:
            handler(argument)


def _check_command(registration):
    result = CliRunner().invoke(registration.factory, [])
    assert result.exit_code == 0, result.output


def _check_architecture(registration):
    """The documented adapter calibrates a real (tiny) DiTTransformer2DModel: identity is exact,
    every site acts, baking matches the hooks."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from calibri.plugins.dit.calibration import Calibrator

    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                            sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                            norm_num_groups=4).eval()
    adapter = registration.factory()
    assert adapter.matches(model)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([3]), class_labels=torch.tensor([1]),
                  return_dict=False)
    with torch.no_grad():
        reference = model(**inputs)[0]
        calibrator = Calibrator(model, "gate", adapter=adapter).attach()
        assert torch.equal(model(**inputs)[0], reference)
        assert len(calibrator.sites) == 4
        for name in calibrator.site_names:
            calibrator.reset()
            calibrator.set_values({name: 0.5})
            assert not torch.equal(model(**inputs)[0], reference), f"site {name} does not act"
        calibrator.set_values({name: 0.7 for name in calibrator.site_names})
        hooked = model(**inputs)[0]
        calibrator.bake()
        assert torch.allclose(model(**inputs)[0], hooked, rtol=1e-5, atol=1e-6)
        calibrator.detach()
        assert torch.equal(model(**inputs)[0], reference)


def _check_prompt_source(registration):
    """The documented loader reads a file in the working directory; a missing one is a ConfigError."""
    from calibri.core.errors import ConfigError
    from calibri.plugins.dit.prompts import PromptSet

    Path("prompts.csv").write_text("prompt,style\na red kite,photo\na blue boat,sketch\n", encoding="utf-8")
    prompts = registration.factory("prompts.csv", "objective.options.prompts")
    assert isinstance(prompts, PromptSet)
    assert prompts.prompts == ("a red kite", "a blue boat")
    assert [dict(m) for m in prompts.metadata] == [{"style": "photo"}, {"style": "sketch"}]
    with pytest.raises(ConfigError) as caught:
        registration.factory("missing.csv", "objective.options.prompts")
    assert caught.value.field == "objective.options.prompts"


def _check_pipeline_family(registration):
    """The documented family is for a diffusers pipeline, and every argument it sets is one of
    that pipeline's ``__call__``."""
    diffusers = pytest.importorskip("diffusers")
    from calibri.plugins.dit.family import Family

    family = registration.factory
    assert isinstance(family, Family) and callable(family.encode)
    parameters = set(inspect.signature(getattr(diffusers, registration.name).__call__).parameters)
    assert set(family.arguments) <= parameters, set(family.arguments) - parameters
    assert set(family.masks) <= set(family.negatives) | set(family.negatives.values())


DOC_EXAMPLE_CHECKS = {
    "optimizers": _check_optimizer, "objectives": _check_objective, "spaces": _check_space,
    "executors": _check_executor, "rewards": _check_reward, "architectures": _check_architecture,
    "callbacks": _check_callback, "prompt_sources": _check_prompt_source,
    "pipeline_families": _check_pipeline_family, "commands": _check_command,
}


# -- one test per hook, through the fixture plugin ---------------------------------------------------
def _registered(registry: Registry, kind: str) -> list:
    registrations = [registry.get(kind, name) for name in plugin_fixtures.REGISTERED[kind]]
    for registration in registrations:
        assert registration.plugin == plugin_fixtures.PLUGIN_NAME
        assert registration.kind == kind
    return registrations


@exercises("calibri_register_optimizers")
def test_optimizers_hook(registry):
    (registration,) = _registered(registry, "optimizers")
    assert registration.factory is plugin_fixtures.FixtureOptimizer
    assert set(registration.extras["kinds"]) == {"float", "int"}
    _check_optimizer(registration, contract=False)  # a uniform sampler: no σ, no progress guarantee


@exercises("calibri_register_objectives")
def test_objectives_hook(registry):
    (registration,) = _registered(registry, "objectives")
    assert registration.factory is plugin_fixtures.FixtureObjective
    assert registration.extras["space"](dim=3) == plugin_fixtures.fixture_space(3)
    stream = registration.extras["stream"](seed=0, dim=3)
    assert stream.next_round(0) == {"offset": 0.0, "round": 0}
    objective = ObjectiveRecipe("fixture.objective", {"dim": 3}, ("plugin_fixtures",)).build()
    assert isinstance(objective, plugin_fixtures.FixtureObjective) and len(objective.space) == 3


@exercises("calibri_register_spaces")
def test_spaces_hook(registry):
    from calibri.core.config import validate
    from calibri.core.run import plan

    (registration,) = _registered(registry, "spaces")
    assert registration.factory(dim=4).names == [f"x[{i}]" for i in range(4)]
    config = validate({"objective": {"name": "python", "options": {"function": "plugin_fixtures:squared_norm"}},
                       "space": {"name": "fixture.space", "options": {"dim": 3, "half_width": 2.0}},
                       "optimizer": "random", "plugins": ["plugin_fixtures"], "budget": {"rounds": 1}})
    assert plan(config).space == plugin_fixtures.fixture_space(3, 2.0)


@exercises("calibri_register_executors")
def test_executors_hook(registry):
    (registration,) = _registered(registry, "executors")
    assert registration.factory is plugin_fixtures.FixtureExecutor
    _check_executor(registration)


@exercises("calibri_register_rewards")
def test_rewards_hook(registry):
    (registration,) = _registered(registry, "rewards")
    assert registration.description == "Scores every image by its mean pixel value in [0, 1]."
    _check_reward(registration)


@exercises("calibri_register_architectures")
def test_architectures_hook(registry):
    (registration,) = _registered(registry, "architectures")
    assert registration.description == "toy adapter"
    model = type("FixtureModel", (), {"blocks": ("a", "b")})()
    adapter = registration.factory()
    assert adapter.matches(model)
    assert [gate.gate_name for gate in adapter.gates(model)] == ["block.0", "block.1"]


@exercises("calibri_register_callbacks")
def test_callbacks_hook(registry):
    (registration,) = _registered(registry, "callbacks")
    callback = registration.factory(label="x")
    callback.on_round_end(RoundRecord(3, 12, 0, 1.0, 0.5, 0.1))
    assert plugin_fixtures.EVENTS == [("callback", ("round", "x", 3))]


@exercises("calibri_register_prompt_sources")
def test_prompt_sources_hook(registry, tmp_path, monkeypatch):
    """A registered scheme loads through load_prompts; files win over schemes; errors name the field."""
    from calibri.core.errors import ConfigError
    from calibri.plugins.dit.prompts import load_prompts

    (registration,) = _registered(registry, "prompt_sources")
    assert registration.factory is plugin_fixtures.fixture_prompt_source
    field = "objective.options.prompts"
    prompts = load_prompts("fixture.prompts:3", field)
    assert prompts.prompts == ("fixture prompt 0", "fixture prompt 1", "fixture prompt 2")
    assert [dict(m) for m in prompts.metadata] == [{"index": 0}, {"index": 1}, {"index": 2}]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fixture.prompts:3").write_text("a file wins\n", encoding="utf-8")
    assert load_prompts("fixture.prompts:3", field).prompts == ("a file wins",)
    for spec, message in (("fixture.prompts:x", "ValueError: expected a count"),
                          ("fixture.prompts:0", "holds no prompts"),
                          ("unknown.scheme:3", "no such prompt file")):
        with pytest.raises(ConfigError) as caught:
            load_prompts(spec, field)
        assert caught.value.field == field and message in caught.value.message, caught.value.message
        assert "\n" not in str(caught.value)


@exercises("calibri_register_pipeline_families")
def test_pipeline_families_hook(registry):
    """A registered family is found by the pipeline's class name or a base's, encodes the
    negative prompt under the negative names, and an unknown pipeline names the hook."""
    from calibri.plugins.dit.family import UnknownPipeline, family_of

    (registration,) = _registered(registry, "pipeline_families")
    assert registration.factory is plugin_fixtures.FIXTURE_FAMILY and registration.description == "fixture family"
    derived = type("DerivedPipeline", (plugin_fixtures.FixturePipeline,), {})
    assert family_of(plugin_fixtures.FixturePipeline()) is family_of(derived()) is plugin_fixtures.FIXTURE_FAMILY
    negative = registration.factory.encode_the_negative(None, "none", "cpu")
    assert list(negative) == ["negative_prompt_embeds"] and negative["negative_prompt_embeds"].shape == (1, 4, 2)
    assert "SanaPipeline" in registry.names("pipeline_families")  # the built-ins register through the same hook
    with pytest.raises(UnknownPipeline) as caught:
        family_of(object())
    message = str(caught.value)
    assert "calibri_register_pipeline_families" in message and "FixturePipeline" in message and "\n" not in message


@exercises("calibri_register_commands")
def test_commands_hook(registry):
    from calibri.core.cli import build_cli

    (registration,) = _registered(registry, "commands")
    assert registration.factory is plugin_fixtures.fixture_hello
    assert registration.description == "Say hello from the fixture plugin."
    cli = build_cli()
    assert "fixture-hello" in cli.commands
    result = CliRunner().invoke(cli, ["fixture-hello", "tests"])
    assert result.exit_code == 0, result.output
    assert result.output == "hello tests from plugin_fixtures\n"
    listing = CliRunner().invoke(cli, ["--help"])
    assert "fixture-hello" in listing.output and "Say hello from the fixture plugin." in listing.output


@exercises("calibri_register_optimizers")
@exercises("calibri_register_objectives")
@exercises("calibri_register_spaces")
@exercises("calibri_register_executors")
@exercises("calibri_register_callbacks")
def test_a_run_uses_what_the_hooks_registered(tmp_path):
    """One run whose every plugin comes from the fixture plugin, resumed once."""
    from calibri.core.config import validate
    from calibri.core.run import resume_run, start_run

    config = validate({
        "seed": 3,
        "objective": {"name": "fixture.objective", "options": {"dim": 3}},
        "space": {"name": "fixture.space", "options": {"dim": 3}},
        "optimizer": {"name": "fixture.optimizer", "popsize": 4, "options": {"shrink": 0.5}},
        "executor": {"name": "fixture.executor", "options": {"tag": "mine"}},
        "callbacks": [{"name": "fixture.callback", "options": {"label": "cb"}}],
        "plugins": ["plugin_fixtures"],
        "budget": {"rounds": 3},
    })
    summary = start_run(config, tmp_path / "run")
    assert summary["rounds"] == 3 and summary["evaluations"] == 12
    events = plugin_fixtures.EVENTS
    assert [e for e in events if e[0] == "callback"] == [
        ("callback", ("start", "cb", 0)), ("callback", ("round", "cb", 0)), ("callback", ("round", "cb", 1)),
        ("callback", ("round", "cb", 2)), ("callback", ("end", "cb", 3))]
    assert [e for e in events if e[0] == "executor"] == [("executor", ("mine", 4))] * 3
    assert [e for e in events if e[0] == "stream"] == [("stream", 0), ("stream", 1), ("stream", 2)]
    # x0 first: the fixture space's initial point, 0.5 in every dimension.
    assert summary["best"]["value"] <= 3 * 0.25
    events.clear()
    reset_registry()
    resumed = resume_run(tmp_path / "run", {"rounds": 4})
    assert resumed["rounds"] == 4 and resumed["evaluations"] == 16
    assert ("callback", ("start", "cb", 3)) in events
