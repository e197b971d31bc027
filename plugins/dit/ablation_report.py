"""An ablation's report files: ``ablation.csv``, ``ablation.json`` and ``ablation.md``.

All three are written whole and atomically from the cell records, so they are rewritten (the
same, or more complete) by every rerun, and a killed study never leaves half a report.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from calibri.core.store import atomic_write_text

from .ablation_stats import CellResult

CSV_COLUMNS = ("site", "value", "n", "mean_reward", "sem", "diff_vs_identity", "diff_sem", "t", "p", "p_holm",
               "significant", "better", "error")


def _number(value: float | None, digits: int = 6) -> str:
    return "" if value is None else f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"


def write_csv(results: Sequence[CellResult], path: Path) -> None:
    """One row per cell, the identity first (``site`` = identity, no value)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in results:
        writer.writerow(["identity" if r.site is None else r.site, "" if r.value is None else f"{r.value:g}",
                         r.n if r.ok else "", _number(r.mean), _number(r.sem), _number(r.diff), _number(r.diff_sem),
                         "" if r.t is None else f"{r.t:.3f}", "" if r.p is None else f"{r.p:.3g}",
                         "" if r.p_holm is None else f"{r.p_holm:.3g}", "yes" if r.significant else "no",
                         "" if r.better is None else "yes" if r.better else "no", r.error or ""])
    atomic_write_text(path, buffer.getvalue())


def write_json(document: Mapping[str, Any], path: Path) -> None:
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")


def _cell_text(r: CellResult | None) -> str:
    if r is None:
        return ""
    if not r.ok:
        return "failed"
    return f"{r.diff:+.4f} ± {r.diff_sem:.4f}{'*' if r.significant else ''}"


def _tally_text(what: str, tally: Mapping[str, int] | None) -> str:
    if tally is None:
        return f"- {what}: not tested"
    return (f"- {what}: {tally['improve']} of {tally['sites']} sites improve by the point estimate, "
            f"{tally['improve_significantly']} significantly; {tally['worse_significantly']} get significantly worse")


def markdown(document: Mapping[str, Any], results: Sequence[CellResult],
             best: Mapping[str, CellResult | None]) -> str:
    """The study on one page: what ran, the table, the best value per site, the counts, wall time."""
    study, images = document["study"], document["images"]
    values, sites, alpha = document["values"], document["sites"], document["alpha"]
    identity = results[0]
    by_cell = {(r.site, r.value): r for r in results}
    better = "higher" if document["direction"] == "maximize" else "lower"
    seeds = "seed" if images["seeds"] == 1 else "seeds"
    lines = [f"# Ablation: {study['config']}", "",
             f"- command: `{document['command']}`",
             f"- model `{study['model']}` ({study['model_class']}), granularity **{study['granularity']}**: "
             f"{len(sites)} sites; {study['layout']}",
             f"- reward `{study['reward']}` ({better} is better), {study['steps']} sampling steps",
             f"- images: the first {images['prompts']} {images['split']} prompts of `{images['source']}` × "
             f"{images['seeds']} {seeds} = {images['n']} images per cell (base seed {images['seed']}); "
             f"every cell on the same images, so differences are paired",
             f"- values: {', '.join(f'{v:g}' for v in values)}; {len(results)} cells with the identity",
             f"- significance: two-sided paired t-test per cell, Holm-adjusted over the {document['family_size']} "
             f"cells with a value other than 1; `*` marks adjusted p < {alpha:g}",
             f"- wall time: {document['wall_time_seconds']:.0f} s (model loading included; "
             f"{document['invocations']} invocation{'s' if document['invocations'] != 1 else ''} of the command, "
             f"executor `{document['executor']}`)", ""]
    if identity.ok:
        lines += [f"Identity: mean reward {identity.mean:.4f} ± {identity.sem:.4f} (n = {identity.n}).", ""]
    lines += ["## Paired difference to identity (mean ± standard error)", "",
              "| site | " + " | ".join(f"{v:g}" for v in values) + " |",
              "|---|" + "---|" * len(values)]
    for site in sites:
        lines.append(f"| {site} | " + " | ".join(_cell_text(by_cell.get((site, float(v)))) for v in values) + " |")
    lines += ["", "![heat-map](ablation.png)", "", "## Best value per site", "",
              "| site | best value | difference | Holm p | significant |", "|---|---|---|---|---|"]
    for site in sites:
        r = best.get(site)
        if r is None:
            lines.append(f"| {site} | 1 (no tested value beats identity) | | | |")
        else:
            lines.append(f"| {site} | {r.value:g} | {r.diff:+.4f} ± {r.diff_sem:.4f} | "
                         f"{'' if r.p_holm is None else f'{r.p_holm:.3g}'} | {'yes' if r.significant else 'no'} |")
    tallies = document["summary"]
    lines += ["", "## Switched off vs re-weighted", "",
              _tally_text("switched off (value 0)", tallies["switched_off"]),
              _tally_text("re-weighted (some value other than 0 and 1)", tallies["reweighted"])]
    failed = [r for r in results if not r.ok]
    if failed:
        lines += ["", f"{len(failed)} cell(s) failed: " + "; ".join(
            f"{'identity' if r.site is None else f'{r.site}={r.value:g}'}: {r.error}" for r in failed[:5])]
    return "\n".join(lines) + "\n"
