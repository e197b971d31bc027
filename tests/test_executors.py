"""Executors: ``serial`` and ``process`` give the same trajectory, build the objective once per
worker, isolate failing candidates and hand each worker its device."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from calibri.core.config import validate
from calibri.core.executor import ObjectiveRecipe, evaluate_batch
from calibri.core.executors import ProcessExecutor, SerialExecutor
from calibri.core.objective import EvalResult, Objective, RoundContext
from calibri.core.run import start_run

import helpers_objectives
from helpers_objectives import read_builds, read_closes


@pytest.fixture(autouse=True)
def _no_installed_plugins(no_installed_plugins):
    """Every test of this module runs with only the built-in and the test's plugins."""


def run(run_dir: Path, *, objective: dict, optimizer: str = "nevergrad.cma", rounds: int = 3, popsize: int = 5,
        executor: dict | None = None, seed: int = 4, **extra) -> list[dict]:
    config = validate({"seed": seed, "objective": objective, "optimizer": {"name": optimizer, "popsize": popsize},
                       "executor": executor or {"name": "serial"}, "budget": {"rounds": rounds},
                       "callbacks": [], **extra})
    start_run(config, run_dir)
    return [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]


def key(records: list[dict]) -> list[tuple]:
    return [(r["round"], r["candidate"], json.dumps(r["params"], sort_keys=True), r["value"], r["status"],
             r["seed"], r.get("error"), json.dumps(r["metrics"], sort_keys=True)) for r in records]


def counting(marker_dir: Path, **options) -> dict:
    return {"name": "test.counting", "options": {"marker_dir": str(marker_dir), **options}}


PLUGINS = {"plugins": ["helpers_objectives"]}
EXECUTORS = [{"name": "serial"}] + [{"name": "process", "workers": n} for n in (1, 2, 3)]


# -- same trajectory whatever the executor -----------------------------------------------------------
def test_analytic_objective_same_trajectory_for_every_executor(tmp_path):
    objective = {"name": "sphere", "options": {"dim": 3}}
    results = [key(run(tmp_path / f"run{i}", objective=objective, executor=ex)) for i, ex in enumerate(EXECUTORS)]
    assert len(results[0]) == 15
    assert len({r[3] for r in results[0]}) > 10  # adaptive candidates, not a constant
    for other in results[1:]:
        assert other == results[0]


def test_seeded_objective_same_trajectory_for_every_executor(tmp_path):
    """The objective draws noise from ctx.seed: a worker's copy sees the same round context."""
    objective = {"name": "python", "options": {"function": "helpers_objectives:noisy_sphere", "with_context": True}}
    space = {"space": {"x": {"type": "float", "low": -2.0, "high": 2.0, "init": 1.0},
                       "y": {"type": "float", "low": -2.0, "high": 2.0, "init": 1.0}}}
    results = [key(run(tmp_path / f"run{i}", objective=objective, executor=ex, optimizer="pycma", **space))
               for i, ex in enumerate(EXECUTORS)]
    first = results[0]
    assert len({r[5] for r in first}) == 3  # one seed per round
    shared = [json.loads(r[7])["shared_noise"] for r in first]
    assert len(set(shared)) == 3 and shared[0] == shared[4] != shared[5]
    for other in results[1:]:
        assert other == first


# -- objective built once per worker -------------------------------------------------------------------
def test_serial_builds_the_objective_once(tmp_path):
    markers = tmp_path / "markers"
    records = run(tmp_path / "run", objective=counting(markers), rounds=4, **PLUGINS)
    builds = read_builds(markers)
    assert len(builds) == 1 and builds[0]["pid"] == os.getpid()
    assert {r["artifacts"]["build"] for r in records} == {builds[0]["build"]}
    assert len(read_closes(markers)) == 1


def test_process_builds_the_objective_once_per_worker(tmp_path):
    markers = tmp_path / "markers"
    # round 0's three batches wait for each other, so each of the three workers takes one
    records = run(tmp_path / "run", objective=counting(markers, rendezvous=3, sleep=0.005), rounds=4,
                  popsize=6, executor={"name": "process", "workers": 3}, **PLUGINS)
    builds = read_builds(markers)
    pids = [b["pid"] for b in builds]
    assert len(pids) == len(set(pids)) == 3, builds  # one build in each of three processes
    assert os.getpid() not in pids  # the main process never builds it
    used = {r["artifacts"]["pid"] for r in records}
    assert used == set(pids)
    assert len({r["artifacts"]["pid"] for r in records if r["round"] == 0}) == 3
    # every evaluation in a process, in every round, used that process's one objective
    build_of = {b["pid"]: b["build"] for b in builds}
    assert all(r["artifacts"]["build"] == build_of[r["artifacts"]["pid"]] for r in records)
    assert {r["round"] for r in records} == {0, 1, 2, 3} and len(records) == 24


def test_process_closes_each_worker_objective(tmp_path):
    markers = tmp_path / "markers"
    run(tmp_path / "run", objective=counting(markers), rounds=2, popsize=4,
        executor={"name": "process", "workers": 2}, **PLUGINS)
    builds = read_builds(markers)
    assert len(read_closes(markers)) == len(builds) >= 1


# -- failing batches are retried candidate by candidate ----------------------------------------------------
class BatchFails(Objective):
    """Raises for the whole batch if any candidate is bad; counts calls."""

    def __init__(self, wrong_length: bool = False) -> None:
        self.calls: list[int] = []
        self.wrong_length = wrong_length

    def evaluate(self, candidates, ctx):
        self.calls.append(len(candidates))
        if self.wrong_length and len(candidates) > 1:
            return [1.0]
        if any(p["x"] < 0 for p in candidates):
            raise ValueError("negative x")
        values = [p["x"] for p in candidates]
        if any(p["x"] == 7 for p in candidates):
            values = [math.nan if p["x"] == 7 else p["x"] for p in candidates]
        return values


def test_evaluate_batch_retries_candidates_alone():
    objective = BatchFails()
    ctx = RoundContext(round=0, seed=1)
    results = evaluate_batch(objective, [{"x": 1.0}, {"x": -1.0}, {"x": 2.0}], ctx)
    assert objective.calls == [3, 1, 1, 1]
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert [r.value for r in results] == [1.0, None, 2.0]
    assert results[1].error.startswith("ValueError: negative x")


def test_evaluate_batch_nan_fails_only_its_candidate():
    objective = BatchFails()
    results = evaluate_batch(objective, [{"x": 1.0}, {"x": 7}, {"x": 2.0}], RoundContext(round=0, seed=1))
    assert objective.calls == [3]
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert "nan" in results[1].error


def test_evaluate_batch_wrong_number_of_values_is_retried():
    objective = BatchFails(wrong_length=True)
    results = evaluate_batch(objective, [{"x": 1.0}, {"x": 2.0}], RoundContext(round=0, seed=1))
    assert objective.calls == [2, 1, 1]
    assert [r.value for r in results] == [1.0, 2.0] and all(r.ok for r in results)


def test_evaluate_batch_never_raises_and_times_results():
    results = evaluate_batch(BatchFails(), [{"x": -1.0}], RoundContext(round=0, seed=1))
    assert len(results) == 1 and not results[0].ok and results[0].wall_time >= 0
    assert evaluate_batch(BatchFails(), [], RoundContext(round=0, seed=1)) == []


@pytest.mark.parametrize("executor", [{"name": "serial"}, {"name": "process", "workers": 2}],
                         ids=["serial", "process"])
def test_failing_batch_fails_only_the_bad_candidate(executor, tmp_path):
    markers = tmp_path / "markers"
    records = run(tmp_path / "run", objective=counting(markers, fail_above=1.2), optimizer="random", rounds=5,
                  popsize=6, executor=executor, max_failure_rate=1.0, **PLUGINS)
    mixed_rounds = 0
    for record in records:
        bad = record["params"]["x[0]"] > 1.2
        assert record["status"] == ("failed" if bad else "ok")
        if bad:
            assert record["value"] is None and record["error"].startswith("ValueError: x[0]=")
        else:
            assert record["value"] == pytest.approx(sum(v * v for v in record["params"].values()))
    for round_index in range(5):
        statuses = {r["status"] for r in records if r["round"] == round_index}
        mixed_rounds += statuses == {"ok", "failed"}
    assert mixed_rounds >= 2
    assert len(read_builds(markers)) <= max(executor.get("workers", 1), 1)  # retries reuse the objective


def test_crashed_worker_fails_its_candidates_and_the_run_goes_on(tmp_path):
    objective = {"name": "python", "options": {"function": "helpers_objectives:crash_above"}}
    space = {"space": {"x": {"type": "float", "low": -3.0, "high": 3.0, "init": 0.0},
                       "y": {"type": "float", "low": -3.0, "high": 3.0, "init": 0.0}}}
    records = run(tmp_path / "run", objective=objective, optimizer="random", rounds=6, popsize=4, seed=1,
                  executor={"name": "process", "workers": 2}, max_failure_rate=1.0, **space)
    assert len(records) == 24
    crashing = {r["round"] for r in records if r["params"]["x"] > 2.5}
    assert crashing and len(crashing) < 6, "the seed should give rounds with and without a crash"
    for record in records:  # only the crashing candidate fails, not its round or its chunk
        if record["params"]["x"] > 2.5:
            assert record["status"] == "failed"
            assert record["error"].startswith("worker process died while evaluating this candidate")
        else:
            assert record["status"] == "ok"


def test_worker_dying_between_rounds_does_not_stop_the_run(tmp_path):
    objective = {"name": "python", "options": {"function": "helpers_objectives:dies_after_round_0",
                                               "with_context": True}}
    space = {"space": {"x": {"type": "float", "low": -3.0, "high": 3.0, "init": 0.0}}}
    records = run(tmp_path / "run", objective=objective, optimizer="random", rounds=3, popsize=2, seed=1,
                  executor={"name": "process", "workers": 1}, max_failure_rate=1.0,
                  callbacks=[{"name": "test.pause", "options": {"seconds": 0.4}}], **space, **PLUGINS)
    assert [r["round"] for r in records] == [0, 0, 1, 1, 2, 2]
    assert all(r["status"] == "ok" for r in records)  # a fresh worker took round 1


# -- threads: each worker's share of the cores, by default -----------------------------------------------
def faulty_threads(tmp_path: Path, workers: int, **options) -> set:
    records = run(tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}", rounds=1, popsize=4,
                  objective={"name": "test.faulty", "options": {"marker_dir": str(tmp_path)}},
                  executor={"name": "process", "workers": workers, "options": options}, **PLUGINS)
    return {r["artifacts"]["threads"] for r in records}


@pytest.fixture
def no_thread_variables(monkeypatch):
    from calibri.core.executors import THREAD_VARIABLES

    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_threads_auto_splits_the_cores_between_workers(workers, tmp_path, no_thread_variables):
    from calibri.core.executors import THREAD_VARIABLES, available_cores

    assert faulty_threads(tmp_path, workers, threads="auto") == {str(max(1, available_cores() // workers))}
    assert all(name not in os.environ for name in THREAD_VARIABLES)  # this process's are untouched


def test_threads_auto_keeps_counts_the_environment_sets(tmp_path, monkeypatch, no_thread_variables):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert faulty_threads(tmp_path, 2, threads="auto") == {"3"}
    assert faulty_threads(tmp_path, 2, threads=1) == {"1"}  # a number in the config wins
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_threads_default_to_each_workers_share(tmp_path, no_thread_variables):
    """Two workers each using every core's threads run several times slower: split by default."""
    from calibri.core.executors import available_cores

    assert faulty_threads(tmp_path, 2) == {str(max(1, available_cores() // 2))}


def test_threads_inherit_leaves_the_environment(tmp_path, no_thread_variables):
    assert faulty_threads(tmp_path, 2, threads="inherit") == {None}


# -- devices ------------------------------------------------------------------------------------------------
def test_devices_cpu_cpu_gives_each_worker_one_device(tmp_path):
    markers = tmp_path / "markers"
    records = run(tmp_path / "run", objective=counting(markers, rendezvous=2), rounds=3, popsize=4,
                  executor={"name": "process", "devices": ["cpu", "cpu"]}, **PLUGINS)
    builds = read_builds(markers)
    assert len(builds) == 2 and len({b["pid"] for b in builds}) == 2
    assert [b["device"] for b in builds] == ["cpu", "cpu"]
    assert {r["artifacts"]["device"] for r in records} == {"cpu"}


def test_distinct_devices_go_to_distinct_workers(tmp_path):
    markers = tmp_path / "markers"
    records = run(tmp_path / "run", objective=counting(markers, rendezvous=2), rounds=2, popsize=4,
                  executor={"name": "process", "workers": 5, "devices": ["dev:a", "dev:b"]}, **PLUGINS)
    builds = read_builds(markers)
    assert sorted(b["device"] for b in builds) == ["dev:a", "dev:b"]  # devices set the worker count
    device_of = {b["pid"]: b["device"] for b in builds}
    assert all(device_of[r["artifacts"]["pid"]] == r["artifacts"]["device"] for r in records)


def test_serial_passes_the_first_device(tmp_path):
    executor = SerialExecutor(ObjectiveRecipe("test.counting", {"marker_dir": str(tmp_path)},
                                              ("helpers_objectives",)), devices=["dev:x"])
    with executor:
        results = executor.evaluate([{"x[0]": 0.5, "x[1]": 0.0}], RoundContext(round=0, seed=0))
    assert results[0].value == 0.25 and results[0].artifacts["device"] == "dev:x"
    assert [b["device"] for b in read_builds(tmp_path)] == ["dev:x"]


def test_factory_without_device_argument_is_built_without_it(tmp_path):
    recipe = ObjectiveRecipe("sphere", {"dim": 2})
    with ProcessExecutor(recipe, workers=1, devices=["dev:y"]) as executor:
        info = executor.describe()
        results = executor.evaluate([{"x[0]": 1.0, "x[1]": 2.0}], RoundContext(round=0, seed=0))
    assert info.direction == "minimize" and len(info.space) == 2
    assert isinstance(results[0], EvalResult) and results[0].value == 5.0


def test_helpers_module_is_the_plugin():
    assert hasattr(helpers_objectives, "calibri_register_objectives")
