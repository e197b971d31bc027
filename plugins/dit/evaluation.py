"""Baseline vs calibrated across NFE on held-out prompts and seeds: table, CSV and plot.

Every variant is scored on the same prompts with the same per-image seeds, so differences are
paired: the table gives each variant's mean reward with its standard error, and its mean
difference from the baseline *at the same NFE* with the paired standard error. The NFEs the
calibration was made for are marked (table, CSV and plot), and :func:`off_nfe_note` says in words
where it falls below the uncalibrated model off them. Variants:

* ``baseline``   — the model as shipped (identity calibration);
* ``calibrated`` — the calibration's values;
* ``guidance=G`` — the model as shipped at guidance scale G (the tuned-guidance baseline: a
  calibration must beat this too, or it only found a better guidance scale).
"""
from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibri.core.space import Params


@dataclass
class Row:
    variant: str
    steps: int
    mean: float
    sem: float
    n: int
    diff: float | None = None
    diff_sem: float | None = None
    terms: dict[str, float] | None = None

    @property
    def z(self) -> float | None:
        if self.diff is None or not self.diff_sem:
            return None
        return self.diff / self.diff_sem


def variant_values(objective: Any, variant: str, calibrated: Params | None) -> tuple[Params | None, float | None]:
    """``(values, guidance)`` of a variant: calibration values (None: identity) and the pipeline
    guidance scale to use (None: the objective's)."""
    if variant == "baseline":
        return None, None
    if variant == "calibrated":
        if calibrated is None:
            raise ValueError("no calibrated values to evaluate")
        return calibrated, None
    if variant.startswith("guidance="):
        g = float(variant.split("=", 1)[1])
        calibrator = objective.calibrator
        if calibrator.form == "cfg":  # identity scales with ω = (g, 1 − g) in every time bucket: CFG at g
            names = calibrator.parameter_names()
            values = dict.fromkeys(names[: -calibrator.rows], 1.0)
            omega_names = names[-calibrator.rows:]
            values.update({name: (g if i % 2 == 0 else 1.0 - g) for i, name in enumerate(omega_names)})
            return values, None
        return None, g
    raise ValueError(f"unknown variant {variant!r} (baseline, calibrated, guidance=G)")


def evaluate(objective: Any, variants: Sequence[str], steps: Sequence[int], prompts: Sequence[str],
             metadata: Sequence[Mapping[str, Any]], seed: int, calibrated: Params | None = None,
             progress: Any = None) -> list[Row]:
    """Score each variant at each NFE on the same prompts and seeds; paired differences vs baseline."""
    from .objective import score_images

    per_image: dict[tuple[str, int], np.ndarray] = {}
    rows = []
    for n_steps in steps:
        for variant in variants:
            values, guidance = variant_values(objective, variant, calibrated)
            generator = objective.generator
            saved = generator.guidance_scale
            if guidance is not None:
                generator.guidance_scale = guidance
            try:
                images = objective.images(values, prompts, seed, n_steps)
            finally:
                generator.guidance_scale = saved
            scores, details = score_images(objective.reward, images, prompts, metadata)
            per_image[(variant, n_steps)] = scores
            n = len(scores)
            rows.append(Row(variant, int(n_steps), float(scores.mean()), _sem(scores), n,
                            terms={k: float(np.mean(v)) for k, v in details.items()}))
            if progress is not None:
                progress(variant, n_steps)
    for row in rows:
        base = per_image.get(("baseline", row.steps))
        if base is not None and row.variant != "baseline":
            delta = per_image[(row.variant, row.steps)] - base
            row.diff, row.diff_sem = float(delta.mean()), _sem(delta)
    return rows


def _sem(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def matching_nfe(rows: Sequence[Row], variant: str = "calibrated", at_steps: int | None = None,
                 maximize: bool = True) -> int | None:
    """The smallest NFE at which the baseline reaches ``variant``'s mean at ``at_steps`` (its
    smallest NFE by default) — at least as high, or as low for a lower-is-better reward
    (``maximize=False``); None if no evaluated NFE does."""
    ours = sorted((r for r in rows if r.variant == variant), key=lambda r: r.steps)
    if not ours:
        return None
    target = next((r for r in ours if r.steps == at_steps), ours[0]) if at_steps is not None else ours[0]
    for row in sorted((r for r in rows if r.variant == "baseline"), key=lambda r: r.steps):
        if (row.mean >= target.mean) if maximize else (row.mean <= target.mean):
            return row.steps
    return None


def _made_for(row: Row, made_for: Sequence[int] | None) -> str:
    """``yes``/``no`` for a calibrated row (empty when the NFEs are unknown, and for other variants)."""
    if made_for is None or row.variant != "calibrated":
        return ""
    return "yes" if row.steps in made_for else "no"


def write_csv(rows: Sequence[Row], path: Path, made_for: Sequence[int] | None = None) -> Path:
    """The rows as CSV; ``calibrated_for`` says whether a calibrated row's NFE is one it was made for."""
    terms = sorted({k for r in rows for k in (r.terms or {})})
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "steps", "mean", "sem", "n", "diff_vs_baseline", "diff_sem", "z", "calibrated_for",
                         *terms])
        for r in rows:
            writer.writerow([r.variant, r.steps, f"{r.mean:.6f}", f"{r.sem:.6f}", r.n,
                             "" if r.diff is None else f"{r.diff:.6f}", "" if r.diff_sem is None else f"{r.diff_sem:.6f}",
                             "" if r.z is None else f"{r.z:.2f}", _made_for(r, made_for),
                             *[f"{(r.terms or {}).get(t, float('nan')):.4f}" for t in terms]])
    return path


def markdown_table(rows: Sequence[Row], made_for: Sequence[int] | None = None) -> str:
    """The rows as a markdown table; with ``made_for`` (the NFEs the calibration was made for) a
    last column marks the calibrated rows at those NFEs."""
    marked = made_for is not None
    lines = ["| variant | NFE | mean reward ± s.e. | vs baseline at same NFE (paired) | z |" + (" made for this NFE |" if marked else ""),
             "|---|---|---|---|---|" + ("---|" if marked else "")]
    for r in sorted(rows, key=lambda r: (r.variant != "baseline", r.variant, r.steps)):
        diff = "" if r.diff is None else f"{r.diff:+.4f} ± {r.diff_sem:.4f}"
        z = "" if r.z is None else f"{r.z:.1f}"
        mark = {"yes": " ✓ |", "no": " off |", "": " |"}[_made_for(r, made_for)] if marked else ""
        lines.append(f"| {r.variant} | {r.steps} | {r.mean:.4f} ± {r.sem:.4f} | {diff} | {z} |{mark}")
    return "\n".join(lines)


def off_nfe_note(rows: Sequence[Row], made_for: Sequence[int] | None, maximize: bool = True,
                 variant: str = "calibrated") -> str | None:
    """In words, how the calibration does at the evaluated NFEs it was not made for: where it is
    worse than the uncalibrated model at the same NFE by more than two paired standard errors (it
    collapses there), or that it holds. None when nothing was evaluated off its NFEs."""
    if not made_for:
        return None
    off = sorted((r for r in rows if r.variant == variant and r.steps not in made_for and r.diff is not None),
                 key=lambda r: r.steps)
    if not off:
        return None
    nfes = ", ".join(map(str, made_for))
    sign = 1.0 if maximize else -1.0
    worse = [r for r in off if r.diff_sem is not None and sign * r.diff < -2.0 * r.diff_sem]
    if not worse:
        return (f"Off the NFEs it was made for ({nfes}), the calibration holds: at NFE "
                f"{', '.join(str(r.steps) for r in off)} it is no worse than the uncalibrated model "
                f"(within two standard errors or better).")
    detail = "; ".join(f"NFE {r.steps}: {r.mean:.3f} vs {r.mean - r.diff:.3f}, {r.diff:+.3f} ± {r.diff_sem:.3f}"
                       for r in worse)
    return (f"Off the NFEs it was made for ({nfes}), the calibration collapses: it is worse than the uncalibrated "
            f"model at the same NFE ({detail}). Use it only at NFE {nfes}, or calibrate for the range you deploy "
            f"(objective.options.steps: [..]).")


def plot_nfe(rows: Sequence[Row], path: Path, title: str = "reward vs NFE",
             made_for: Sequence[int] | None = None) -> Path | None:
    from calibri.core.report import pyplot

    plt = pyplot(path.name)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    for variant in dict.fromkeys(r.variant for r in rows):
        own = sorted((r for r in rows if r.variant == variant), key=lambda r: r.steps)
        xs = [r.steps for r in own]
        ys = np.array([r.mean for r in own])
        es = np.array([r.sem for r in own])
        ax.plot(xs, ys, marker="o", label=variant)
        ax.fill_between(xs, ys - es, ys + es, alpha=0.2)
    for i, n in enumerate(made_for or ()):
        ax.axvline(n, color="tab:green", linestyle=":", alpha=0.7, label="calibrated for" if i == 0 else None)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r.steps for r in rows}))
    ax.set_xticklabels([str(s) for s in sorted({r.steps for r in rows})])
    ax.set_xlabel("sampling steps (NFE per guidance branch)")
    ax.set_ylabel("mean reward (held-out prompts, fixed seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
