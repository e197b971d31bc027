"""The bench report: ``report.md`` with PNGs next to it (runtime ECDFs over all functions and per
BBOB group, convergence curves, win-rate matrices) and tables (ERT and success rates per
function, rankings per budget, overhead per evaluation); ``ert.csv`` and ``summary.json`` hold
the numbers for scripts."""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import analysis
from .analysis import RunData
from .cells import budget_evaluations
from .config import BenchConfig


def _plt():
    from calibri.core.report import pyplot

    plt = pyplot("bench plots")
    if plt is None:
        raise ImportError("calibri bench draws its report with matplotlib: pip install 'calibri[bench]'")
    return plt


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def build_report(config: BenchConfig, runs: Sequence[RunData], bench_dir: Path,
                 failed: Sequence[str] = (), calibration: Sequence[analysis.CalibrationRun] = ()) -> dict[str, Any]:
    """Write report.md, the PNGs, ert.csv and summary.json into ``bench_dir``; return the summary.
    Calibration problems are reported from ``calibration`` (images and validation reward), not
    with the generic views of ``runs``."""
    optimizers = [spec.key for spec in config.optimizers]
    runs = [run for run in runs if not run.problem.is_calibration]
    dims = sorted({run.problem.dimension for run in runs})
    reps = analysis.repetitions(runs)
    lines = [f"# Bench report: {config.name or bench_dir.name}", ""]
    functions = len({r.problem.function if r.problem.function_label != r.problem.label else r.problem.label
                     for r in runs})
    if not runs:
        lines += [f"{_plural(len({r.problem.label for r in calibration}), 'calibration problem')} × "
                  f"{_plural(len(optimizers), 'optimiser')}, {_plural(len(calibration), 'finished cell')}"
                  + (f" ({len(failed)} failed: {', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''})"
                     if failed else "") + ".", ""]
    else:
        lines += [f"{_plural(functions, 'function')} in {_plural(len(dims), 'dimension')} × "
                  f"{_plural(len(optimizers), 'optimiser')}, {_plural(len(runs), 'finished cell')}"
                  + (f" ({len(failed)} failed: {', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''})"
                     if failed else "") + ".",
                  _repetition_sentence(reps, any(r.problem.instance is None for r in runs)),
                  f"Same x0 (each problem's), σ = {_fmt(config.sigma) if config.sigma else 'the space default'}, "
                  f"popsize = {config.popsize or '4 + ⌊3 ln d⌋'} and evaluation budget for every optimiser; "
                  f"budgets: {', '.join(b.label for b in config.budgets)}.", ""]
    if any(r.problem.function is not None and r.problem.function > 100 for r in runs):
        lines[-1:-1] = [NOISY_NOTE]
    summary: dict[str, Any] = {"name": config.name, "optimizers": optimizers, "repetitions": reps, "dimensions": {}}
    if calibration:
        summary["calibration"] = {}
        for label in dict.fromkeys(r.problem.label for r in calibration):
            lines += _calibration_section(config, [r for r in calibration if r.problem.label == label], bench_dir,
                                          summary["calibration"])
    all_ert: list[dict[str, Any]] = []
    for d in dims:
        runs_d = [r for r in runs if r.problem.dimension == d]
        budgets = budget_evaluations(config, d)
        max_budget = max(budgets)
        section: dict[str, Any] = {"budgets": budgets}
        lines += [f"## Dimension {d}", ""]
        lines += _ecdf_section(runs_d, d, max_budget, bench_dir, section)
        all_ert += analysis.ert_rows(runs_d, max_budget)
        lines += _ert_section(runs_d, max_budget, section)
        # convergence
        pngs = _plot_convergence(runs_d, max_budget, d, bench_dir)
        lines += ["### Fixed-budget convergence", "",
                  "Per function, the median (line) and inter-quartile range (band) over its repetitions "
                  "(instances × seeds) of the best-so-far precision f − f_opt (the loss where the optimum is "
                  "unknown) against evaluations.", ""]
        lines += [f"![convergence d={d}]({png.name})" for png in pngs] + [""]
        lines += _rankings_section(config, runs_d, budgets, optimizers, section)
        # win-rate matrix at the largest budget
        blocks, values, _ = analysis.block_matrix(runs_d, lambda problem: max_budget, optimizers)
        if blocks:
            matrix = analysis.win_rates(values)
            png = _plot_win_rates(matrix, optimizers, d, max_budget, bench_dir / f"win-rate-d{d}.png")
            section["win_rates"] = matrix.tolist()
            lines += ["### Win rates", "",
                      f"Share of blocks (function × instance × seed) where the row optimiser ends better than the "
                      f"column one at {max_budget} evaluations (ties count one half).", "",
                      f"![win rates d={d}]({png.name})", ""]
            lines += _table(["row beats column", *optimizers],
                            [[a, *(_fmt(matrix[i, j], 2) for j in range(len(optimizers)))]
                             for i, a in enumerate(optimizers)])
            lines.append("")
        # overhead
        rows = analysis.overhead(runs_d)
        section["overhead"] = rows
        lines += ["### Wall-clock and optimiser overhead", "",
                  "Per evaluation, medians over cells, in milliseconds: the run loop's wall-clock, the "
                  "objective's own time, and the rest (the optimiser's ask/tell plus calibri's trial log and "
                  "per-round checkpoint).", ""]
        lines += _table(["optimiser", "cells", "total s", "wall ms/eval", "objective ms/eval", "overhead ms/eval"],
                        [[r["optimizer"], str(r["cells"]), f"{r['total_seconds']:.1f}", _fmt(r["wall_ms"]),
                          _fmt(r["objective_ms"]), _fmt(r["overhead_ms"])] for r in rows])
        lines.append("")
        summary["dimensions"][str(d)] = section
    if all_ert:
        write_ert_csv(all_ert, bench_dir / ERT_CSV)
    lines += ["## Data", "",
              "- `runs/<problem>/<optimiser>/seed-<s>/`: each cell's calibri run directory (`trials.jsonl`, "
              "`config.yaml`, checkpoints).",
              "- `evaluations.csv.gz`: every evaluation, one tidy row each.",
              *([f"- `{ERT_CSV}`: ERT and success rate per dimension, function, optimiser and each of the 51 "
                 f"targets."] if all_ert else []),
              *(["- `summary.json` → `calibration`: per calibration problem, the target and every optimiser's "
                 "images to target per seed, ratios, tests, final values and costs; each cell's "
                 "`validation.jsonl` holds its validated points."] if calibration else []),
              "- `export/iohprofiler/`: IOHprofiler format for IOHanalyzer; `export/coco/exdata/`: COCO format "
              "for cocopp (BBOB cells in COCO's dimensions).", ""]
    (bench_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
    (bench_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default), encoding="utf-8")
    return summary


ERT_CSV = "ert.csv"
NOISY_NOTE = ("Noisy functions (f101–f130): precision is the measured, noisy f(x) minus the noiseless f_opt, "
              "the same targets as the noiseless functions; COCO's logger (the cocopp export) records the "
              "noise-free value of each evaluated point instead, so cocopp's numbers on them can be better.")
ERT_COLUMNS = ("dimension", "function", "group", "optimizer", "target", "runs", "successes", "success_rate",
               "evaluations", "ert")


def write_ert_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """ERT rows as CSV (``ert`` is ``inf`` where no run reached the target)."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ERT_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row[key] for key in ERT_COLUMNS})
    return path


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _repetition_sentence(reps: dict[str, Any], seeds_only: bool) -> str:
    """Say what the repetitions of a function are: instances × seeds, COCO's instances included."""
    instances, seeds = reps["instances"], reps["seeds"]
    per = reps["runs_per_function"]
    per_text = str(per) if isinstance(per, int) else f"{per[0]} to {per[-1]}"
    if instances:
        return (f"Repetitions: every BBOB function is run on {_plural(len(instances), 'instance')} × "
                f"{_plural(len(seeds), 'seed')}, and all of them count as its repetitions (COCO's convention: "
                f"instances are repetitions, like seeds), {per_text} runs per function and optimiser"
                + ("; the other problems repeat over seeds only" if seeds_only else "")
                + ". A block of the rankings is one (function, instance, seed).")
    return (f"Repetitions: {_plural(len(seeds), 'seed')} per problem, {per_text} runs per problem and optimiser; "
            f"a block of the rankings is one (problem, seed).")


def _ecdf_section(runs: Sequence[RunData], d: int, max_budget: int, bench_dir: Path,
                  section: dict[str, Any]) -> list[str]:
    """The runtime ECDF over all functions, then one per BBOB function group present."""
    ecdf = analysis.ecdf_by_optimizer(runs, max_budget, d)
    if not ecdf["curves"]:
        return []
    png = _plot_ecdf(ecdf, d, bench_dir / f"ecdf-d{d}.png")
    n_functions = len(analysis.runs_by_function(runs))
    groups: dict[str, dict[str, Any]] = {}
    for key, description, members in analysis.GROUPS:
        chosen = [r for r in runs if r.has_precision and r.problem.function in members]
        if not chosen:
            continue
        curves = analysis.ecdf_by_optimizer(chosen, max_budget, d)
        functions = sorted({r.problem.function for r in chosen})
        path = _plot_ecdf(curves, d, bench_dir / f"ecdf-d{d}-{key}.png",
                          f"{description}, {len(functions)} function{'s' if len(functions) != 1 else ''}")
        groups[key] = {"description": description, "functions": functions, "png": path.name,
                       "final": curves["final"], "area": curves["area"]}
    lines = ["### Runtime ECDF", "",
             f"Fraction of (run, target) pairs solved against evaluations / d, over "
             f"{_plural(n_functions, 'function')}, their repetitions and the 51 standard BBOB targets 10^2 … "
             f"10^-8 on f − f_opt. Area: the normalised area under the curve on a log budget axis (1 = every "
             f"target at the first evaluation)."
             + (" Each BBOB function group present gets its own ECDF too, listed below the table." if groups else ""),
             "", f"![ECDF d={d}]({png.name})", ""]
    order = sorted(ecdf["final"], key=lambda o: -ecdf["area"][o])
    header = ["optimiser", "all: reached", "all: area", *(f"{key}: area" for key in groups)]
    lines += _table(header, [[o, _fmt(ecdf["final"][o]), _fmt(ecdf["area"][o]),
                              *(_fmt(groups[key]["area"].get(o)) for key in groups)] for o in order])
    lines.append("")
    if groups:
        lines += [f"- **{key}**: {g['description']}, functions {', '.join(f'f{f}' for f in g['functions'])}: "
                  f"![ECDF {key} d={d}]({g['png']})" for key, g in groups.items()] + [""]
    section["ecdf"] = {"final": ecdf["final"], "area": ecdf["area"], "groups": groups}
    return lines


def _ert_section(runs: Sequence[RunData], max_budget: int, section: dict[str, Any]) -> list[str]:
    """Per-function ERT and success rates at a few targets, and the median final precision."""
    targets = analysis.ERT_TARGETS
    rows = analysis.ert_rows(runs, max_budget, targets)
    if not rows:
        return []
    final = analysis.final_precision(runs, max_budget)
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["function"], row["optimizer"]), []).append(row)
    table = [[function, optimizer, str(items[0]["runs"]),
              *(f"{_fmt(r['ert'])} ({r['successes']}/{r['runs']})" for r in items),
              _fmt(final.get((function, optimizer)))]
             for (function, optimizer), items in by_key.items()]
    section["ert"] = rows
    lines = ["### Expected running time and success rate per function", "",
             f"Per function and optimiser over its runs (instances × seeds) to {max_budget} evaluations: the "
             f"expected running time ERT in evaluations to reach each target on f − f_opt — the evaluations "
             f"spent by all runs (a run that misses the target spends its whole budget) divided by the runs "
             f"that reach it, ∞ when none does — with successful runs / runs in brackets, and the median "
             f"final precision over the function's runs (a per-function number: precisions are never pooled "
             f"across functions). Every target: `{ERT_CSV}`.", ""]
    lines += _table(["function", "optimiser", "runs", *(f"ERT 1e{int(round(math.log10(t)))}" for t in targets),
                     "median final f − f_opt"], table)
    return lines + [""]


def _rankings_section(config: BenchConfig, runs: Sequence[RunData], budgets: Sequence[int],
                      optimizers: Sequence[str], section: dict[str, Any]) -> list[str]:
    """Rankings per budget, pooled across functions by ranks only, with sign tests whose p-values
    are replaced by a sentence where the blocks are too few for them to mean anything."""
    section["rankings"] = {}
    lines = ["### Rankings", "",
             "Per budget, over blocks (function × instance × seed, every optimiser run on each): mean rank "
             "(1 = best, ties share), wins (best or tied best in a block), and a paired two-sided sign test "
             f"against the best-ranked optimiser, Holm-corrected over the comparisons, read at α = "
             f"{analysis.ALPHA:g}. Pooled across functions by ranks only: a block contributes which optimiser "
             "is better, never how much, since precisions of different functions are on different scales "
             "(log10 precision floored at 1e-8 decides within a block: below the last target counts as a tie).",
             ""]
    for spec, budget in zip(config.budgets, budgets):
        blocks, values, _ = analysis.block_matrix(runs, lambda problem, b=budget: b, optimizers)
        rows = analysis.ranking(values, optimizers)
        if not rows:
            continue
        note = analysis.significance_note(len(blocks), len(optimizers) - 1)
        section["rankings"][str(budget)] = {"rows": rows, "blocks": len(blocks),
                                            "smallest_p": analysis.smallest_p(len(blocks)), "note": note}
        lines += [f"#### Budget {spec.label} = {budget} evaluations ({len(blocks)} blocks)", ""]
        if note:
            lines += [f"> {note}", ""]

        def p_cells(row: dict[str, Any]) -> list[str]:
            if row["reference"]:
                return ["–", "–"]
            if note:
                return ["n/a", "n/a"]
            if not row["reachable"]:
                return [f"n/a: {row['untied']} untied blocks, p ≥ {_fmt(row['smallest_p'])}", "n/a"]
            return [_fmt(row["p_value"]), _fmt(row["p_holm"])]

        lines += _table(["optimiser", "mean rank", "wins", "untied blocks", "p (sign test)", "p (Holm)"],
                        [[r["optimizer"] + (" (ref.)" if r["reference"] else ""), f"{r['mean_rank']:.2f}",
                          str(r["wins"]), "–" if r["untied"] is None else str(r["untied"]), *p_cells(r)]
                         for r in rows])
        if not note and any(r["reachable"] is False for r in rows):
            lines += ["", "n/a: too many ties with the reference for that comparison to reach α (its smallest "
                          "possible p, or that times the comparisons after Holm's correction, is above α)."]
        lines.append("")
    return lines


def _calibration_section(config: BenchConfig, runs: Sequence[analysis.CalibrationRun], bench_dir: Path,
                         summary: dict[str, Any]) -> list[str]:
    """A calibration problem: validation value against training images (median, IQR over seeds),
    the reference's final value as the target, images to reach it per optimiser and seed, the
    ratio to the reference with paired sign tests over seeds, final values, costs and wall time."""
    from .cells import safe

    optimizers = [spec.key for spec in config.optimizers]
    problem = runs[0].problem
    reference = config.reference_key
    target = analysis.calibration_target(runs, reference, config.target)
    rows = analysis.calibration_comparison(runs, optimizers, reference, target["value"])
    seeds = sorted({r.seed for r in runs})
    comparisons = sum(1 for row in rows if not row["reference"] and row.get("untied_fewer") is not None)
    note = analysis.significance_note(max((row["paired_seeds"] for row in rows), default=0), comparisons)
    png = _plot_calibration(runs, target["value"], bench_dir / f"calibration-{safe(problem.label)}.png")
    value_name = "reward" if runs[0].direction == "maximize" else "value"
    summary[problem.label] = {"target": target, "reference": reference, "rows": rows, "note": note,
                              "images_per_evaluation": problem.images_per_evaluation,
                              "images_per_validation": problem.images_per_validation, "png": png.name}
    per_candidate = sorted({row["images_per_candidate"] for row in rows if row["images_per_candidate"]},
                           key=lambda label: (len(label), label))
    lines = [f"## Calibration: {problem.label}", "",
             f"d = {problem.dimension} scales; {_plural(len(seeds), 'seed')} per optimiser; budgets: "
             f"{', '.join(b.label for b in config.budgets)} (the largest is what every cell runs). **Cost** is "
             f"training images: every candidate makes bucket size × step counts = "
             f"{' or '.join(per_candidate)} images"
             + (" (per set-up: see the cost table)" if len(per_candidate) > 1 else "")
             + ("; `a→b@r` is a bucket-size schedule: b images from round r on" if any("@" in c for c in per_candidate)
                else "") + ". "
             f"**Score** is the held-out validation {value_name} of the run's selected point (the best "
             f"validated so far: what the run returns if stopped there). Validation images "
             f"({problem.images_per_validation} per validated point) pick the result and are counted apart, not "
             f"as optimiser cost; every set-up validates on the same schedule.", "",
             f"**Target**: validation {value_name} {_fmt(target['value'], 4)}, {target['how']}"
             + (f" ({', '.join(_fmt(v, 4) for v in target['reference_finals'])})"
                if target["reference_finals"] else "") + ".", "",
             f"![validation {value_name} against training images]({png.name})", "",
             "### Images to target", "",
             "Training images until the selected validation value first reaches the target, per seed (∞: not within "
             "the budget); ERT = images spent by all seeds (a seed that misses spends its whole budget) / seeds that "
             f"reach it; ratio: per seed, images ÷ {reference}'s images on the same seed (median over seeds where "
             f"both reach it); sign tests, paired over seeds and two-sided, Holm-corrected over the optimisers: "
             f"fewer images than {reference}, and fewer than half of {reference}'s (the halving goal). A seed where "
             f"neither reaches the target is a tie.", ""]
    if note:
        lines += [f"> {note}", ""]

    def p_text(row: dict[str, Any], kind: str) -> str:
        if row["reference"] or row.get(f"untied_{kind}") is None:
            return "–"
        wins = row.get("better_final" if kind == "final" else f"wins_{kind}")
        head = f"{wins}/{row[f'untied_{kind}']}"
        if note:
            return f"{head}, n/a"
        if analysis.smallest_p(row[f"untied_{kind}"]) * max(comparisons, 1) > analysis.ALPHA:
            return f"{head}, n/a (p ≥ {_fmt(analysis.smallest_p(row[f'untied_{kind}']))})"
        return f"{head}, p = {_fmt(row[f'p_holm_{kind}'])}"

    lines += _table(["optimiser", "reached", "images to target per seed", "ERT images", "ratio (median)",
                     "ERT ratio", f"fewer than {reference}: wins/untied, p (Holm)", "< ½: wins/untied, p (Holm)"],
                    [[row["optimizer"] + (" (ref.)" if row["reference"] else ""),
                      f"{row['reached']}/{len(row['seeds'])}",
                      ", ".join(f"s{s}: {_images(v)}" for s, v in row["images_to_target"].items()),
                      _images(row["ert_images"]), _fmt(row["median_ratio"], 2), _fmt(row["ert_ratio"], 2),
                      p_text(row, "fewer"), p_text(row, "half")] for row in rows])
    lines += ["", "### Final validation value and cost", "",
              f"Per optimiser over its seeds: the final selected validation {value_name} (median [quartiles]); a "
              f"paired sign test against {reference} on it (seeds where it ends better / untied seeds, Holm "
              f"p); training and validation images per cell (medians), candidates per cell, and wall-clock "
              f"(all its cells, and the median cell).", ""]
    lines += _table(["optimiser", f"final {value_name}", f"better than {reference}: wins/untied, p (Holm)",
                     "images/candidate", "training images", "validation images", "candidates", "wall s (total)",
                     "wall s (cell)"],
                    [[row["optimizer"] + (" (ref.)" if row["reference"] else ""),
                      f"{_fmt(row['final_median'], 4)} [{_fmt(row['final_q25'], 4)}, {_fmt(row['final_q75'], 4)}]",
                      p_text(row, "final"), row["images_per_candidate"], str(row["training_images"]),
                      str(row["validation_images"]), str(row["evaluations"]), f"{row['wall_seconds']:.0f}",
                      f"{row['wall_seconds_median']:.0f}"] for row in rows])
    return lines + [""]


def _images(value: float) -> str:
    return "∞" if not math.isfinite(value) else f"{value:.0f}"


def _plot_calibration(runs: Sequence[analysis.CalibrationRun], target: float | None, path: Path) -> Path:
    """Selected validation value against training images: median line and inter-quartile band over
    seeds per optimiser, the target dashed."""
    plt = _plt()
    longest = max(len(run.best) for run in runs)
    curves = analysis.convergence(runs, longest)
    x = np.arange(1, longest + 1)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    to_value = runs[0].reward
    for i, (optimizer, (q25, q50, q75)) in enumerate(curves.items()):
        finite = np.isfinite(q50)
        colour = f"C{i % 10}"
        ax.plot(x[finite], [to_value(v) for v in q50[finite]], color=colour, lw=1.2, label=optimizer)
        both = finite & np.isfinite(q25) & np.isfinite(q75)
        ax.fill_between(x[both], [to_value(v) for v in q25[both]], [to_value(v) for v in q75[both]], color=colour,
                        alpha=0.2, lw=0)
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=0.8, label="target")
    ax.set_xlabel("training images")
    ax.set_ylabel("selected validation " + ("reward" if runs[0].direction == "maximize" else "value"))
    seeds = len({run.seed for run in runs})
    ax.set_title(f"{runs[0].problem.label}: median and IQR over {seeds} seed{'s' if seeds != 1 else ''}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value).__name__)


def _plot_ecdf(ecdf: dict[str, Any], dimension: int, path: Path, subset: str = "all functions") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = ecdf["grid"] / dimension
    for optimizer in sorted(ecdf["curves"], key=lambda o: -ecdf["area"][o]):
        ax.step(x, ecdf["curves"][optimizer], where="post",
                label=f"{optimizer} ({ecdf['final'][optimizer]:.2f})")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("evaluations / dimension")
    ax.set_ylabel("fraction of (run, target) pairs")
    ax.set_title(f"Runtime ECDF, d = {dimension}, {subset}\n51 targets 1e2…1e-8", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_convergence(runs: Sequence[RunData], max_budget: int, dimension: int, bench_dir: Path,
                      per_figure: int = 24) -> list[Path]:
    plt = _plt()
    problems = list(dict.fromkeys(r.problem.function_label for r in runs))
    optimizers = list(dict.fromkeys(r.optimizer for r in runs))
    colours = {o: f"C{i % 10}" for i, o in enumerate(optimizers)}
    x = np.arange(1, max_budget + 1)
    out = []
    for page, start in enumerate(range(0, len(problems), per_figure)):
        chunk = problems[start:start + per_figure]
        cols = min(6, len(chunk))
        rows = math.ceil(len(chunk) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.2 * rows), squeeze=False)
        for ax, label in zip(axes.ravel(), chunk):
            chosen = [r for r in runs if r.problem.function_label == label]
            curves = analysis.convergence(chosen, max_budget)
            for optimizer, (q25, q50, q75) in curves.items():
                floor = 1e-9
                ax.plot(x, np.clip(q50, floor, None), color=colours[optimizer], lw=1, label=optimizer)
                ax.fill_between(x, np.clip(q25, floor, None), np.clip(q75, floor, None), color=colours[optimizer],
                                alpha=0.2, lw=0)
            ax.set_xscale("log")
            if all(r.has_precision for r in chosen):
                ax.set_yscale("log")
            ax.set_title(label, fontsize=8)
            ax.tick_params(labelsize=6)
        for ax in axes.ravel()[len(chunk):]:
            ax.axis("off")
        handles, labels = axes.ravel()[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, title_fontsize=8,
                   title="best-so-far precision (median, IQR over instances × seeds) against evaluations")
        fig.tight_layout(rect=(0, 0.1 if rows > 1 else 0.2, 1, 1))
        path = bench_dir / (f"convergence-d{dimension}.png" if page == 0 else f"convergence-d{dimension}-{page + 1}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    return out


def _plot_win_rates(matrix: np.ndarray, optimizers: Sequence[str], dimension: int, budget: int, path: Path) -> Path:
    plt = _plt()
    k = len(optimizers)
    fig, ax = plt.subplots(figsize=(1.1 * k + 2.5, 0.9 * k + 1.8))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="RdYlGn")
    ax.set_xticks(range(k), optimizers, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(k), optimizers, fontsize=8)
    for i in range(k):
        for j in range(k):
            if i != j:
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"win rate (row beats column), d = {dimension}, {budget} evals", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
