"""The out-of-tree example plugin (examples/plugin-example), installed as a real package.

The package is built and installed with pip into a throwaway ``--target`` folder (no network, no
build isolation), which is put on ``PYTHONPATH``: its ``calibri`` entry point is then discovered
exactly as for a ``pip install``-ed plugin.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibri.core import ConfigError, Float, Int, OptimizerSettings, Space
from calibri.core.plugins import ENV_PLUGINS, get_registry, reset_registry

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "plugin-example"
RUN_YAML = EXAMPLE_DIR / "es-shifted-sphere.yaml"
ENTRY_POINT = "example"
MODULE = "calibri_example_plugin"
REGISTERS = {"optimizers": ["example.es"], "objectives": ["example.shifted-sphere"]}


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The example package installed into a fresh folder, as pip would install it anywhere."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the example plugin needs setuptools")
    root = tmp_path_factory.mktemp("example-plugin")
    source = root / "source"
    shutil.copytree(EXAMPLE_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = root / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    assert (site / f"{MODULE}.py").is_file()
    return site


def calibri(site: Path, *args: str, cwd: Path, plugins: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """The ``calibri`` command in a subprocess with ``site`` importable; ``plugins`` sets
    CALIBRI_PLUGINS (``None``: unset, every installed plugin loads)."""
    env = dict(os.environ)
    env.pop(ENV_PLUGINS, None)
    if plugins is not None:
        env[ENV_PLUGINS] = plugins
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "calibri.core.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_trials(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]


@pytest.fixture
def example_module(plugin_site, monkeypatch):
    """The installed plugin importable in this process, with a registry that sees its entry point."""
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.delenv(ENV_PLUGINS, raising=False)
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    reset_registry()
    module = __import__(MODULE)
    yield module
    reset_registry()
    sys.modules.pop(MODULE, None)


# -- through the command line ------------------------------------------------------------------------
def test_calibri_plugins_lists_the_plugin_and_what_it_registers(plugin_site, tmp_path):
    proc = calibri(plugin_site, "plugins", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    assert listing[ENTRY_POINT] == REGISTERS
    assert "calibri:" not in proc.stderr  # no plugin warnings
    text = calibri(plugin_site, "plugins", cwd=tmp_path)
    assert "example\n  objectives: example.shifted-sphere\n  optimizers: example.es\n" in text.stdout


@pytest.mark.parametrize(("setting", "loaded"), [
    ("", False), (ENTRY_POINT, True), ("some-other-plugin", False), (f"some-other-plugin, {ENTRY_POINT}", True)])
def test_calibri_plugins_variable_controls_loading(plugin_site, tmp_path, setting, loaded):
    proc = calibri(plugin_site, "plugins", "--json", cwd=tmp_path, plugins=setting)
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    assert (ENTRY_POINT in listing) is loaded
    assert "calibri.optimizers.random_search" in listing  # built-ins always load


def test_a_run_with_the_plugin_optimizer_works_end_to_end(plugin_site, tmp_path):
    proc = calibri(plugin_site, "run", RUN_YAML, "budget.rounds=25", "-o", "run", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "best min value" in proc.stdout and "200 evaluations, 0 failed" in proc.stdout
    run_dir = tmp_path / "run"
    trials = read_trials(run_dir)
    assert len(trials) == 200
    assert trials[0]["params"] == {f"x[{i}]": -3.0 for i in range(5)}  # x0 first
    assert trials[0]["value"] == pytest.approx(5 * 16.0)
    best = json.loads((run_dir / "best.json").read_text())
    assert best["finished"] and best["best"]["value"] < 0.5
    assert best["recommendation"] == best["best"]["params"]  # the ES recommends its parent
    assert "example.es" in (run_dir / "config.yaml").read_text()


def test_resuming_a_plugin_run_continues_exactly(plugin_site, tmp_path):
    """Checkpoints pickle the ES's state; a resumed run matches an uninterrupted one."""
    straight = calibri(plugin_site, "run", RUN_YAML, "budget.rounds=12", "-o", "straight", "--quiet", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    short = calibri(plugin_site, "run", RUN_YAML, "budget.rounds=5", "-o", "resumed", "--quiet", cwd=tmp_path)
    assert short.returncode == 0, short.stderr
    resumed = calibri(plugin_site, "resume", "resumed", "--rounds", "12", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    strip = [{k: t[k] for k in ("round", "candidate", "params", "value")} for t in read_trials(tmp_path / "straight")]
    again = [{k: t[k] for k in ("round", "candidate", "params", "value")} for t in read_trials(tmp_path / "resumed")]
    assert again == strip and len(again) == 12 * 8


def test_the_plugin_objective_loads_in_worker_processes(plugin_site, tmp_path):
    proc = calibri(plugin_site, "run", RUN_YAML, "budget.rounds=3", "optimizer={name: random, popsize: 8}",
                   "executor.name=process", "executor.workers=2", "-o", "workers", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [t["status"] for t in read_trials(tmp_path / "workers")] == ["ok"] * 24


def test_the_plugin_optimizer_works_on_a_builtin_objective(plugin_site, tmp_path):
    proc = calibri(plugin_site, "run", EXAMPLE_DIR.parent / "rosenbrock.yaml", "optimizer.name=example.es",
                   "budget.rounds=10", "-o", "rosen", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    trials = read_trials(tmp_path / "rosen")
    assert trials[0]["params"] == {f"x[{i}]": 3.0 for i in range(10)}
    assert min(t["value"] for t in trials) < trials[0]["value"]


def test_with_the_plugin_disabled_its_names_are_config_errors(plugin_site, tmp_path):
    proc = calibri(plugin_site, "run", RUN_YAML, "-o", "off", "--quiet", cwd=tmp_path, plugins="")
    assert proc.returncode == 2
    assert proc.stderr.startswith("calibri: error: objective.name: unknown objective 'example.shifted-sphere' "
                                  "(available: ")
    assert not (tmp_path / "off").exists()


# -- in this process ---------------------------------------------------------------------------------
def test_the_entry_point_is_discovered_in_process(example_module, monkeypatch):
    registry = get_registry()
    assert registry.plugins()[ENTRY_POINT] == REGISTERS
    optimizer = registry.get("optimizers", "example.es")
    assert optimizer.plugin == ENTRY_POINT
    assert optimizer.factory is example_module.OnePlusLambdaES
    assert set(optimizer.extras["kinds"]) == {"float", "int"}
    objective = registry.get("objectives", "example.shifted-sphere")
    assert objective.plugin == ENTRY_POINT
    assert objective.extras["space"](dim=2).names == ["x[0]", "x[1]"]
    monkeypatch.setenv(ENV_PLUGINS, "")
    reset_registry()
    assert ENTRY_POINT not in get_registry().plugins()
    monkeypatch.setenv(ENV_PLUGINS, ENTRY_POINT)
    reset_registry()
    assert get_registry().get("optimizers", "example.es").plugin == ENTRY_POINT


def mixed_space() -> Space:
    return Space([Float("lr", 1e-4, 1.0, init=3e-3, log=True), Int("layers", 1, 8, init=4),
                  Float("x", -1.0, 1.0, init=0.3, sigma=0.2)])


def loss(params: dict) -> float:
    return (np.log10(params["lr"]) + 2) ** 2 + 0.1 * (params["layers"] - 3) ** 2 + (params["x"] - 0.5) ** 2


def drive(optimizer, rounds: int, n: int = 6, fail_every: int = 0) -> list[list[dict]]:
    history = []
    for _ in range(rounds):
        asked = optimizer.ask(n)
        losses = [None if fail_every and i % fail_every == fail_every - 1 else loss(p) for i, p in enumerate(asked)]
        optimizer.tell(asked, losses)
        history.append(asked)
    return history


def test_the_es_asks_x0_first_and_stays_in_bounds(example_module):
    space = mixed_space()
    es = example_module.OnePlusLambdaES(space, OptimizerSettings(seed=0, popsize=6))
    first = es.ask(6)
    assert first[0] == space.init_params()
    assert es.recommend() == space.init_params()
    es.tell(first, [loss(p) for p in first])
    for batch in [first, *drive(es, 20)]:
        for params in batch:
            space.validate(params)
    assert isinstance(es.ask(3)[1]["layers"], int)


def test_the_es_is_deterministic_and_restores_bit_identically(example_module):
    space = mixed_space()
    make = lambda seed: example_module.OnePlusLambdaES(space, OptimizerSettings(seed=seed, popsize=6))  # noqa: E731
    assert drive(make(5), 8) == drive(make(5), 8)
    assert drive(make(5), 3) != drive(make(6), 3)

    original = make(7)
    drive(original, 4, fail_every=4)
    saved = pickle.loads(pickle.dumps(original.state_dict()))
    pending = original.ask(6)  # state taken mid-round too
    saved_mid = pickle.loads(pickle.dumps(original.state_dict()))
    restored, restored_mid = make(0), make(0)
    restored.load_state_dict(saved)
    restored_mid.load_state_dict(saved_mid)
    assert restored.ask(6) == pending
    original.tell(pending, [loss(p) for p in pending])
    restored.tell(pending, [loss(p) for p in pending])
    restored_mid.tell(pending, [loss(p) for p in pending])
    assert drive(original, 5) == drive(restored, 5) == drive(restored_mid, 5)
    assert original.recommend() == restored.recommend()


def test_the_es_improves_and_adapts_its_step_size(example_module):
    space = Space(Float(f"x[{i}]", -5.0, 5.0, init=3.0) for i in range(4))
    es = example_module.OnePlusLambdaES(space, OptimizerSettings(seed=0, popsize=8, sigma=1.0))

    def sphere(params):
        return float(sum(v * v for v in params.values()))

    for _ in range(80):
        asked = es.ask(es.popsize)
        es.tell(asked, [sphere(p) for p in asked])
    assert sphere(es.recommend()) < 1e-4 * sphere(space.init_params())
    assert es.state_dict()["scale"] < 0.05  # steps shrank as the parent neared the optimum


def test_the_es_handles_failures_and_partial_rounds(example_module):
    space = mixed_space()
    es = example_module.OnePlusLambdaES(space, OptimizerSettings(seed=1, popsize=6))
    asked = es.ask(6)
    es.tell(asked, [None] * 6)  # x0 failed too: no parent loss yet
    assert es.recommend() == space.init_params()
    asked = es.ask(6)
    es.tell(asked, [None, 2.0, None, 1.0, None, 3.0])
    assert es.recommend() == asked[3]
    asked = es.ask(2)  # the last round of an evaluations budget
    es.tell(asked, [0.5, 9.0])
    assert es.recommend() == asked[0]
    assert es.ask(0) == []
    with pytest.raises(ValueError, match="asked"):
        es.tell(es.ask(3), [1.0, 2.0])


def test_the_es_rejects_bad_options(example_module):
    with pytest.raises(ConfigError, match="target_success"):
        example_module.OnePlusLambdaES(mixed_space(), OptimizerSettings(), target_success=1.5)
    with pytest.raises(ConfigError, match="damping"):
        example_module.OnePlusLambdaES(mixed_space(), OptimizerSettings(), damping=0.0)


def test_the_plugins_own_test_suite_passes(plugin_site):
    """The example ships its own tests (contract suite included); they pass from a copy of it."""
    pytest.importorskip("calibri.core.testing.optimizer_contract")
    source = plugin_site.parent / "source"
    env = {key: value for key, value in os.environ.items() if key != ENV_PLUGINS}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "test_calibri_example_plugin.py"], cwd=source, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_the_es_passes_the_optimizer_contract_suite(example_module):
    contract = pytest.importorskip("calibri.core.testing.optimizer_contract")
    results = contract.check_optimizer_contract(example_module.OnePlusLambdaES)
    assert results and all(outcome == "passed" for outcome in results.values()), results
    results = contract.check_optimizer_contract("example.es", options={"target_success": 0.3, "damping": 2.0})
    assert all(outcome == "passed" for outcome in results.values()), results
