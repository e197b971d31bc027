"""Objectives that return what a trials log cannot hold, or leave by ``SystemExit``.

Before: an ndarray or object in metrics, or bytes in artifacts, killed the run with 0 trials
recorded; ``raise SystemExit(0)`` ended it with status 0 and no output. Now every such candidate is
converted (numpy values, NaN → null) or recorded as a failure naming what was wrong, and the run
ends the way failures end it (one line, exit 1 past ``max_failure_rate``).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

SPACE = {"x": {"type": "float", "low": -1.0, "high": 1.0, "init": 0.5}, "y": {"type": "float", "low": -1.0, "high": 1.0}}


def config(tmp_path: Path, function: str, max_failure_rate: float = 0.2, executor: str = "serial",
           with_context: bool = False) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "seed": 1, "objective": {"name": "python", "options": {"function": f"faulty_objectives:{function}",
                                                        "with_context": with_context}},
        "space": SPACE, "optimizer": {"name": "random", "popsize": 4}, "budget": {"rounds": 2},
        "max_failure_rate": max_failure_rate, "executor": {"name": executor}, "callbacks": []}))
    return path


def trials(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]


def one_error_line(result) -> str:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("calibri: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# (function, substring of each failed trial's error)
FAILING = [
    pytest.param("huge_array_metric", "array of 1000000 items", id="huge-ndarray-metric"),
    pytest.param("object_metric", "a object in metrics/artifacts", id="object-metric"),
    pytest.param("bytes_artifact", "a bytes in metrics/artifacts", id="bytes-artifact"),
    pytest.param("list_metrics", "not mappings", id="metrics-not-a-mapping"),
    pytest.param("string_value", "non-number: '0.5'", id="string-value"),
    pytest.param("none_value", "non-number: None", id="none-value"),
    pytest.param("array_value", "non-number: array", id="array-value"),
    pytest.param("infinite_value", "returned inf", id="infinite-value"),
    pytest.param("exits_zero", "SystemExit", id="system-exit-0"),
]


@pytest.mark.parametrize("function, error", FAILING)
def test_bad_results_are_recorded_failures(function, error, tmp_path, cli_inproc):
    result = cli_inproc("run", config(tmp_path, function), "-o", "R", "--quiet")
    assert result.returncode == 1, result.stderr
    assert "evaluations failed, more than max_failure_rate" in one_error_line(result)
    records = trials(tmp_path / "R")
    assert len(records) == 4
    assert all(r["status"] == "failed" and error in r["error"] for r in records), records[0]


@pytest.mark.parametrize("executor", ["serial", "process"])
def test_system_exit_fails_only_its_candidate(executor, tmp_path, cli_inproc):
    result = cli_inproc("run", config(tmp_path, "exits_for_large_x", max_failure_rate=1.0, executor=executor),
                        "-o", "R", "--quiet")
    assert result.returncode == 0, result.stderr
    records = trials(tmp_path / "R")
    assert len(records) == 8
    for record in records:
        assert (record["status"] == "failed") == (record["params"]["x"] > 0), record


@pytest.mark.parametrize("function, metrics", [
    pytest.param("small_array_metric", {"per_image": [0.5, None, 1.5]}, id="small-ndarray-with-nan"),
    pytest.param("nan_metric", {"loss": None, "n": 3}, id="nan-and-numpy-scalar"),
])
def test_numpy_and_nan_extras_are_converted(function, metrics, tmp_path, cli_inproc):
    result = cli_inproc("run", config(tmp_path, function), "-o", "R", "--quiet")
    assert result.returncode == 0, result.stderr
    records = trials(tmp_path / "R")
    assert len(records) == 8 and all(r["status"] == "ok" for r in records)
    assert all({k: r["metrics"][k] for k in metrics} == metrics for r in records)


def test_ctrl_c_in_the_first_round_says_nothing_was_saved(tmp_path, cli_inproc):
    path = config(tmp_path, "interrupted_in_round_0", with_context=True)
    result = cli_inproc("run", path, "-o", "R", "--quiet")
    assert result.returncode == 130, result.stderr
    assert "interrupted before the first round finished; start it again with: calibri resume R" \
        in one_error_line(result)
