"""``run_bench``: the matrix run, then the tidy data, the exports and the report."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from calibri.core.errors import RunFailed, UserError

from .config import BenchConfig, dump_bench


def run_bench(config: BenchConfig, bench_dir: str | Path, *, workers: int | None = None, progress: bool = True,
              run: bool = True, report: bool = True, export: bool = True,
              threads: int | str | None = None) -> dict[str, Any]:
    """Run every unfinished cell (``run``), then write ``evaluations.csv.gz`` and the exports
    (``export``) and ``report.md`` with its PNGs (``report``). Returns what happened."""
    from .analysis import load_calibration_run, load_run
    from .cells import build_cells, expand_problems
    from .export import CSV_NAME, write_coco, write_iohprofiler, write_tidy_csv
    from .runner import run_cells

    bench_dir = Path(bench_dir)
    problems = expand_problems(config)
    cells = build_cells(config, problems)
    bench_dir.mkdir(parents=True, exist_ok=True)
    (bench_dir / "bench.yaml").write_text(dump_bench(config), encoding="utf-8")
    results = (run_cells(cells, bench_dir, workers or config.workers, progress,
                         threads if threads is not None else config.threads) if run else [])
    failed = [r for r in results if r.status == "failed"]
    finished = [c for c in cells if (bench_dir / c.relpath / "best.json").exists()
                and c.key not in {r.key for r in failed}]
    if not run and not finished:
        raise UserError(f"{bench_dir}: no finished cell to report on; run the bench first")
    out: dict[str, Any] = {"bench_dir": str(bench_dir), "cells": len(cells),
                           "ran": sum(r.status == "done" for r in results),
                           "skipped": sum(r.status == "skipped" for r in results) if run else len(finished),
                           "failed": [(r.key, r.error) for r in failed]}
    if report or export:
        runs = [load_run(cell, bench_dir, keep_records=export) for cell in finished]
        calibration = [load_calibration_run(cell, bench_dir) for cell in finished if cell.problem.is_calibration]
        if export:
            out["csv"] = str(write_tidy_csv(runs, bench_dir / CSV_NAME))
            out["iohprofiler"] = str(write_iohprofiler(runs, bench_dir / "export" / "iohprofiler"))
            coco = write_coco(runs, finished, bench_dir, bench_dir / "export" / "coco")
            out["coco"] = str(coco) if coco else None
            for run_ in runs:
                run_.records = []
        if report:
            from .report import build_report

            out["summary"] = build_report(config, runs, bench_dir, [key for key, _ in out["failed"]],
                                          calibration)
            out["report"] = str(bench_dir / "report.md")
    if failed:
        out["error"] = RunFailed(f"{len(failed)} of {len(cells)} cells failed; first: {failed[0].key}: "
                                 f"{failed[0].error}")
    return out
