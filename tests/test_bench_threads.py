"""Parallel bench cells split the cores' threads instead of each using all of them."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from calibri.core.errors import ConfigError
from calibri.core.executors import available_cores, limit_threads, resolve_threads
from calibri.plugins.bench import runner
from calibri.plugins.bench.config import BenchConfig


@dataclass(frozen=True)
class FakeCell:
    key: str
    relpath: str


def report_threads(cell: FakeCell, bench_dir: str) -> runner.CellResult:
    """Stands in for ``run_cell`` in the pool: records the thread pools the cell would run with."""
    import torch

    np.dot(np.ones((64, 64)), np.ones((64, 64)))  # make sure BLAS is loaded
    pools = sorted({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"})
    Path(bench_dir, f"{cell.key}.json").write_text(json.dumps({"blas": pools, "torch": torch.get_num_threads()}))
    return runner.CellResult(cell.key, "done")


def cell_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int | str) -> list[dict]:
    monkeypatch.setattr(runner, "run_cell", report_threads)
    cells = [FakeCell(f"c{i}", f"runs/c{i}") for i in range(4)]
    results = runner.run_cells(cells, tmp_path, workers=2, progress=False, threads=threads)
    assert [r.status for r in results] == ["done"] * 4
    return [json.loads((tmp_path / f"{cell.key}.json").read_text()) for cell in cells]


def test_two_parallel_cells_get_half_the_cores_each(tmp_path, monkeypatch):
    share = max(1, available_cores() // 2)
    for seen in cell_threads(tmp_path, monkeypatch, "auto"):
        assert seen["torch"] == share
        assert all(n == share for n in seen["blas"])


def test_an_explicit_thread_count_wins(tmp_path, monkeypatch):
    for seen in cell_threads(tmp_path, monkeypatch, 1):
        assert seen["torch"] == 1
        assert all(n == 1 for n in seen["blas"])


def test_inherit_leaves_the_libraries_defaults(tmp_path, monkeypatch):
    import torch

    parent_torch = torch.get_num_threads()
    for seen in cell_threads(tmp_path, monkeypatch, "inherit"):
        assert seen["torch"] == parent_torch


def test_threads_option_is_validated():
    assert resolve_threads("inherit", 2, "threads") is None
    assert resolve_threads(3, 2, "threads") == 3
    with pytest.raises(ConfigError, match="^threads: expected a number of threads"):
        resolve_threads(0, 2, "threads")
    with pytest.raises(ConfigError, match="^threads: "):
        resolve_threads("many", 2, "threads")
    bench = {"problems": [{"bbob": {"functions": [1], "dimensions": [2]}}], "optimizers": [{"name": "random"}],
             "budgets": [{"evaluations": 10}]}
    assert BenchConfig.model_validate(bench).threads == "auto"
    with pytest.raises(Exception, match="threads"):
        BenchConfig.model_validate({**bench, "threads": 0})


def test_limit_threads_caps_loaded_libraries_and_sets_the_environment(monkeypatch):
    import os

    import torch
    from threadpoolctl import threadpool_limits

    from calibri.core.executors import THREAD_VARIABLES

    before_torch = torch.get_num_threads()
    before_blas = max([p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] or [1])
    for name in THREAD_VARIABLES:  # recorded, so the test's changes are undone
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)
    try:
        limit_threads(1)
        assert {name: os.environ[name] for name in THREAD_VARIABLES} == dict.fromkeys(THREAD_VARIABLES, "1")
        assert torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    finally:
        torch.set_num_threads(before_torch)
        threadpool_limits(limits=before_blas, user_api="blas")
