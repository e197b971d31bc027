"""The ``mlflow`` callback: params, per-round metrics and artefacts, read back from the local
store it writes in the run directory; a resumed run continues the same MLflow run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibri.core.config import validate
from calibri.core.errors import ConfigError
from calibri.core.run import plan, resume_run, start_run

pytest.importorskip("mlflow")


def config(rounds: int = 3, **options) -> dict:
    return {"name": "mlf", "seed": 5, "objective": {"name": "rosenbrock", "options": {"dim": 2}},
            "optimizer": {"name": "random", "popsize": 3}, "budget": {"rounds": rounds},
            "callbacks": ["plot", {"name": "mlflow", "options": options}]}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A 3-round run, resumed to 5 rounds; its MLflow client and run id."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path_factory.mktemp("mlflow") / "run"
    start_run(validate(config(experiment="calibri-tests")), run_dir, quiet=True)
    first = json.loads((run_dir / "monitoring" / "mlflow.json").read_text())
    resume_run(run_dir, {"rounds": 5}, quiet=True)
    state = json.loads((run_dir / "monitoring" / "mlflow.json").read_text())
    assert state == first  # the same MLflow run continued
    assert state["tracking_uri"] == f"sqlite:///{(run_dir / 'mlflow' / 'mlflow.db').resolve()}"
    return run_dir, MlflowClient(tracking_uri=state["tracking_uri"]), state["run_id"]


def test_params_are_the_flattened_config(tracked):
    _, client, run_id = tracked
    run = client.get_run(run_id)
    params = run.data.params
    assert params["objective.name"] == "rosenbrock" and params["objective.options.dim"] == "2"
    assert params["optimizer.popsize"] == "3" and params["space.x_0_.type"] == "float"  # [ ] are not allowed in names
    assert params["budget.rounds"] == "3"  # params cannot change: the raised budget is a tag
    assert run.data.tags["changed.budget.rounds"] == "5"
    assert run.info.run_name == "run" and run.info.status == "FINISHED"


def test_metrics_per_round_match_the_trials_without_duplicates(tracked):
    run_dir, client, run_id = tracked
    trials = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/round_mean"))
    means = [sum(t["value"] for t in trials if t["round"] == r) / 3 for r in range(5)]
    assert history == [(r + 1, pytest.approx(means[r], rel=1e-9)) for r in range(5)]
    evaluations = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/evaluations"))
    assert evaluations == [(r + 1, 3.0 * (r + 1)) for r in range(5)]
    best = json.loads((run_dir / "best.json").read_text())["best"]["value"]
    last = max(client.get_metric_history(run_id, "train/best"), key=lambda m: m.step)
    assert (last.step, last.value) == (5, pytest.approx(best, rel=1e-9))


def test_result_files_are_artefacts_and_one_run_per_run_directory(tracked):
    run_dir, client, run_id = tracked
    artefacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"best.json", "config.yaml", "convergence.png"} <= artefacts
    local = Path(client.download_artifacts(run_id, "best.json", str(run_dir / "download")))
    assert json.loads(local.read_text()) == json.loads((run_dir / "best.json").read_text())
    experiment = client.get_experiment_by_name("calibri-tests")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert Path(experiment.artifact_location.removeprefix("file://")).is_relative_to(run_dir.resolve())


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"callbacks\.mlflow\.options\.experiment: must not be empty"):
        plan(validate(config(experiment=" ")))


def test_a_missing_extra_names_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"^callbacks\.mlflow: .*pip install 'calibri\[mlflow\]'"):
        plan(validate(config()))


def test_a_failed_run_is_marked_failed(tmp_path):
    """A run stopped by its errors (on_run_failed) ends its MLflow run as FAILED, not RUNNING,
    with the rounds it made logged."""
    from mlflow.tracking import MlflowClient

    from calibri.core.errors import RunFailed

    failing = {**config(rounds=5), "objective": {"name": "python", "options": {
        "function": "helpers_objectives:always_fails"}},
        "space": {"x": {"type": "float", "low": -1.0, "high": 1.0, "init": 0.0}}}
    with pytest.raises(RunFailed, match="max_failure_rate"):
        start_run(validate(failing), tmp_path / "run", quiet=True)
    state = json.loads((tmp_path / "run" / "monitoring" / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    run = client.get_run(state["run_id"])
    assert run.info.status == "FAILED"
    assert [(m.step, m.value) for m in client.get_metric_history(state["run_id"], "train/failures")] == [(1, 3.0)]
