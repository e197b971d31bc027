"""Malformed configs and command lines, run through the real ``calibri`` CLI in a subprocess.

Every user mistake must end the same way: exit status 2, exactly one line on stderr starting with
``calibri: error:`` that names the offending field (dotted path) or file, no traceback, and nothing
written to the run directory (or an existing run left byte-identical).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from calibri.core.config import RunConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

#: A valid run that takes a fraction of a second.
BASE = """\
objective: {name: sphere, options: {dim: 2}}
optimizer: random
budget: {rounds: 1}
"""

#: A run over a user-defined space; append one ``  name: {...}`` line per dimension.
SPACE_BASE = """\
objective: {name: python, options: {function: "calibri.plugins.analytic.examples:mixed_objective"}}
optimizer: random
budget: {rounds: 1}
space:
"""


def python_run(function: str, space: str = "  x: {low: 0, high: 1}\n") -> str:
    """SPACE_BASE with another ``module:function`` and one dimension."""
    return SPACE_BASE.replace("calibri.plugins.analytic.examples:mixed_objective", function) + space


MISSING = "<no file at the config path>"
DIRECTORY = "<a directory at the config path>"


def calibri(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CALIBRI_PLUGINS="")
    env.pop("COLUMNS", None)
    return subprocess.run([sys.executable, "-m", "calibri.core.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a rejected command, after checking the common contract."""
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == 2, output
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and proc.stderr.endswith("\n"), f"expected one stderr line, got:\n{proc.stderr}"
    assert lines[0].startswith("calibri: error: "), lines[0]
    assert proc.stdout == "", proc.stdout
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder (None) under ``root``."""
    return {path.relative_to(root).as_posix(): (path.read_bytes() if path.is_file() else None)
            for path in sorted(root.rglob("*"))}


# (config text, overrides, substrings the error line must contain — the first names the field or file)
CASES = [
    # -- the file itself ---------------------------------------------------------------------
    pytest.param(MISSING, [], "run.yaml: no such file", id="missing-file"),
    pytest.param(DIRECTORY, [], "run.yaml: is a directory, expected a YAML file", id="directory"),
    pytest.param("", [], "run.yaml: the file is empty", id="empty-file"),
    pytest.param("# nothing but a comment\n", [], "run.yaml: the file is empty", id="comment-only"),
    pytest.param("objective: {name: sphere\noptimizer: random\n", [],
                 ("run.yaml: invalid YAML at line 2", "expected ',' or '}'"), id="yaml-syntax"),
    pytest.param("objective: sphere\n\tbudget: 1\n", [], "run.yaml: invalid YAML at line 2", id="yaml-tab"),
    pytest.param("- objective\n- optimizer\n", [],
                 "run.yaml: expected a mapping at the top level, got list", id="top-level-list"),
    pytest.param("42\n", [], "run.yaml: expected a mapping at the top level, got int", id="top-level-scalar"),
    # -- schema -------------------------------------------------------------------------------
    pytest.param(BASE + "colour: red\n", [], ("colour: unknown key", "known: name, seed, objective"),
                 id="unknown-top-level-key"),
    pytest.param(BASE.replace("optimizer: random", "optimizer: {name: random, popsze: 4}"), [],
                 "optimizer.popsze: unknown key", id="unknown-nested-key"),
    pytest.param(BASE.replace("{rounds: 1}", "{rounds: 1, round: 2}"), [], "budget.round: unknown key",
                 id="unknown-budget-key"),
    pytest.param(BASE, ["optimizer.popsize=abc"], ("optimizer.popsize: Input should be a valid integer", "'abc'"),
                 id="popsize-not-int"),
    pytest.param(BASE, ["optimizer.popsize=0"], "optimizer.popsize: Input should be greater than or equal to 1",
                 id="popsize-zero"),
    pytest.param(BASE, ["seed=-1"], ("seed: Input should be greater than or equal to 0", "(got -1)"),
                 id="seed-negative"),
    pytest.param(BASE, ["seed=true"], "seed: ", id="seed-bool"),
    pytest.param(BASE, ["optimizer.sigma=0"], ("optimizer.sigma: Input should be greater than 0", "(got 0)"),
                 id="sigma-zero"),
    pytest.param(BASE.replace("objective: {name: sphere, options: {dim: 2}}\n", ""), [],
                 "objective: Field required", id="missing-objective"),
    pytest.param(BASE.replace("optimizer: random\n", ""), [], "optimizer: Field required", id="missing-optimizer"),
    pytest.param(BASE.replace("budget: {rounds: 1}\n", ""), [], "budget: Field required", id="missing-budget"),
    pytest.param(BASE.replace("{rounds: 1}", "{}"), [],
                 "budget: give at least one of rounds, evaluations, seconds", id="empty-budget"),
    pytest.param(BASE.replace("{rounds: 1}", ""), [], "budget: Input should be a valid dictionary",
                 id="null-budget"),
    pytest.param(BASE, ["budget.rounds=0"], "budget.rounds: Input should be greater than or equal to 1",
                 id="budget-rounds-zero"),
    pytest.param(BASE, ["max_failure_rate=1.5"],
                 ("max_failure_rate: Input should be less than or equal to 1", "(got 1.5)"), id="failure-rate"),
    pytest.param(BASE, ["executor.workers=0"], "executor.workers: Input should be greater than or equal to 1",
                 id="workers-zero"),
    pytest.param(BASE, ["objective.name="], "objective.name: String should have at least 1 character",
                 id="empty-objective-name"),
    # -- plugin names and options ------------------------------------------------------------
    pytest.param(BASE, ["optimizer.name=simplex"],
                 ("optimizer.name: unknown optimizer 'simplex' (available: ", "nevergrad.cma", "optuna.tpe",
                  "pycma", "random"), id="unknown-optimizer"),
    pytest.param(BASE, ["objective=sphear"],
                 ("objective.name: unknown objective 'sphear' (available: ", "rosenbrock", "sphere"),
                 id="unknown-objective"),
    pytest.param(BASE, ["executor=ray"], "executor.name: unknown executor 'ray' (available: dask, process, serial)",
                 id="unknown-executor"),
    pytest.param(BASE + "callbacks: [wandb]\n", [],
                 "callbacks.0.name: unknown callback 'wandb' (available: calibration_report, mlflow, plot, progress, tensorboard)", id="unknown-callback"),
    pytest.param(BASE + "callbacks: [progress, wandb]\n", [],
                 "callbacks.1.name: unknown callback 'wandb'", id="unknown-second-callback"),
    pytest.param(BASE, ["objective.options.dims=3"],
                 "objective.options.dims: unknown option (known: dim, high, init, low)",
                 id="unknown-objective-option"),
    pytest.param(BASE, ["objective.options.dim=many"],
                 ("objective.options.dim: Input should be a valid integer", "'many'"), id="option-wrong-type"),
    pytest.param(BASE, ["optimizer.options.restarts=2"],
                 "optimizer.options.restarts: unknown option (known: include_x0)", id="unknown-optimizer-option"),
    pytest.param(BASE, ["executor.options.threads=2"], "executor.options.threads: unknown option",
                 id="unknown-executor-option"),
    # nested backend options: found when the optimiser is built, before the first evaluation
    pytest.param(BASE, ["optimizer.name=optuna.tpe", "optimizer.options.sampler_options.n_startup=3"],
                 ("optimizer.options.sampler_options.n_startup: unknown option (known: ", "n_startup_trials"),
                 id="unknown-nested-sampler-option"),
    pytest.param(BASE, ["optimizer.name=optuna.tpe", "optimizer.options.sampler_options.n_startup_trials=abc"],
                 ("optimizer.options.sampler_options.n_startup_trials: Input should be a valid integer", "'abc'"),
                 id="nested-sampler-option-wrong-type"),
    pytest.param(BASE, ["optimizer.name=optuna.cmaes", "optimizer.options.sampler_options.restarts=2"],
                 "optimizer.options.sampler_options.restarts: unknown option", id="unknown-nested-cmaes-option"),
    pytest.param(BASE, ["optimizer.name=pycma", "optimizer.options.cma_options.popsze=3"],
                 "optimizer.options.cma_options.popsze: unknown pycma option", id="unknown-pycma-option"),
    pytest.param(BASE, ["optimizer.name=pycma", "optimizer.options.cma_options.CMA_diagonal=1"],
                 ("optimizer: 'pycma' rejects this configuration: ValueError: ", "CMA_diagonal"),
                 id="pycma-rejects-option-value"),
    pytest.param(python_run("calibri.plugins.analytic.examples:mixed_objective"),
                 ["optimizer.name=optuna.tpe", "optimizer.options.sampler_options.gama=2"],
                 "optimizer.options.sampler_options.gama: unknown option", id="nested-option-with-user-space"),
    pytest.param(BASE, ["objective.options.dim=0"], "objective.options.dim: must be at least 1",
                 id="analytic-dim-zero"),
    pytest.param(BASE, ["objective.options.low=5"], "objective.options.low: ",
                 id="analytic-low-above-high"),
    pytest.param(BASE, ["callbacks=[{name: progress, options: {colour: red}}]"],
                 "callbacks.0.options.colour: unknown option (known: leave)", id="quiet-callback-option"),
    pytest.param(BASE + "plugins: [calibri_no_such_plugin]\n", [], ("plugins.0: ", "calibri_no_such_plugin"),
                 id="plugin-module-missing"),
    # -- python objective --------------------------------------------------------------------
    pytest.param(python_run("no_such_module_xyz:f"), [],
                 "objective.options.function: cannot import module 'no_such_module_xyz'",
                 id="python-missing-module"),
    pytest.param(python_run("calibri.plugins.analytic.examples:no_such_function"), [],
                 "objective.options.function: module 'calibri.plugins.analytic.examples' has no attribute "
                 "'no_such_function'", id="python-missing-attribute"),
    pytest.param(python_run("mixed_objective"), [],
                 "objective.options.function: expected 'module:function', got 'mixed_objective'",
                 id="python-no-colon"),
    pytest.param(python_run("no_such_module_xyz:f"), ["executor={name: process, workers: 1}"],
                 "objective.options.function: cannot import module 'no_such_module_xyz'",
                 id="python-missing-module-process-executor"),
    pytest.param(SPACE_BASE.replace("space:\n", ""), [], "space: objective 'python' defines no space",
                 id="python-without-space"),
    # -- spaces -------------------------------------------------------------------------------
    pytest.param(SPACE_BASE + "  x: {low: 1, high: 1}\n", [], "space.x.low: low (1) must be below high (1)",
                 id="space-low-not-below-high"),
    pytest.param(SPACE_BASE + "  x: {type: int, low: 5, high: 2}\n", [], "space.x.low: low (5) must be below",
                 id="space-int-low-above-high"),
    pytest.param(SPACE_BASE + "  x: {low: 0, high: 1, init: 2}\n", [], "space.x.init: init 2 is outside [0, 1]",
                 id="space-init-outside"),
    pytest.param(SPACE_BASE + "  lr: {low: 0, high: 1, log: true}\n", [],
                 "space.lr.low: a log dimension needs low > 0, got 0", id="space-log-low-zero"),
    pytest.param(SPACE_BASE + "  act: {type: categorical, choices: [relu]}\n", [],
                 "space.act.choices: needs at least two choices", id="space-one-choice"),
    pytest.param(SPACE_BASE + "  act: {type: categorical, choices: [relu, tanh], init: gelu}\n", [],
                 "space.act.init: init 'gelu' is not one of ['relu', 'tanh']", id="space-choice-init"),
    pytest.param(SPACE_BASE + "  x: {type: bool}\n", [],
                 "space.x.type: unknown type 'bool' (use float, int or categorical)", id="space-unknown-type"),
    pytest.param(SPACE_BASE + "  x: {low: 0, high: 1, step: 0.1}\n", [], "space.x: unknown key 'step'",
                 id="space-unknown-key"),
    pytest.param(SPACE_BASE + "  x: {low: 0}\n", [], ("space.x: missing", "'high'"), id="space-missing-high"),
    pytest.param(SPACE_BASE + "  x: 3\n", [], "space.x: expected a mapping", id="space-entry-scalar"),
    pytest.param(SPACE_BASE + "  x: {low: .nan, high: 1}\n", [], "space.x.low: must be a finite number",
                 id="space-low-nan"),
    pytest.param(SPACE_BASE + "  x: {type: int, low: 0.5, high: 3}\n", [], "space.x.low: must be an integer",
                 id="space-int-fractional"),
    pytest.param(SPACE_BASE + "  x: {low: zero, high: 1}\n", [], ("space.x.low: ", "'zero'"),
                 id="space-low-not-a-number"),
    pytest.param(SPACE_BASE + "  x: {low: 0, high: 1, sigma: wide}\n", [], ("space.x.sigma: ", "'wide'"),
                 id="space-sigma-not-a-number"),
    pytest.param(SPACE_BASE + "  n: {type: int, low: .inf, high: 3}\n", [], "space.n.low: ",
                 id="space-int-infinite"),
    pytest.param(SPACE_BASE + "  x: {low: 0, high: 1, size: three}\n", [], ("space.x.size: ", "'three'"),
                 id="space-size-not-a-number"),
    pytest.param(SPACE_BASE + "  act: {type: categorical, choices: 3}\n", [], "space.act.choices: ",
                 id="space-choices-int"),
    pytest.param(SPACE_BASE + "  act: {type: categorical, choices: relu}\n", [], "space.act.choices: ",
                 id="space-choices-string"),
    pytest.param(SPACE_BASE + "  act: {type: categorical, choices: [relu, tanh]}\n", ["optimizer=pycma"],
                 ("space.act: optimizer 'pycma' cannot search categorical dimensions", "(it handles: float, int)"),
                 id="kinds-mismatch-pycma"),
    pytest.param(SPACE_BASE + "  act: {type: categorical, choices: [relu, tanh]}\n",
                 ["optimizer.name=nevergrad.cma"],
                 "space.act: optimizer 'nevergrad.cma' cannot search categorical dimensions",
                 id="kinds-mismatch-nevergrad"),
    pytest.param(SPACE_BASE + "  x: {low: 0, high: 1}\n", ["space.name=bogus"], "space.name: unknown space 'bogus'",
                 id="unknown-named-space"),
    # -- overrides ----------------------------------------------------------------------------
    pytest.param(BASE, ["seed"], "override 'seed': expected key.path=value", id="override-without-equals"),
    pytest.param(BASE, ["=3"], "override '=3': expected key.path=value", id="override-empty-key"),
    pytest.param(BASE, ["budget..rounds=3"], "override 'budget..rounds=3'", id="override-empty-part"),
    pytest.param("seed: 3\n" + BASE, ["seed.x=1"], "seed: is 3, not a mapping, so 'seed.x=1' cannot set inside it",
                 id="override-into-scalar"),
    pytest.param(BASE, ["budget=5"], "budget: Input should be a valid dictionary", id="override-section-scalar"),
]


@pytest.mark.parametrize("text, overrides, expected", CASES)
def test_malformed_config_is_one_line_exit_2(tmp_path: Path, text: str, overrides: list[str],
                                             expected: str | tuple[str, ...]) -> None:
    cfg = tmp_path / "run.yaml"
    if text == DIRECTORY:
        cfg.mkdir()
    elif text != MISSING:
        cfg.write_text(textwrap.dedent(text), encoding="utf-8")
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    line = error_line(calibri("run", str(cfg), "-o", str(out), "--quiet", *overrides, cwd=tmp_path))
    for part in (expected,) if isinstance(expected, str) else expected:
        assert part in line
    assert not out.exists(), snapshot(out)
    assert snapshot(tmp_path) == before  # nothing written anywhere (no default runs/ folder either)


# -- exact wording of a few messages -----------------------------------------------------------
EXACT = [
    pytest.param(BASE, ["optimizer.popsize=abc"],
                 "calibri: error: optimizer.popsize: Input should be a valid integer, unable to parse string as "
                 "an integer (got 'abc')", id="popsize"),
    pytest.param(BASE + "colour: red\n", [],
                 f"calibri: error: colour: unknown key (known: {', '.join(RunConfig.model_fields)})",
                 id="unknown-key"),
    pytest.param(BASE.replace("{rounds: 1}", "{}"), [],
                 "calibri: error: budget: give at least one of rounds, evaluations, seconds", id="empty-budget"),
    pytest.param("objective: {name: sphere\noptimizer: random\n", [],
                 "calibri: error: {cfg}: invalid YAML at line 2, column 10: expected ',' or '}}', but got ':'",
                 id="yaml"),
    pytest.param(MISSING, [], "calibri: error: {cfg}: no such file", id="missing-file"),
    pytest.param(SPACE_BASE + "  x: {low: 1, high: 1}\n", [],
                 "calibri: error: space.x.low: low (1) must be below high (1)", id="space-bounds"),
    pytest.param("seed: 3\n" + BASE, ["seed.x=1"],
                 "calibri: error: seed: is 3, not a mapping, so 'seed.x=1' cannot set inside it", id="override"),
    pytest.param(BASE, ["executor=ray"],
                 "calibri: error: executor.name: unknown executor 'ray' (available: dask, process, serial)",
                 id="executor"),
    pytest.param(SPACE_BASE + "  act: {type: categorical, choices: [relu, tanh]}\n", ["optimizer=pycma"],
                 "calibri: error: space.act: optimizer 'pycma' cannot search categorical dimensions "
                 "(it handles: float, int)", id="kinds"),
]


@pytest.mark.parametrize("text, overrides, expected", EXACT)
def test_error_messages_read_well(tmp_path: Path, text: str, overrides: list[str], expected: str) -> None:
    cfg = tmp_path / "run.yaml"
    if text != MISSING:
        cfg.write_text(text, encoding="utf-8")
    proc = calibri("run", str(cfg), "-o", str(tmp_path / "out"), "--quiet", *overrides, cwd=tmp_path)
    assert error_line(proc) == expected.format(cfg=cfg)


# -- run directories ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    (root / "run.yaml").write_text(BASE, encoding="utf-8")
    proc = calibri("run", "run.yaml", "-o", "out", "--quiet", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "out"


@pytest.fixture
def existing_run(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    return out


def test_run_into_existing_run_dir_needs_overwrite(existing_run: Path, tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(BASE, encoding="utf-8")
    before = snapshot(existing_run)
    assert before.get("config.yaml") and before.get("trials.jsonl") and before.get("best.json")
    line = error_line(calibri("run", "run.yaml", "-o", "out", "--quiet", cwd=tmp_path))
    assert line == "calibri: error: out: holds a finished run; pass --overwrite to replace it"
    assert snapshot(existing_run) == before


@pytest.mark.parametrize("text, overrides, expected", [
    pytest.param(BASE, ["optimizer.popsize=abc"], "optimizer.popsize: ", id="bad-popsize"),
    pytest.param(BASE, ["optimizer=simplex"], "optimizer.name: unknown optimizer", id="unknown-optimizer"),
    pytest.param(SPACE_BASE + "  x: {low: 0, high: 1, init: 5}\n", [], "space.x.init: ", id="bad-space"),
    pytest.param(python_run("calibri.plugins.analytic.examples:no_such_function"), [],
                 "objective.options.function: ", id="python-bad-function"),
])
def test_rejected_config_with_overwrite_keeps_existing_run(existing_run: Path, tmp_path: Path, text: str,
                                                           overrides: list[str], expected: str) -> None:
    (tmp_path / "run.yaml").write_text(text, encoding="utf-8")
    before = snapshot(existing_run)
    line = error_line(calibri("run", "run.yaml", "-o", "out", "--quiet", "--overwrite", *overrides,
                              cwd=tmp_path))
    assert expected in line
    assert snapshot(existing_run) == before


def test_output_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(BASE, encoding="utf-8")
    (tmp_path / "out").write_text("not a run\n", encoding="utf-8")
    line = error_line(calibri("run", "run.yaml", "-o", "out", "--quiet", cwd=tmp_path))
    assert line == "calibri: error: out: exists and is not a directory"
    assert (tmp_path / "out").read_text(encoding="utf-8") == "not a run\n"


def test_resume_missing_dir(tmp_path: Path) -> None:
    line = error_line(calibri("resume", "gone", cwd=tmp_path))
    assert line == "calibri: error: gone: no such run directory"
    assert not (tmp_path / "gone").exists()


def test_resume_dir_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x\n", encoding="utf-8")
    before = snapshot(tmp_path)
    line = error_line(calibri("resume", "notes", cwd=tmp_path))
    assert line == "calibri: error: notes: not a calibri run directory (no config.yaml)"
    assert snapshot(tmp_path) == before


def test_show_missing_dir(tmp_path: Path) -> None:
    assert error_line(calibri("show", "gone", cwd=tmp_path)) == "calibri: error: gone: no such run directory"


# -- the valid path ----------------------------------------------------------------------------
def test_valid_config_with_overrides_runs(tmp_path: Path) -> None:
    proc = calibri("run", str(EXAMPLES / "rosenbrock.yaml"), "-o", "out", "--quiet",
                   "optimizer.name=optuna.tpe", "budget.rounds=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "run directory: out" in proc.stdout
    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text(encoding="utf-8"))
    assert config["optimizer"]["name"] == "optuna.tpe"
    assert config["optimizer"]["sigma"] == 1.0  # the rest of the optimizer section is kept
    assert config["budget"] == {"rounds": 2, "evaluations": None, "seconds": None}
    assert config["objective"] == {"name": "rosenbrock", "options": {"dim": 10}}
    best = yaml.safe_load((tmp_path / "out" / "best.json").read_text(encoding="utf-8"))
    assert best["rounds"] == 2 and best["finished"] is True
