"""Paired statistics of an ablation: each cell against the identity, image by image.

Every cell is scored on the identity's images (same prompts, same seeds), so a cell's effect is
the mean of the per-image differences ``cell − identity``, with the standard error of that mean
(``std(ddof=1) / √n``) and a two-sided paired t-test. The tests of one study are one family:
their p-values are Holm-adjusted (step-down Bonferroni, which controls the chance of any false
"significant" at ``alpha`` whatever the dependence between cells). A cell at value 1 is the
identity by construction and tests nothing: it is left out of the family.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class CellResult:
    """One cell's numbers (``site`` None: the identity). Differences are ``cell − identity`` in
    reward units; ``better`` is in the reward's direction. Failed cells carry ``error`` only."""

    site: str | None
    value: float | None
    n: int = 0
    mean: float | None = None
    sem: float | None = None
    diff: float | None = None
    diff_sem: float | None = None
    t: float | None = None
    p: float | None = None
    p_holm: float | None = None
    significant: bool = False
    better: bool | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sem(values: np.ndarray) -> float:
    """Standard error of the mean, ``std(ddof=1) / √n``."""
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def paired_test(cell: np.ndarray, identity: np.ndarray) -> tuple[float, float]:
    """``(t, p)`` of the two-sided paired t-test; differences that are all equal give p = 1
    when they are zero (the identity itself), else p = 0."""
    from scipy import stats

    delta = cell - identity
    if np.all(delta == delta[0]):
        if delta[0] == 0:
            return 0.0, 1.0
        return math.copysign(math.inf, float(delta[0])), 0.0
    result = stats.ttest_rel(cell, identity)
    return float(result.statistic), float(result.pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (scipy offers Benjamini–Hochberg only)."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted.tolist()


def analyse(records: Sequence[Mapping[str, Any]], maximize: bool, alpha: float) -> list[CellResult]:
    """Results of every cell (identity first, then in the records' order) from their per-image
    rewards; ``records`` hold ``site``, ``value``, ``status``, ``rewards`` (and ``error``)."""
    identity_record = next(r for r in records if r["site"] is None)
    identity = np.asarray(identity_record["rewards"], dtype=np.float64)
    out: list[CellResult] = []
    for record in records:
        result = CellResult(record["site"], record["value"])
        if record["status"] != "ok":
            result.error = record.get("error") or "failed"
            out.append(result)
            continue
        rewards = np.asarray(record["rewards"], dtype=np.float64)
        delta = rewards - identity
        result.n, result.mean, result.sem = len(rewards), float(rewards.mean()), sem(rewards)
        result.diff, result.diff_sem = float(delta.mean()), sem(delta)
        if record["site"] is not None:
            result.t, result.p = paired_test(rewards, identity)
            result.better = (result.diff > 0) if maximize else (result.diff < 0)
        out.append(result)
    family = [r for r in out if r.ok and r.site is not None and r.value != 1.0]
    for result, adjusted in zip(family, holm([r.p for r in family])):  # type: ignore[misc]
        result.p_holm = adjusted
        result.significant = adjusted < alpha
    return out


def best_per_site(results: Sequence[CellResult], maximize: bool) -> dict[str, CellResult | None]:
    """Per site, its cell with the best mean difference, or None where no value beats identity."""
    sign = 1.0 if maximize else -1.0
    out: dict[str, CellResult | None] = {}
    for result in results:
        if result.site is None or not result.ok:
            continue
        out.setdefault(result.site, None)
        best = out[result.site]
        if sign * result.diff > 0 and (best is None or sign * result.diff > sign * best.diff):  # type: ignore[operator]
            out[result.site] = result
    return out


def counts(results: Sequence[CellResult], sites: Sequence[str]) -> dict[str, Any]:
    """How many sites improve when switched off (value 0) and when re-weighted (any value other
    than 0 and 1) by at least one such value: by the point estimate and significantly (Holm);
    and at how many some such value is significantly worse."""
    def tally(cells: list[CellResult]) -> dict[str, int]:
        by_site: dict[str, list[CellResult]] = {}
        for cell in cells:
            by_site.setdefault(cell.site, []).append(cell)  # type: ignore[arg-type]
        return {"sites": len(by_site),
                "improve": sum(any(c.better for c in cs) for cs in by_site.values()),
                "improve_significantly": sum(any(c.better and c.significant for c in cs) for cs in by_site.values()),
                "worse_significantly": sum(any(not c.better and c.significant for c in cs) for cs in by_site.values())}

    ok = [r for r in results if r.ok and r.site is not None]
    switched_off = [r for r in ok if r.value == 0.0]
    reweighted = [r for r in ok if r.value not in (0.0, 1.0)]
    return {"sites": len(sites), "switched_off": tally(switched_off) if switched_off else None,
            "reweighted": tally(reweighted) if reweighted else None}
