"""The bench report: ``report.md`` with PNGs next to it (runtime ECDFs, convergence curves,
win-rate matrices) and tables (rankings per budget, overhead per evaluation); ``summary.json``
holds the same numbers for scripts."""
from __future__ import annotations

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
                 failed: Sequence[str] = ()) -> dict[str, Any]:
    """Write report.md, the PNGs and summary.json into ``bench_dir``; return the summary."""
    optimizers = [spec.key for spec in config.optimizers]
    dims = sorted({run.problem.dimension for run in runs})
    lines = [f"# Bench report: {config.name or bench_dir.name}", ""]
    lines += [f"{len({r.problem.label for r in runs})} problems × {len(optimizers)} optimisers × "
              f"{len(config.seeds)} seeds = {len(runs)} finished cells"
              + (f" ({len(failed)} failed: {', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''})"
                 if failed else "") + ".",
              f"Same x0 (each problem's), σ = {_fmt(config.sigma) if config.sigma else 'the space default'}, "
              f"popsize = {config.popsize or '4 + ⌊3 ln d⌋'} and evaluation budget for every optimiser; "
              f"budgets: {', '.join(b.label for b in config.budgets)}.", ""]
    summary: dict[str, Any] = {"name": config.name, "optimizers": optimizers, "dimensions": {}}
    for d in dims:
        runs_d = [r for r in runs if r.problem.dimension == d]
        budgets = budget_evaluations(config, d)
        max_budget = max(budgets)
        section: dict[str, Any] = {"budgets": budgets}
        lines += [f"## Dimension {d}", ""]
        # runtime ECDF
        ecdf = analysis.ecdf_by_optimizer(runs_d, max_budget, d)
        if ecdf["curves"]:
            png = _plot_ecdf(ecdf, d, bench_dir / f"ecdf-d{d}.png")
            n_problems = len({r.problem.label for r in runs_d if r.has_precision})
            lines += ["### Runtime ECDF", "",
                      f"Fraction of (problem, seed, target) triples solved against evaluations / d, over "
                      f"{n_problems} problems and the 51 standard BBOB targets 10^2 … 10^-8 on f − f_opt. "
                      f"Area: the normalised area under the curve on a log budget axis (1 = every target at "
                      f"the first evaluation).", "", f"![ECDF d={d}]({png.name})", ""]
            lines += _table(["optimiser", "targets reached", "ECDF area"],
                            [[o, _fmt(ecdf["final"][o]), _fmt(ecdf["area"][o])]
                             for o in sorted(ecdf["final"], key=lambda o: -ecdf["area"][o])])
            lines.append("")
            section["ecdf"] = {"final": ecdf["final"], "area": ecdf["area"]}
        # convergence
        pngs = _plot_convergence(runs_d, max_budget, d, bench_dir)
        lines += ["### Fixed-budget convergence", "",
                  "Median (line) and inter-quartile range (band) over seeds of the best-so-far "
                  "precision f − f_opt (the loss where the optimum is unknown) against evaluations.", ""]
        lines += [f"![convergence d={d}]({png.name})" for png in pngs] + [""]
        # rankings per budget
        section["rankings"] = {}
        lines += ["### Rankings", "",
                  "Per budget, over (problem, seed) blocks: mean rank (1 = best, ties share), median "
                  "best-so-far precision, wins (best or tied best in a block), and a paired Wilcoxon "
                  "signed-rank test against the best-ranked optimiser on log10 precision (floored at 1e-8: "
                  "solved counts as a tie), Holm-corrected over the comparisons.", ""]
        for spec, budget in zip(config.budgets, budgets):
            blocks, values, raw = analysis.block_matrix(runs_d, lambda problem, b=budget: b, optimizers)
            rows = analysis.ranking(values, raw, optimizers)
            if not rows:
                continue
            section["rankings"][str(budget)] = rows
            lines += [f"#### Budget {spec.label} = {budget} evaluations ({len(blocks)} blocks)", ""]
            lines += _table(["optimiser", "mean rank", "median precision", "wins", "p (Wilcoxon)", "p (Holm)"],
                            [[r["optimizer"] + (" (ref.)" if r["reference"] else ""), f"{r['mean_rank']:.2f}",
                              _fmt(r["median"]), str(r["wins"]), _fmt(r["p_value"]), _fmt(r["p_holm"])]
                             for r in rows])
            lines.append("")
        # win-rate matrix at the largest budget
        blocks, values, _ = analysis.block_matrix(runs_d, lambda problem: max_budget, optimizers)
        if blocks:
            matrix = analysis.win_rates(values)
            png = _plot_win_rates(matrix, optimizers, d, max_budget, bench_dir / f"win-rate-d{d}.png")
            section["win_rates"] = matrix.tolist()
            lines += ["### Win rates", "",
                      f"Share of (problem, seed) blocks where the row optimiser ends better than the column "
                      f"one at {max_budget} evaluations (ties count one half).", "", f"![win rates d={d}]({png.name})",
                      ""]
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
    lines += ["## Data", "",
              "- `runs/<problem>/<optimiser>/seed-<s>/`: each cell's calibri run directory (`trials.jsonl`, "
              "`config.yaml`, checkpoints).",
              "- `evaluations.csv.gz`: every evaluation, one tidy row each.",
              "- `export/iohprofiler/`: IOHprofiler format for IOHanalyzer; `export/coco/exdata/`: COCO format "
              "for cocopp (BBOB cells in COCO's dimensions).", ""]
    (bench_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
    (bench_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default), encoding="utf-8")
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value).__name__)


def _plot_ecdf(ecdf: dict[str, Any], dimension: int, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = ecdf["grid"] / dimension
    for optimizer in sorted(ecdf["curves"], key=lambda o: -ecdf["area"][o]):
        ax.step(x, ecdf["curves"][optimizer], where="post",
                label=f"{optimizer} ({ecdf['final'][optimizer]:.2f})")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("evaluations / dimension")
    ax.set_ylabel("fraction of (problem, target) pairs")
    ax.set_title(f"Runtime ECDF, d = {dimension}, 51 targets 1e2…1e-8")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_convergence(runs: Sequence[RunData], max_budget: int, dimension: int, bench_dir: Path,
                      per_figure: int = 24) -> list[Path]:
    plt = _plt()
    problems = list(dict.fromkeys(r.problem.label for r in runs))
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
            curves = analysis.convergence([r for r in runs if r.problem.label == label], max_budget)
            for optimizer, (q25, q50, q75) in curves.items():
                floor = 1e-9
                ax.plot(x, np.clip(q50, floor, None), color=colours[optimizer], lw=1, label=optimizer)
                ax.fill_between(x, np.clip(q25, floor, None), np.clip(q75, floor, None), color=colours[optimizer],
                                alpha=0.2, lw=0)
            ax.set_xscale("log")
            if all(r.has_precision for r in runs if r.problem.label == label):
                ax.set_yscale("log")
            ax.set_title(label, fontsize=8)
            ax.tick_params(labelsize=6)
        for ax in axes.ravel()[len(chunk):]:
            ax.axis("off")
        handles, labels = axes.ravel()[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, title_fontsize=8,
                   title="best-so-far precision (median, IQR) against evaluations")
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
