"""Every evaluation of a bench as a tidy CSV, in IOHprofiler's format (IOHanalyzer) and, for BBOB
cells in COCO's dimensions, in COCO's format (cocopp)."""
from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .analysis import RunData
from .cells import Cell, safe

CSV_NAME = "evaluations.csv.gz"
CSV_COLUMNS = ("problem", "function", "dimension", "instance", "optimizer", "seed", "evaluation", "round",
               "value", "precision", "best", "wall_time", "status")


def write_tidy_csv(runs: Sequence[RunData], path: Path) -> Path:
    """One row per evaluation (``best``: best-so-far precision, or loss where f_opt is unknown).
    The parameters stay in each cell's ``trials.jsonl``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8", newline="", compresslevel=5) as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for run in runs:
            p = run.problem
            for k, record in enumerate(run.records):
                precision = (record.get("metrics") or {}).get("precision")
                if precision is None and p.f_opt is not None and record.get("value") is not None:
                    precision = record["value"] - p.f_opt
                writer.writerow((p.label, p.function if p.function is not None else "", p.dimension,
                                 p.instance if p.instance is not None else "", run.optimizer, run.seed, k + 1,
                                 record.get("round"), _num(record.get("value")), _num(precision),
                                 _num(run.best[k]), _num(record.get("wall_time")), record.get("status", "ok")))
    os.replace(tmp, path)
    return path


def _num(value: Any) -> str:
    if value is None:
        return ""
    value = float(value)
    return repr(value) if np.isfinite(value) else ""


# -- IOHprofiler / IOHanalyzer ----------------------------------------------------------------
#: IOHprofiler function ids of problems other than BBOB's (past the noisy f101–f130).
FIRST_OTHER_ID = 201


def write_iohprofiler(runs: Sequence[RunData], root: Path) -> Path:
    """IOHprofiler's JSON + .dat format, one folder per optimiser (zip it, or point IOHanalyzer at
    it). BBOB problems keep their function ids (f101–f130 the noisy ones); other problems get ids
    from 201 on. A function's runs are its instances × seeds. ``raw_y`` is the precision (the loss
    where f_opt is unknown); each run logs its improvements."""
    if root.exists():
        shutil.rmtree(root)
    ids: dict[str, tuple[int, str]] = {}
    others = 0
    for run in runs:
        p = run.problem
        if p.label not in ids:
            if p.function is not None:
                ids[p.label] = (p.function, _bbob_name(p.function))
            else:
                ids[p.label] = (FIRST_OTHER_ID + others, safe(p.label))
                others += 1
    grouped: dict[tuple[str, int, str], dict[int, list[RunData]]] = {}
    for run in runs:
        fid, fname = ids[run.problem.label]
        grouped.setdefault((run.optimizer, fid, fname), {}).setdefault(run.problem.dimension, []).append(run)
    for (optimizer, fid, fname), by_dim in grouped.items():
        folder = root / safe(optimizer)
        scenarios = []
        for dimension, items in sorted(by_dim.items()):
            rel = f"data_f{fid}_{fname}/IOHprofiler_f{fid}_DIM{dimension}.dat"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            runs_json, lines = [], []
            for run in sorted(items, key=lambda r: (r.problem.instance or 1, r.seed)):
                lines.append("evaluations raw_y\n")
                last = np.inf
                best_eval = 0
                for k, value in enumerate(run.best):
                    if value < last:
                        lines.append(f"{k + 1} {value:.10e}\n")
                        last, best_eval = value, k + 1
                runs_json.append({"instance": run.problem.instance or 1, "evals": int(len(run.best)),
                                  "best": {"evals": best_eval, "y": float(last) if np.isfinite(last) else None}})
            (folder / rel).write_text("".join(lines), encoding="utf-8")
            scenarios.append({"dimension": dimension, "path": rel, "runs": runs_json})
        suite = "BBOB" if fid <= 24 else "BBOB-noisy" if fid < FIRST_OTHER_ID else "calibri"
        info = {"version": "0.3.5", "suite": suite, "function_id": fid,
                "function_name": fname, "maximization": False,
                "algorithm": {"name": optimizer, "info": "calibri bench"},
                "attributes": ["evaluations", "raw_y"], "scenarios": scenarios}
        (folder / f"IOHprofiler_f{fid}_{fname}.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return root


def _bbob_name(function: int) -> str:
    if function > 100:  # ioh has no noisy BBOB functions to name them
        return f"bbob_noisy_f{function}"
    try:
        import ioh

        return ioh.get_problem(function, 1, 2, ioh.ProblemClass.BBOB).meta_data.name
    except Exception:  # pragma: no cover - ioh missing
        return f"bbob_f{function}"


# -- COCO / cocopp ----------------------------------------------------------------------------
def write_coco(runs: Sequence[RunData], cells: Sequence[Cell], bench_dir: Path, root: Path) -> Path | None:
    """COCO's bbob logger output (``.info``/``.dat``/``.tdat``, what cocopp reads), one folder per
    optimiser, made by replaying every evaluation of the BBOB cells in COCO's dimensions through
    ``cocoex``'s observer. Noisy cells (f101–f130) replay through COCO's ``bbob-noisy`` suite,
    whose logger records the noise-free value of each evaluated point (COCO's measure for noisy
    functions). Returns ``None`` when there is nothing to export or cocoex is missing."""
    try:
        import cocoex
    except ImportError:
        return None
    from calibri.plugins.bbob import COCO_DIMENSIONS, coco_problem

    from .analysis import cell_records

    chosen = [c for c in cells if c.problem.is_bbob and c.problem.dimension in COCO_DIMENSIONS]
    if not chosen:
        return None
    bench_dir, root = Path(bench_dir).resolve(), Path(root).resolve()  # cocoex needs the cwd changed
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    cocoex.log_level("warning")
    cwd = os.getcwd()
    os.chdir(root)  # cocoex writes under ./exdata/
    try:
        by_optimizer: dict[str, list[Cell]] = {}
        for cell in chosen:
            by_optimizer.setdefault(cell.optimizer, []).append(cell)
        for optimizer, items in by_optimizer.items():
            observer = cocoex.Observer("bbob", f"result_folder: {safe(optimizer)} algorithm_name: {safe(optimizer)}")
            items = sorted(items, key=lambda c: (c.problem.function, c.problem.dimension, c.problem.instance, c.seed))
            for cell in items:
                p = cell.problem
                suite, problem = coco_problem(p.function, p.dimension, p.instance)
                problem.observe_with(observer)
                records, _ = cell_records(cell, bench_dir)
                names = [f"x[{i}]" for i in range(p.dimension)]
                for record in records:
                    problem(np.array([record["params"][n] for n in names], dtype=np.float64))
                problem.free()
                del suite
            del observer
    finally:
        os.chdir(cwd)
    return root / "exdata"
