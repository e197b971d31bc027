"""The run loop: budgets, what trials.jsonl / config.yaml / best.json hold, failures."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from calibri.core.config import load_config
from calibri.core.run import round_seed

TRIAL_FIELDS = {"round", "candidate", "params", "value", "metrics", "seed", "wall_time", "status"}

XYZ = {
    "x": {"type": "float", "low": -3.0, "high": 3.0, "init": 2.0},
    "y": {"type": "float", "low": -3.0, "high": 3.0, "init": -1.0},
    "n": {"type": "int", "low": 0, "high": 4, "init": 2},
}


def python_config(tmp_path: Path, function: str, *, optimizer: str = "random", budget: dict | None = None,
                  popsize: int = 4, seed: int = 5, direction: str = "minimize", with_context: bool = False,
                  **extra) -> Path:
    config = {
        "seed": seed,
        "objective": {"name": "python", "options": {"function": f"helpers_objectives:{function}",
                                                    "direction": direction, "with_context": with_context}},
        "space": XYZ,
        "optimizer": {"name": optimizer, "popsize": popsize},
        "budget": budget or {"rounds": 5},
        "callbacks": [],
        **extra,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def analytic_config(tmp_path: Path, *, optimizer: str = "nevergrad.cma", budget: dict | None = None,
                    popsize: int | None = 4, seed: int = 3, dim: int = 3) -> Path:
    config = {"seed": seed, "objective": {"name": "sphere", "options": {"dim": dim}},
              "optimizer": {"name": optimizer, **({"popsize": popsize} if popsize else {})},
              "budget": budget or {"rounds": 4}, "callbacks": []}
    path = tmp_path / "analytic.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def trials(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]


def best_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "best.json").read_text())


def sphere(params: dict) -> float:
    return float(sum(float(v) ** 2 for v in params.values()))


def run_ok(cli_inproc, *args) -> None:
    result = cli_inproc(*args)
    assert result.returncode == 0, result.stderr


# -- budgets ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["random", "nevergrad.cma", "optuna.tpe", "pycma"])
def test_rounds_budget(optimizer, tmp_path, cli_inproc):
    run_ok(cli_inproc, "run", analytic_config(tmp_path, optimizer=optimizer, budget={"rounds": 3}), "-o", "R",
           "--quiet")
    records = trials(tmp_path / "R")
    assert [r["round"] for r in records] == [0] * 4 + [1] * 4 + [2] * 4
    assert [r["candidate"] for r in records] == list(range(12))
    best = best_json(tmp_path / "R")
    assert (best["rounds"], best["evaluations"], best["failures"], best["finished"]) == (3, 12, 0, True)


@pytest.mark.parametrize("optimizer", ["random", "nevergrad.cma", "optuna.cmaes", "pycma"])
def test_evaluations_budget_ends_with_a_partial_round(optimizer, tmp_path, cli_inproc):
    run_ok(cli_inproc, "run", analytic_config(tmp_path, optimizer=optimizer, budget={"evaluations": 10}),
           "-o", "E", "--quiet")
    records = trials(tmp_path / "E")
    assert len(records) == 10
    assert [r["round"] for r in records] == [0] * 4 + [1] * 4 + [2] * 2
    assert [r["candidate"] for r in records] == list(range(10))
    best = best_json(tmp_path / "E")
    assert (best["rounds"], best["evaluations"], best["finished"]) == (3, 10, True)


def test_evaluations_budget_smaller_than_one_round(tmp_path, cli_inproc):
    run_ok(cli_inproc, "run", analytic_config(tmp_path, budget={"evaluations": 3}), "-o", "E", "--quiet")
    assert [r["round"] for r in trials(tmp_path / "E")] == [0, 0, 0]


def test_whichever_budget_comes_first(tmp_path, cli_inproc):
    cfg = analytic_config(tmp_path, budget={"rounds": 3, "evaluations": 100})
    run_ok(cli_inproc, "run", cfg, "-o", "R", "--quiet")
    assert len(trials(tmp_path / "R")) == 12
    run_ok(cli_inproc, "run", cfg, "-o", "E", "--quiet", "budget.evaluations=6")
    assert len(trials(tmp_path / "E")) == 6


def test_seconds_budget(tmp_path, cli_inproc):
    """Rounds of ~12 ms (4 × 3 ms) until 0.4 s have passed; the round running at the limit completes."""
    cfg = python_config(tmp_path, "slow_sphere", budget={"seconds": 0.4})
    run_ok(cli_inproc, "run", cfg, "-o", "S", "--quiet")
    records = trials(tmp_path / "S")
    best = best_json(tmp_path / "S")
    assert best["finished"] is True
    assert best["elapsed_seconds"] >= 0.4  # no upper bound: a busy machine may take longer
    assert len(records) % 4 == 0 and best["evaluations"] == len(records)
    assert best["rounds"] >= 3
    assert sum(r["wall_time"] for r in records) >= 0.003 * len(records) * 0.9


# -- what a run writes ---------------------------------------------------------------------------------
def test_trial_records(tmp_path, cli_inproc):
    run_ok(cli_inproc, "run", python_config(tmp_path, "with_metrics", budget={"rounds": 3}), "-o", "T", "--quiet")
    records = trials(tmp_path / "T")
    assert len(records) == 12
    for index, record in enumerate(records):
        assert TRIAL_FIELDS <= set(record), record
        assert record["candidate"] == index and record["round"] == index // 4
        assert record["status"] == "ok" and "error" not in record
        assert set(record["params"]) == {"x", "y", "n"}
        assert -3 <= record["params"]["x"] <= 3 and -3 <= record["params"]["y"] <= 3
        assert isinstance(record["params"]["n"], int) and 0 <= record["params"]["n"] <= 4
        assert record["value"] == pytest.approx(sphere(record["params"]), rel=1e-12)
        assert record["metrics"] == {"abs_x": abs(record["params"]["x"]), "one": 1.0}
        assert isinstance(record["wall_time"], float) and record["wall_time"] >= 0
    # x0 injection: the space's initial point is the first candidate
    assert records[0]["params"] == {"x": 2.0, "y": -1.0, "n": 2}


def test_round_seeds(tmp_path, cli_inproc):
    """One seed shared by every candidate of a round, a different one each round and each run seed."""
    cfg = python_config(tmp_path, "noisy_sphere", with_context=True, budget={"rounds": 4}, seed=5)
    run_ok(cli_inproc, "run", cfg, "-o", "A", "--quiet")
    run_ok(cli_inproc, "run", cfg, "-o", "B", "--quiet", "seed=6")
    seeds = {}
    for record in trials(tmp_path / "A"):
        seeds.setdefault(record["round"], set()).add(record["seed"])
        assert record["seed"] == round_seed(5, record["round"])
        assert record["metrics"]["round"] == record["round"]  # the objective saw this round's context
    assert all(len(s) == 1 for s in seeds.values())
    per_round = [next(iter(seeds[r])) for r in range(4)]
    assert len(set(per_round)) == 4
    other = sorted({r["seed"] for r in trials(tmp_path / "B")})
    assert not set(other) & set(per_round)
    # the shared noise is the same for all candidates of a round, and differs across rounds
    shared = {}
    for record in trials(tmp_path / "A"):
        shared.setdefault(record["round"], set()).add(record["metrics"]["shared_noise"])
    assert all(len(s) == 1 for s in shared.values()) and len({next(iter(s)) for s in shared.values()}) == 4


def test_config_yaml_is_fully_resolved_and_reloadable(tmp_path, cli_inproc):
    cfg = analytic_config(tmp_path, budget={"rounds": 3}, dim=2)
    run_ok(cli_inproc, "run", cfg, "-o", "A", "--quiet")
    resolved = yaml.safe_load((tmp_path / "A" / "config.yaml").read_text())
    # the objective's own space, written out dimension by dimension
    assert resolved["space"] == {
        "x[0]": {"type": "float", "low": -5.0, "high": 5.0, "init": 3.0},
        "x[1]": {"type": "float", "low": -5.0, "high": 5.0, "init": 3.0},
    }
    assert set(resolved["space"]) == {"x[0]", "x[1]"}
    # defaults filled in
    assert resolved["executor"]["name"] == "serial" and resolved["executor"]["workers"] == 1
    assert resolved["max_failure_rate"] == 0.2 and resolved["budget"]["rounds"] == 3
    assert resolved["optimizer"]["popsize"] == 4 and resolved["seed"] == 3
    # package versions
    versions = resolved["versions"]
    assert isinstance(versions, dict)
    assert {"python", "calibri", "numpy"} <= set(versions)
    assert all(isinstance(v, str) and v for v in versions.values())

    # re-loadable: validates, and running it again gives the same trajectory
    reloaded = load_config(tmp_path / "A" / "config.yaml")
    assert reloaded.space is not None and reloaded.seed == 3
    run_ok(cli_inproc, "run", tmp_path / "A" / "config.yaml", "-o", "C", "--quiet")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_time"} for r in rs]  # noqa: E731
    assert strip(trials(tmp_path / "C")) == strip(trials(tmp_path / "A"))
    again = yaml.safe_load((tmp_path / "C" / "config.yaml").read_text())
    assert {k: v for k, v in again.items() if k != "versions"} == \
        {k: v for k, v in resolved.items() if k != "versions"}


def test_config_yaml_keeps_a_user_space(tmp_path, cli_inproc):
    run_ok(cli_inproc, "run", python_config(tmp_path, "sphere", budget={"rounds": 1}), "-o", "A", "--quiet")
    resolved = yaml.safe_load((tmp_path / "A" / "config.yaml").read_text())
    assert list(resolved["space"]) == ["x", "y", "n"]
    assert resolved["space"]["n"]["type"] == "int" and resolved["space"]["x"]["init"] == 2.0
    assert resolved["objective"]["options"]["function"] == "helpers_objectives:sphere"


def _check_best(run_dir: Path, pick) -> dict:
    records = [r for r in trials(run_dir) if r["status"] == "ok"]
    best = best_json(run_dir)
    target = pick(records, key=lambda r: r["value"])
    assert best["best"]["value"] == target["value"]
    assert best["best"]["params"] == target["params"]
    assert (best["best"]["round"], best["best"]["candidate"]) == (target["round"], target["candidate"])
    assert set(best["recommendation"]) == set(target["params"])
    return best


@pytest.mark.parametrize("optimizer", ["nevergrad.cma", "optuna.tpe", "random"])
def test_best_json_minimize(optimizer, tmp_path, cli_inproc):
    run_ok(cli_inproc, "run", python_config(tmp_path, "sphere", optimizer=optimizer, budget={"rounds": 6}),
           "-o", "A", "--quiet")
    best = _check_best(tmp_path / "A", min)
    assert best["direction"] == "minimize"


@pytest.mark.parametrize("optimizer", ["nevergrad.cma", "optuna.tpe", "random"])
def test_best_json_maximize(optimizer, tmp_path, cli_inproc):
    cfg = python_config(tmp_path, "neg_sphere", optimizer=optimizer, direction="maximize", budget={"rounds": 8})
    run_ok(cli_inproc, "run", cfg, "-o", "A", "--quiet")
    records = trials(tmp_path / "A")
    best = _check_best(tmp_path / "A", max)
    assert best["direction"] == "maximize"
    assert best["best"]["value"] > min(r["value"] for r in records)
    # the optimiser was told to maximise: it improves on the starting point (-(4 + 1 + 4) = -9)
    assert records[0]["value"] == -9.0 and best["best"]["value"] > -9.0
    assert best["best"]["value"] <= 0.0


def test_maximize_steers_the_optimiser(tmp_path, cli_inproc):
    """Minimising neg_sphere walks away from the origin; maximising it walks towards it."""
    cfg = python_config(tmp_path, "neg_sphere", optimizer="nevergrad.cma", budget={"rounds": 12})
    run_ok(cli_inproc, "run", cfg, "-o", "up", "--quiet", "objective.options.direction=maximize")
    run_ok(cli_inproc, "run", cfg, "-o", "down", "--quiet", "objective.options.direction=minimize")
    last = lambda d: [r["value"] for r in trials(tmp_path / d) if r["round"] == 11]  # noqa: E731
    assert max(last("up")) > -9.0 > min(last("down"))


# -- failures ---------------------------------------------------------------------------------------------
def test_failures_are_recorded_per_candidate(tmp_path, cli_inproc):
    cfg = python_config(tmp_path, "flaky", budget={"rounds": 12}, max_failure_rate=1.0, seed=2)
    run_ok(cli_inproc, "run", cfg, "-o", "F", "--quiet")
    records = trials(tmp_path / "F")
    assert len(records) == 48  # the run went on to its budget
    kinds = {"raise": 0, "nan": 0, "inf": 0, "ok": 0}
    for record in records:
        x = record["params"]["x"]
        if x > 2.0:
            kinds["raise"] += 1
            assert record["status"] == "failed" and record["value"] is None
            assert record["error"].startswith("ValueError: x=") and "too large" in record["error"]
        elif x > 1.0:
            kinds["nan"] += 1
            assert record["status"] == "failed" and record["value"] is None
            assert "nan" in record["error"].lower()
        elif x > 0.5:
            kinds["inf"] += 1
            assert record["status"] == "failed" and record["value"] is None
            assert "inf" in record["error"].lower()
        else:
            kinds["ok"] += 1
            assert record["status"] == "ok" and "error" not in record
            assert record["value"] == pytest.approx(sphere(record["params"]))
    assert all(kinds.values()), kinds
    # a raising candidate does not fail the others of its round
    by_round = {}
    for record in records:
        by_round.setdefault(record["round"], set()).add(record["status"])
    assert any(statuses == {"ok", "failed"} for statuses in by_round.values())
    best = best_json(tmp_path / "F")
    assert best["failures"] == kinds["raise"] + kinds["nan"] + kinds["inf"]
    assert best["best"]["value"] == min(r["value"] for r in records if r["status"] == "ok")


@pytest.mark.filterwarnings("ignore:Clipping very high value")
def test_failures_with_cma_backends(tmp_path, cli_inproc):
    """CMA-ES needs a loss for each candidate: failed ones are penalised, and the run goes on."""
    for optimizer in ("pycma", "nevergrad.cma", "optuna.cmaes"):
        cfg = python_config(tmp_path, "flaky", optimizer=optimizer, budget={"rounds": 6}, max_failure_rate=1.0)
        run_ok(cli_inproc, "run", cfg, "-o", optimizer, "--quiet")
        records = trials(tmp_path / optimizer)
        assert len(records) == 24
        assert records[0]["status"] == "failed"  # x0 = 2.0 gives NaN
        failed = [r for r in records if r["status"] == "failed"]
        assert all(r["value"] is None and r["error"] for r in failed)
        best = best_json(tmp_path / optimizer)
        assert best["finished"] is True and best["failures"] == len(failed)
        ok = [r["value"] for r in records if r["status"] == "ok"]
        assert (best["best"] is None) if not ok else (best["best"]["value"] == min(ok))


def test_max_failure_rate_stops_the_run(tmp_path, cli_inproc):
    cfg = python_config(tmp_path, "always_fails", budget={"rounds": 5})
    result = cli_inproc("run", cfg, "-o", "F", "--quiet")
    assert result.returncode == 1
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith("calibri: error:") and "max_failure_rate" in message
    assert "this objective always fails" in message and "Traceback" not in message
    # the round's trials and its checkpoint are kept
    records = trials(tmp_path / "F")
    assert len(records) == 4 and all(r["status"] == "failed" for r in records)
    assert all(r["error"].startswith("RuntimeError: this objective always fails") for r in records)
    checkpoints = list((tmp_path / "F" / "checkpoint").glob("state-*.pkl"))
    assert len(checkpoints) == 1


def test_max_failure_rate_is_a_cumulative_fraction(tmp_path, cli_inproc):
    """flaky fails often: the run stops once failures exceed the allowed fraction of evaluations."""
    cfg = python_config(tmp_path, "flaky", budget={"rounds": 30}, max_failure_rate=0.3, seed=2)
    result = cli_inproc("run", cfg, "-o", "F", "--quiet")
    records = trials(tmp_path / "F")
    failed = sum(r["status"] == "failed" for r in records)
    assert result.returncode == 1
    assert failed > 0.3 * len(records)
    assert f"{failed} of {len(records)} evaluations failed" in result.stderr


def test_max_failure_rate_message_is_one_line_for_multiline_errors(tmp_path, cli_inproc):
    cfg = python_config(tmp_path, "fails_multiline", budget={"rounds": 2})
    result = cli_inproc("run", cfg, "-o", "F", "--quiet")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_numpy_metrics_are_recorded(tmp_path, cli_inproc):
    result = cli_inproc("run", python_config(tmp_path, "numpy_metrics", budget={"rounds": 2}), "-o", "N",
                        "--quiet")
    assert result.returncode == 0, result.stderr
    records = trials(tmp_path / "N")
    assert all(isinstance(r["metrics"]["abs_x"], float) and isinstance(r["value"], float) for r in records)
    assert records[0]["metrics"]["abs_x"] == pytest.approx(2.0)
    assert not math.isnan(records[0]["value"])


def test_nan_metric_does_not_crash_the_run(tmp_path, cli_inproc):
    result = cli_inproc("run", python_config(tmp_path, "nan_metric", budget={"rounds": 2}), "-o", "N", "--quiet")
    assert result.returncode == 0, result.stderr
    records = trials(tmp_path / "N")
    assert len(records) == 8 and all(r["status"] == "ok" and r["metrics"]["one"] == 1.0 for r in records)


# -- the first hour's mistakes and interruptions ------------------------------------------------------
def test_ctrl_c_brings_best_json_and_the_curve_up_to_the_last_checkpoint(tmp_path, cli_inproc):
    """best.json is rewritten at most once a second while running; after Ctrl-C it must say what
    the checkpoint says (not lag by many rounds), and convergence.png must be drawn."""
    cfg = python_config(tmp_path, "interrupted_at_round_3", with_context=True, budget={"rounds": 10},
                        callbacks=["plot"])
    result = cli_inproc("run", cfg, "-o", "I", "--quiet")
    assert result.returncode == 130 and "calibri resume" in result.stderr
    best = best_json(tmp_path / "I")
    records = [r for r in trials(tmp_path / "I") if r["round"] < 3]
    assert (best["rounds"], best["evaluations"], best["finished"]) == (3, 12, False)
    assert best["best"]["value"] == min(r["value"] for r in records)
    assert (tmp_path / "I" / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_optimiser_that_returns_fewer_candidates_than_asked_is_an_error(tmp_path, cli_inproc):
    cfg = python_config(tmp_path, "sphere", optimizer="test.short-ask", plugins=["helpers_objectives"])
    result = cli_inproc("run", cfg, "-o", "S", "--quiet")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("calibri: error: optimizer 'test.short-ask' returned 3 candidates when "
                                     "asked for 4 (round 0)")


@pytest.mark.parametrize("executor", ["serial", "process"])
def test_modules_in_the_working_directory_import(tmp_path, executor):
    """`function: mymodule:loss` and `plugins: [mymodule]` for a module next to the config, run
    with the installed `calibri` command from that folder (as `python -m` would find it)."""
    import shutil
    import subprocess
    import sys

    from conftest import cli_env

    (tmp_path / "mymodule.py").write_text(
        "from calibri.core.hookspecs import hookimpl\n\n"
        "def loss(params):\n    return (params['x'] - 1.0) ** 2\n\n"
        "@hookimpl\ndef calibri_register_callbacks(register):\n    register('mymodule.nothing', dict)\n")
    cfg = {"objective": {"name": "python", "options": {"function": "mymodule:loss"}},
           "space": {"x": {"type": "float", "low": -3, "high": 3, "init": 0, "sigma": 1}},
           "optimizer": "random", "budget": {"rounds": 2}, "callbacks": [], "plugins": ["mymodule"],
           "executor": {"name": executor, "workers": 2}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    command = shutil.which("calibri", path=str(Path(sys.executable).parent))
    assert command is not None, "the calibri console script is installed next to this interpreter"
    env = cli_env()
    env.pop("PYTHONPATH")  # only the working directory can provide mymodule
    proc = subprocess.run([command, "run", "cfg.yaml", "-o", "W", "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert len(trials(tmp_path / "W")) == 8


def test_resume_refuses_a_run_whose_objective_changed_direction(tmp_path, cli_inproc):
    """A run made to minimise must not go on maximising (e.g. a reward whose direction was fixed
    since, with the config unchanged): its best and its optimiser's history would mix both senses."""
    from calibri.core.store import RunStore, read_checkpoint

    run_ok(cli_inproc, "run", python_config(tmp_path, "sphere", budget={"rounds": 2}), "-o", "D", "--quiet")
    store = RunStore(tmp_path / "D")
    newest = store.checkpoint_files()[-1]
    store.save_checkpoint({**read_checkpoint(newest), "direction": "maximize"})  # as if made by a maximiser
    before = (tmp_path / "D" / "trials.jsonl").read_bytes()
    result = cli_inproc("resume", "D", "--rounds", "4", "--quiet")
    assert result.returncode == 2
    assert "the run was made to maximize and its objective now says minimize" in result.stderr
    assert (tmp_path / "D" / "trials.jsonl").read_bytes() == before
