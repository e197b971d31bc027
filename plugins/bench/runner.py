"""Run a bench's cells: each a normal calibri run in ``BENCH_DIR/runs/...``, in parallel over a
process pool, skipping finished cells and resuming interrupted ones."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from calibri.core.errors import UserError
from calibri.core.executors import available_cores, limit_threads, resolve_threads

from .cells import Cell

#: Run-config keys that must match for an existing run directory to count as this cell.
IDENTITY_KEYS = ("seed", "objective", "optimizer", "validation", "plugins")


@dataclass
class CellResult:
    key: str
    status: str  # "done" (ran now), "skipped" (already finished), "failed"
    seconds: float = 0.0
    error: str | None = None


def cell_state(cell: Cell, bench_dir: Path) -> str:
    """``new``, ``finished`` (nothing to do), ``partial`` (resume) for a cell's run directory;
    raises :class:`UserError` when the directory holds a run of another configuration."""
    run_dir = bench_dir / cell.relpath
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        return "new"
    try:
        stored = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return "new"
    wanted = _normalised(cell.run_config())
    have = _normalised(stored)
    for key in IDENTITY_KEYS:
        if have.get(key) != wanted.get(key):
            raise UserError(f"{run_dir}: holds a run with another {key} than this bench's cell {cell.key} "
                            f"(the bench YAML changed?); use a new bench directory or delete that run")
    try:
        best = json.loads((run_dir / "best.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "partial"
    if best.get("finished") and best.get("evaluations", 0) >= cell.evaluations:
        return "finished"
    return "partial"


def _normalised(config: dict[str, Any]) -> dict[str, Any]:
    from calibri.core.config import validate

    data = {k: v for k, v in config.items() if k != "versions"}
    data["callbacks"] = []
    data.setdefault("budget", {"evaluations": 1})
    model = validate(data).model_dump(mode="json")
    model["plugins"] = list(model.get("plugins") or [])
    return model


def run_cell(cell: Cell, bench_dir: str) -> CellResult:
    """Run (or resume, or skip) one cell; never raises."""
    started = time.monotonic()
    try:
        from calibri.core.config import validate
        from calibri.core.run import resume_run, start_run

        state = cell_state(cell, Path(bench_dir))
        if state == "finished":
            return CellResult(cell.key, "skipped")
        run_dir = Path(bench_dir) / cell.relpath
        if state == "partial":
            resume_run(run_dir, {"evaluations": cell.evaluations}, quiet=True)
        else:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            start_run(validate(cell.run_config()), run_dir, overwrite=True, quiet=True)
        return CellResult(cell.key, "done", time.monotonic() - started)
    except Exception as exc:  # a failing cell must not take the others down
        message = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        return CellResult(cell.key, "failed", time.monotonic() - started, f"{type(exc).__name__}: {message}")


def run_cells(cells: list[Cell], bench_dir: str | Path, workers: int | None = None,
              progress: bool = True, threads: int | str = "auto") -> list[CellResult]:
    """Run every cell not finished yet, ``workers`` at a time (default: the available cores).

    Parallel cells split the cores' threads (``threads``: ``auto`` an equal share each, a number,
    or ``inherit``): two cells each running BLAS and torch on every core are several times slower
    than one thread each."""
    from tqdm.auto import tqdm

    bench_dir = Path(bench_dir)
    pending, results = [], []
    for cell in cells:  # check every directory first: a mismatching one stops the bench before anything runs
        if cell_state(cell, bench_dir) == "finished":
            results.append(CellResult(cell.key, "skipped"))
        else:
            pending.append(cell)
    workers = max(1, min(workers or available_cores(), len(pending) or 1))
    bar = tqdm(total=len(cells), initial=len(results), unit="cell", desc="bench", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1:
            for cell in pending:
                results.append(_tick(bar, run_cell(cell, str(bench_dir))))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            per_cell = resolve_threads(threads, workers, "threads")
            limits = {} if per_cell is None else {"initializer": limit_threads, "initargs": (per_cell,)}
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method),
                                     **limits) as pool:
                futures = [pool.submit(run_cell, cell, str(bench_dir)) for cell in pending]
                for future in as_completed(futures):
                    results.append(_tick(bar, future.result()))
    finally:
        bar.close()
    order = {cell.key: i for i, cell in enumerate(cells)}
    return sorted(results, key=lambda r: order[r.key])


def _tick(bar: Any, result: CellResult) -> CellResult:
    bar.update(1)
    failed = getattr(bar, "_failed", 0) + (result.status == "failed")
    bar._failed = failed
    if failed:
        bar.set_postfix(failed=failed, refresh=False)
    return result


