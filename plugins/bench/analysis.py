"""The numbers behind the report: per-run best-so-far curves, runtime ECDFs over (problem, target)
pairs (all functions and per BBOB group), expected running times and success rates per function,
fixed-budget rankings with paired sign tests and Holm's correction, win rates, and wall-clock /
optimiser overhead per evaluation.

Repetitions follow COCO: a function's runs are all its instances × seeds. Whatever is pooled
across functions is pooled by ranks (mean ranks, wins, sign tests, win rates), never by raw
precision, whose scale differs from function to function."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cells import Cell, Problem

#: The 51 standard BBOB targets on precision f - f_opt: 10^2, 10^1.8, ..., 10^-8.
STANDARD_TARGETS = 10.0 ** np.linspace(2, -8, 51)
#: Precision below the last target counts as solved: rankings and tests treat such values as ties.
FINAL_TARGET = 1e-8
#: The targets of the per-function ERT tables in report.md (ert.csv has all 51).
ERT_TARGETS = (1e1, 1e-1, 1e-3, 1e-5, 1e-8)
#: The level the report's tests are read at.
ALPHA = 0.05
#: BBOB's function groups: (key, description, functions). The five noiseless groups partition
#: f1–f24 by their properties; the three noisy ones partition f101–f130 by noise strength.
GROUPS: tuple[tuple[str, str, range], ...] = (
    ("separable", "separable (f1–f5)", range(1, 6)),
    ("moderate", "low or moderate conditioning (f6–f9)", range(6, 10)),
    ("ill-conditioned", "high conditioning, unimodal (f10–f14)", range(10, 15)),
    ("multimodal", "multimodal, adequate global structure (f15–f19)", range(15, 20)),
    ("weakstructure", "multimodal, weak global structure (f20–f24)", range(20, 25)),
    ("noisy-moderate", "moderate noise (f101–f106)", range(101, 107)),
    ("noisy-severe", "severe noise (f107–f121)", range(107, 122)),
    ("noisy-multimodal", "severe noise, multimodal (f122–f130)", range(122, 131)),
)


def function_group(function: int | None) -> str | None:
    """The key of the BBOB group ``function`` belongs to (``None`` for other problems)."""
    for key, _, members in GROUPS:
        if function is not None and function in members:
            return key
    return None


@dataclass
class RunData:
    """One finished cell: its best-so-far curve (``best[k]`` after ``k + 1`` evaluations) on
    precision when the problem's optimum is known, else on the loss."""

    problem: Problem
    optimizer: str
    seed: int
    best: np.ndarray
    has_precision: bool
    elapsed: float            # the run loop's seconds (objective + optimiser + calibri's bookkeeping)
    objective_seconds: float  # sum of the evaluations' wall times
    evaluations: int
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def at(self, budget: int) -> float:
        """Best-so-far after ``budget`` evaluations (the last value if the run is shorter)."""
        if len(self.best) == 0:
            return math.inf
        return float(self.best[min(budget, len(self.best)) - 1])


def cell_records(cell: Cell, bench_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A cell's trial records (cut to the cell's budget) and its best.json."""
    run_dir = Path(bench_dir) / cell.relpath
    best = json.loads((run_dir / "best.json").read_text(encoding="utf-8"))
    records = []
    with open(run_dir / "trials.jsonl", encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            records.append(json.loads(line))
            if len(records) >= cell.evaluations:
                break
    return records, best


def losses_and_precision(records: Sequence[dict[str, Any]], direction: str,
                         f_opt: float | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Per evaluation: the loss (NaN when failed) and the precision (``None`` when unknown)."""
    sign = -1.0 if direction == "maximize" else 1.0
    loss = np.array([sign * r["value"] if r.get("status", "ok") == "ok" and r.get("value") is not None else np.nan
                     for r in records], dtype=np.float64)
    metric = [(r.get("metrics") or {}).get("precision") for r in records]
    if records and all(m is not None or r.get("status", "ok") != "ok" for m, r in zip(metric, records)):
        return loss, np.array([np.nan if m is None else float(m) for m in metric], dtype=np.float64)
    if f_opt is not None:
        return loss, loss - f_opt
    return loss, None


def best_so_far(values: np.ndarray) -> np.ndarray:
    """Running minimum, failures (NaN) ignored; +inf until the first success."""
    filled = np.where(np.isnan(values), np.inf, values)
    return np.minimum.accumulate(filled) if len(filled) else filled


def load_run(cell: Cell, bench_dir: Path, keep_records: bool = False) -> RunData:
    records, best = cell_records(cell, bench_dir)
    loss, precision = losses_and_precision(records, best.get("direction", "minimize"), cell.problem.f_opt)
    curve = best_so_far(precision if precision is not None else loss)
    objective_seconds = float(sum(r.get("wall_time") or 0.0 for r in records))
    elapsed = float(best.get("elapsed_seconds") or 0.0)
    total = int(best.get("evaluations") or len(records))
    if total > len(records) and total:  # the run went past this bench's budget: scale its time
        elapsed *= len(records) / total
    return RunData(cell.problem, cell.optimizer, cell.seed, curve, precision is not None, elapsed,
                   objective_seconds, len(records), records if keep_records else [])


# -- runtimes and ECDFs ---------------------------------------------------------------------
def runtimes(best: np.ndarray, targets: Sequence[float] = STANDARD_TARGETS) -> np.ndarray:
    """For each target, the number of evaluations until ``best`` first reaches it (``inf`` if never)."""
    best = np.asarray(best, dtype=np.float64)
    out = np.full(len(targets), np.inf)
    for i, target in enumerate(targets):
        hit = np.flatnonzero(best <= target)
        if hit.size:
            out[i] = hit[0] + 1
    return out


def ecdf(runtime_values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The fraction of (problem, target) runtimes at most each budget of ``grid``."""
    runtime_values = np.sort(np.asarray(runtime_values, dtype=np.float64).ravel())
    if runtime_values.size == 0:
        return np.zeros(len(grid))
    return np.searchsorted(runtime_values, np.asarray(grid, dtype=np.float64), side="right") / runtime_values.size


def ecdf_area(fractions: np.ndarray) -> float:
    """The normalised area under an ECDF drawn on a log-spaced grid (1: every target at once)."""
    fractions = np.asarray(fractions, dtype=np.float64)
    return float(fractions.mean()) if fractions.size else 0.0


def log_grid(max_evaluations: int, dimension: int, points: int = 200) -> np.ndarray:
    """Budgets in evaluations, log-spaced from 1 to ``max_evaluations`` (the ECDF's x axis is ÷ d)."""
    return np.unique(np.round(np.logspace(0, math.log10(max(max_evaluations, 1)), points)))


def ecdf_by_optimizer(runs: Sequence[RunData], max_evaluations: int, dimension: int) -> dict[str, Any]:
    """ECDF curve, final fraction and area per optimiser, over every (problem, seed, target) triple."""
    grid = log_grid(max_evaluations, dimension)
    out: dict[str, Any] = {"grid": grid, "curves": {}, "final": {}, "area": {}}
    by_optimizer: dict[str, list[np.ndarray]] = {}
    for run in runs:
        if run.has_precision:
            by_optimizer.setdefault(run.optimizer, []).append(runtimes(run.best[:max_evaluations]))
    for optimizer, values in by_optimizer.items():
        curve = ecdf(np.concatenate(values), grid)
        out["curves"][optimizer], out["final"][optimizer], out["area"][optimizer] = curve, float(curve[-1]), \
            ecdf_area(curve)
    return out


def fraction_of_targets(curves: Sequence[np.ndarray], targets: Sequence[float] = STANDARD_TARGETS) -> float:
    """The fraction of (run, target) pairs reached by the end of the runs."""
    reached = [np.isfinite(runtimes(curve, targets)) for curve in curves]
    return float(np.mean(np.concatenate(reached))) if reached else 0.0


def expected_running_time(curves: Sequence[np.ndarray], targets: Sequence[float]
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per target, over runs given as best-so-far curves (each as long as its budget): the ERT,
    the successes and the evaluations spent. A run spends its runtime when it reaches the target
    and its whole budget when not; ERT = evaluations spent / successes (∞ without a success)."""
    spent = np.zeros(len(targets))
    successes = np.zeros(len(targets), dtype=int)
    for curve in curves:
        times = runtimes(curve, targets)
        hit = np.isfinite(times)
        spent += np.where(hit, times, len(curve))
        successes += hit
    with np.errstate(divide="ignore", invalid="ignore"):
        ert = np.where(successes > 0, spent / np.maximum(successes, 1), np.inf)
    return ert, successes, spent


def runs_by_function(runs: Sequence[RunData]) -> dict[str, list[RunData]]:
    """Runs with a known precision grouped by function: a function's repetitions are its
    instances × seeds (``Problem.function_label``), in order of appearance."""
    out: dict[str, list[RunData]] = {}
    for run in runs:
        if run.has_precision:
            out.setdefault(run.problem.function_label, []).append(run)
    return out


def ert_rows(runs: Sequence[RunData], max_evaluations: int,
             targets: Sequence[float] = STANDARD_TARGETS) -> list[dict[str, Any]]:
    """One row per (function, optimiser, target): runs (instances × seeds), successes, success
    rate, evaluations spent and ERT, each run cut at ``max_evaluations``."""
    rows = []
    for label, items in runs_by_function(runs).items():
        by_optimizer: dict[str, list[RunData]] = {}
        for run in items:
            by_optimizer.setdefault(run.optimizer, []).append(run)
        for optimizer, group in by_optimizer.items():
            curves = [run.best[:max_evaluations] for run in group]
            ert, successes, spent = expected_running_time(curves, targets)
            problem = group[0].problem
            for t, target in enumerate(targets):
                rows.append({"dimension": problem.dimension, "function": label,
                             "group": function_group(problem.function) or "", "optimizer": optimizer,
                             "target": float(target), "runs": len(group), "successes": int(successes[t]),
                             "success_rate": float(successes[t] / len(group)), "evaluations": float(spent[t]),
                             "ert": float(ert[t])})
    return rows


def final_precision(runs: Sequence[RunData], budget: int) -> dict[tuple[str, str], float]:
    """Median best-so-far precision at ``budget`` over each (function, optimiser)'s repetitions:
    a per-function number, never pooled across functions."""
    values: dict[tuple[str, str], list[float]] = {}
    for label, items in runs_by_function(runs).items():
        for run in items:
            values.setdefault((label, run.optimizer), []).append(run.at(budget))
    return {key: float(np.median(v)) for key, v in values.items()}


def repetitions(runs: Sequence[RunData]) -> dict[str, Any]:
    """How the runs repeat: functions, instances, seeds, and runs per (function, optimiser)."""
    counts: dict[tuple[str, str], int] = {}
    for run in runs:
        counts[(run.problem.function_label, run.optimizer)] = counts.get((run.problem.function_label,
                                                                           run.optimizer), 0) + 1
    per_function = sorted(set(counts.values()))
    return {"functions": len({run.problem.function_label for run in runs}),
            "instances": sorted({run.problem.instance for run in runs if run.problem.instance is not None}),
            "seeds": sorted({run.seed for run in runs}),
            "runs_per_function": per_function[0] if len(per_function) == 1 else per_function or 0}


# -- statistics -----------------------------------------------------------------------------
def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1), in input order."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def comparable(value: float, has_precision: bool) -> float:
    """What rankings compare: log10 precision floored at the final target, else the raw loss."""
    if has_precision:
        return math.log10(max(value, FINAL_TARGET)) if math.isfinite(value) else math.inf
    return value


def block_matrix(runs: Sequence[RunData], budget_of: Any, optimizers: Sequence[str]
                 ) -> tuple[list[tuple[str, int]], np.ndarray, np.ndarray]:
    """Rows = (problem, seed) blocks where every optimiser ran; columns = optimisers.
    Returns the blocks, the comparable values and the raw best-so-far values at each block's budget."""
    table: dict[tuple[str, int], dict[str, RunData]] = {}
    for run in runs:
        table.setdefault((run.problem.label, run.seed), {})[run.optimizer] = run
    blocks = [key for key, row in table.items() if all(o in row for o in optimizers)]
    values = np.full((len(blocks), len(optimizers)), np.nan)
    raw = np.full((len(blocks), len(optimizers)), np.nan)
    for i, key in enumerate(blocks):
        for j, optimizer in enumerate(optimizers):
            run = table[key][optimizer]
            raw[i, j] = run.at(budget_of(run.problem))
            values[i, j] = comparable(raw[i, j], run.has_precision)
    return blocks, values, raw


def sign_test(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Two-sided exact sign test of paired values (lower is better): the p-value and the number
    of untied pairs it rests on. Only which of a pair is better counts, so blocks of different
    functions pool without their precisions' scales mixing; ties (NaN included) are dropped."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    better, worse = int(np.sum(a < b)), int(np.sum(a > b))
    n = better + worse
    if n == 0:
        return 1.0, 0
    tail = sum(math.comb(n, i) for i in range(min(better, worse) + 1))
    return min(1.0, 2.0 * tail / 2.0 ** n), n


def smallest_p(blocks: int) -> float:
    """The smallest two-sided p a sign test (or an exact Wilcoxon signed-rank test) can give on
    ``blocks`` untied pairs: all of one sign, 2 · 2^-n. With 3 blocks it is 0.25."""
    return 1.0 if blocks < 1 else min(1.0, 2.0 ** (1 - blocks))


def blocks_needed(comparisons: int, alpha: float = ALPHA) -> int:
    """The fewest untied blocks with which ``comparisons`` Holm-corrected sign tests can reach ``alpha``."""
    return 1 + math.ceil(math.log2(max(comparisons, 1) / alpha))


def ranking(values: np.ndarray, optimizers: Sequence[str], alpha: float = ALPHA) -> list[dict[str, Any]]:
    """Mean rank (1 = best; ties share), wins (best or tied best in a block), and a paired sign
    test of each optimiser against the best-ranked one, Holm-corrected. Each row says whether its
    test could reach ``alpha`` at all with its untied blocks (``reachable``; the Holm-corrected
    p is at least the number of comparisons times the smallest achievable p)."""
    from scipy.stats import rankdata

    if values.size == 0:
        return []
    ranks = np.vstack([rankdata(row, method="average") for row in values])
    mean_rank = ranks.mean(axis=0)
    best = int(np.argmin(mean_rank))
    wins = (values == values.min(axis=1, keepdims=True)).sum(axis=0)
    others = [j for j in range(len(optimizers)) if j != best]
    tests = {j: sign_test(values[:, j], values[:, best]) for j in others}
    adjusted = dict(zip(others, holm([tests[j][0] for j in others]))) if others else {}
    floor = len(others) * smallest_p(max((n for _, n in tests.values()), default=0))
    rows = []
    for j, name in enumerate(optimizers):
        p, untied = tests.get(j, (None, None))
        row = {"optimizer": name, "mean_rank": float(mean_rank[j]), "wins": int(wins[j]),
               "blocks": int(values.shape[0]), "reference": j == best, "p_value": p, "p_holm": adjusted.get(j),
               "untied": untied, "smallest_p": None if untied is None else smallest_p(untied)}
        row["reachable"] = None if untied is None else bool(smallest_p(untied) <= alpha and floor <= alpha)
        rows.append(row)
    return sorted(rows, key=lambda row: row["mean_rank"])


def significance_note(blocks: int, comparisons: int, alpha: float = ALPHA) -> str | None:
    """A sentence saying why no test of a ranking table can reach ``alpha`` with ``blocks``
    blocks, or ``None`` when they can."""
    if comparisons < 1:
        return None
    floor = smallest_p(blocks)
    if comparisons * floor <= alpha:
        return None
    holm_part = (f" ({comparisons} × that = {min(1.0, comparisons * floor):.3g} after Holm's correction over "
                 f"{comparisons} comparisons)" if comparisons > 1 else "")
    return (f"Too few blocks for a test: with {blocks} block{'s' if blocks != 1 else ''} the smallest two-sided "
            f"p-value the sign test can give is 2^(1−{blocks}) = {floor:.3g}{holm_part}, above α = {alpha:g}, so "
            f"no difference here can be significant and no p-value is shown; at least "
            f"{blocks_needed(comparisons, alpha)} untied blocks (more instances or seeds) are needed.")


def win_rates(values: np.ndarray) -> np.ndarray:
    """``W[a, b]``: the share of blocks where optimiser a beats b (a tie counts one half)."""
    k = values.shape[1]
    out = np.full((k, k), np.nan)
    for a in range(k):
        for b in range(k):
            if a != b and values.shape[0]:
                out[a, b] = float(np.mean((values[:, a] < values[:, b]) + 0.5 * (values[:, a] == values[:, b])))
    return out


def overhead(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Per optimiser: wall-clock, objective and overhead (wall − objective) per evaluation, in ms,
    medians over its cells, and the total wall-clock."""
    by_optimizer: dict[str, list[RunData]] = {}
    for run in runs:
        by_optimizer.setdefault(run.optimizer, []).append(run)
    rows = []
    for optimizer, items in by_optimizer.items():
        items = [r for r in items if r.evaluations]
        if not items:
            continue
        wall = np.array([r.elapsed / r.evaluations for r in items]) * 1e3
        objective = np.array([r.objective_seconds / r.evaluations for r in items]) * 1e3
        rows.append({"optimizer": optimizer, "cells": len(items), "total_seconds": float(sum(r.elapsed for r in items)),
                     "wall_ms": float(np.median(wall)), "objective_ms": float(np.median(objective)),
                     "overhead_ms": float(np.median(wall - objective))})
    return rows


def convergence(runs: Sequence[RunData], max_evaluations: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per optimiser on one function: the 25th, 50th and 75th percentiles over its repetitions
    (instances × seeds) of best-so-far against evaluations 1..max."""
    by_optimizer: dict[str, list[np.ndarray]] = {}
    for run in runs:
        curve = run.best[:max_evaluations]
        if len(curve) < max_evaluations and len(curve):
            curve = np.concatenate([curve, np.full(max_evaluations - len(curve), curve[-1])])
        if len(curve):
            by_optimizer.setdefault(run.optimizer, []).append(curve)
    out = {}
    for optimizer, curves in by_optimizer.items():
        stack = np.vstack(curves)
        q25, q50, q75 = np.percentile(stack, [25, 50, 75], axis=0)
        out[optimizer] = (q25, q50, q75)
    return out


# -- calibration problems: cost in images, score on held-out prompts ----------------------------
@dataclass
class CalibrationRun(RunData):
    """One finished calibration cell, on its own axes: ``best[k]`` is the run's selected held-out
    validation loss (the best validated point so far: what the run would return if stopped) after
    ``k + 1`` training images. Validation images are counted apart: they pick the result but are
    not the optimiser's cost, and every set-up validates on the same schedule."""

    direction: str = "maximize"
    training_images: int = 0
    validation_images: int = 0
    #: (training images so far, validated value, selected value so far) per validation record
    validations: list[tuple[int, float | None, float | None]] = field(default_factory=list)

    def reward(self, loss: float) -> float:
        """A loss of this run as the objective's value (the reward, for a maximised reward)."""
        return -loss if self.direction == "maximize" else loss

    def loss(self, value: float) -> float:
        return -value if self.direction == "maximize" else value

    @property
    def final(self) -> float | None:
        """The selected validation value at the end of the run (None: nothing validated)."""
        return None if not len(self.best) or not math.isfinite(self.best[-1]) else self.reward(float(self.best[-1]))


def image_counts(records: Sequence[dict[str, Any]], problem: Any) -> list[int]:
    """Images each evaluation generated: the objective's ``n_images`` artifact (its round's bucket
    size × step counts), or what the problem's candidates make in that round where a record has
    none (a failed candidate)."""
    from calibri.plugins.dit.buckets import BucketSchedule

    schedule = BucketSchedule(problem.images_schedule or ((0, int(problem.images_per_evaluation or 0)),))
    out = []
    for record in records:
        n = (record.get("artifacts") or {}).get("n_images")
        fixed = isinstance(n, (int, float)) and not isinstance(n, bool)
        out.append(int(n) if fixed else schedule.size(int(record.get("round", 0))))
    return out


def load_calibration_run(cell: Cell, bench_dir: Path) -> CalibrationRun:
    """A calibration cell's validation curve on the training-image axis (see :class:`CalibrationRun`)."""
    records, best = cell_records(cell, bench_dir)
    direction = best.get("direction", "maximize")
    images = image_counts(records, cell.problem)
    after_round: dict[int, int] = {0: 0}
    total = 0
    for record, n in zip(records, images):
        total += n
        after_round[int(record["round"]) + 1] = total
    rounds = max(after_round)
    validation: list[dict[str, Any]] = []
    path = Path(bench_dir) / cell.relpath / "validation.jsonl"
    if path.exists():
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.endswith("\n"):
                    validation.append(json.loads(line))
    validation = [v for v in validation if int(v.get("after_round", 0)) <= rounds]
    sign = -1.0 if direction == "maximize" else 1.0
    curve = np.full(total, np.inf)
    points: list[tuple[int, float | None, float | None]] = []
    selected = math.inf
    for record in validation:
        at = after_round.get(int(record["after_round"]), total)
        value = record.get("value") if record.get("status", "ok") == "ok" else None
        if value is not None:
            selected = min(selected, sign * float(value))
            curve[max(at - 1, 0):] = np.minimum(curve[max(at - 1, 0):], sign * float(value))
        points.append((at, value, sign * selected if math.isfinite(selected) else None))
    objective_seconds = float(sum(r.get("wall_time") or 0.0 for r in records))
    elapsed = float(best.get("elapsed_seconds") or 0.0)
    if int(best.get("evaluations") or len(records)) > len(records) and records:  # run went past the budget
        elapsed *= len(records) / int(best["evaluations"])
    return CalibrationRun(cell.problem, cell.optimizer, cell.seed, curve, False, elapsed, objective_seconds,
                          len(records), direction=direction, training_images=total,
                          validation_images=len(validation) * int(cell.problem.images_per_validation or 0),
                          validations=points)


def calibration_target(runs: Sequence[CalibrationRun], reference: str, target: float | str) -> dict[str, Any]:
    """The target validation value: a number, or the median or worst of the reference set-up's final
    selected validation values over its seeds."""
    finals = [run.final for run in runs if run.optimizer == reference and run.final is not None]
    direction = runs[0].direction if runs else "maximize"
    if not isinstance(target, str):
        return {"value": float(target), "how": "given", "reference_finals": finals}
    if not finals:
        return {"value": None, "how": f"no finished {reference} run", "reference_finals": finals}
    if target == "median":
        value = float(np.median(finals))
    else:  # the reference's worst seed: it reaches the target on every seed
        value = float(min(finals) if direction == "maximize" else max(finals))
    return {"value": value, "how": f"the {target} of {reference}'s final validation values over "
                                   f"{len(finals)} seed{'s' if len(finals) != 1 else ''}", "reference_finals": finals}


def images_to_target(run: CalibrationRun, target: float | None) -> float:
    """Training images until the run's selected validation value first reaches ``target`` (∞ never)."""
    if target is None:
        return math.inf
    return float(runtimes(run.best, [run.loss(target)])[0])


def calibration_comparison(runs: Sequence[CalibrationRun], optimizers: Sequence[str], reference: str,
                           target: float | None, alpha: float = ALPHA) -> list[dict[str, Any]]:
    """Per optimiser: images to target per seed, ERT in images, the per-seed ratio to the reference
    (median over seeds where both reach the target), and two paired two-sided sign tests over the
    seeds, Holm-corrected over the optimisers: fewer images than the reference (``p_fewer``), and
    fewer than half of the reference's (``p_half``, the halving goal). A seed where neither reaches
    the target is a tie; one where only one does counts for it. Final selected validation values
    (median, quartiles) and costs come with it."""
    by: dict[str, dict[int, CalibrationRun]] = {}
    for run in runs:
        by.setdefault(run.optimizer, {})[run.seed] = run
    ref = by.get(reference, {})
    rows = []
    for name in optimizers:
        items = by.get(name, {})
        if not items:
            continue
        seeds = sorted(items)
        hits = {s: images_to_target(items[s], target) for s in seeds}
        ert, successes, _ = expected_running_time([items[s].best for s in seeds],
                                                  [items[seeds[0]].loss(target)] if target is not None else [])
        finals = [items[s].final for s in seeds if items[s].final is not None]
        paired = [s for s in seeds if s in ref]
        ref_hits = {s: images_to_target(ref[s], target) for s in paired}
        ratios = [hits[s] / ref_hits[s] for s in paired if math.isfinite(hits[s]) and math.isfinite(ref_hits[s])
                  and ref_hits[s] > 0]
        row: dict[str, Any] = {
            "optimizer": name, "seeds": seeds, "reference": name == reference,
            "images_to_target": {str(s): hits[s] for s in seeds},
            "reached": int(sum(math.isfinite(v) for v in hits.values())),
            "ert_images": float(ert[0]) if len(ert) else math.inf,
            "median_ratio": float(np.median(ratios)) if ratios else None, "ratios": ratios,
            "final_median": float(np.median(finals)) if finals else None,
            "final_q25": float(np.percentile(finals, 25)) if finals else None,
            "final_q75": float(np.percentile(finals, 75)) if finals else None,
            "images_per_evaluation": items[seeds[0]].problem.images_per_evaluation,
            "images_per_candidate": items[seeds[0]].problem.images_label,  # a schedule's steps too
            "training_images": int(np.median([items[s].training_images for s in seeds])),
            "validation_images": int(np.median([items[s].validation_images for s in seeds])),
            "evaluations": int(np.median([items[s].evaluations for s in seeds])),
            "wall_seconds": float(sum(items[s].elapsed for s in seeds)),
            "wall_seconds_median": float(np.median([items[s].elapsed for s in seeds])),
            "paired_seeds": len(paired)}
        if name != reference and paired:
            mine = np.array([hits[s] for s in paired])
            theirs = np.array([ref_hits[s] for s in paired])
            row["p_fewer"], row["untied_fewer"] = sign_test(mine, theirs)
            row["p_half"], row["untied_half"] = sign_test(mine, 0.5 * theirs)
            row["wins_fewer"] = int(np.sum(mine < theirs))
            row["wins_half"] = int(np.sum(mine < 0.5 * theirs))
            ref_finals = np.array([ref[s].final if ref[s].final is not None else np.nan for s in paired])
            own = np.array([items[s].final if items[s].final is not None else np.nan for s in paired])
            sign = -1.0 if items[seeds[0]].direction == "maximize" else 1.0
            row["p_final"], row["untied_final"] = sign_test(sign * own, sign * ref_finals)
            row["better_final"] = int(np.sum(sign * own < sign * ref_finals))
        rows.append(row)
    for key in ("p_fewer", "p_half", "p_final"):
        tested = [row for row in rows if key in row]
        for row, adjusted in zip(tested, holm([row[key] for row in tested])):
            row[key.replace("p_", "p_holm_")] = float(adjusted)
    ref_row = next((row for row in rows if row["reference"]), None)
    for row in rows:
        if ref_row is not None and math.isfinite(row["ert_images"]) and math.isfinite(ref_row["ert_images"]) \
                and ref_row["ert_images"] > 0:
            row["ert_ratio"] = row["ert_images"] / ref_row["ert_images"]
        else:
            row["ert_ratio"] = None
    return rows
