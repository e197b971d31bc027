"""A calibration bench's set-ups compared with validation on equal training-image intervals.

A set-up with a smaller bucket validates more often per training image when every set-up
validates every ``validation.every`` rounds, which gives it more chances to select a good point on
the held-out prompts. Validation only selects a run's result — it never steers the search — so a
run validated every 10 rounds is exactly the run validated every 5 with the odd validations left
out. This script does that to finished cells (``--every SETUP=ROUNDS``) and recomputes images to
target, ERT and the paired sign tests (uncorrected; Holm multiplies by the number of comparisons).

    python benchmarks/calibration_equal_validation.py BENCH_DIR --reference paper --every bucket-8=10
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from scipy.stats import binomtest


def cell_curve(cell: Path, every: int | None) -> tuple[list[tuple[int, float]], float]:
    """(training images after the validated round, best validated reward so far) points, and the final."""
    from calibri.core.store import RunStore

    store = RunStore(cell)
    after: dict[int, int] = {0: 0}
    total = 0
    for trial in store.read_trials():
        total += int(trial.get("artifacts", {}).get("n_images", 0))
        after[int(trial["round"]) + 1] = total
    validations = store.read_validation()
    last = max(int(v["after_round"]) for v in validations)
    best, points = -math.inf, []
    for record in validations:
        r = int(record["after_round"])
        if record.get("value") is None or (every and r % every and r != last):
            continue
        best = max(best, float(record["value"]))
        points.append((after.get(r, total), best))
    return points, best


def images_to(points: list[tuple[int, float]], target: float) -> float:
    return next((max(at, 1) for at, best in points if best >= target), math.inf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_dir", type=Path)
    parser.add_argument("--problem", default="toy")
    parser.add_argument("--reference", default="paper")
    parser.add_argument("--every", action="append", default=[], help="SETUP=ROUNDS: validate that set-up this often")
    args = parser.parse_args()
    every = {key: int(value) for key, value in (item.split("=", 1) for item in args.every)}
    root = args.bench_dir / "runs" / args.problem
    setups = sorted(p.name for p in root.iterdir() if p.is_dir())
    curves = {s: {int(c.name.split("-")[1]): cell_curve(c, every.get(s)) for c in (root / s).glob("seed-*")}
              for s in setups}
    reference = curves[args.reference]
    target = float(np.median([final for _, final in reference.values()]))
    print(f"target: {target:.4f} (median final of {args.reference}); validation every: {every or 'as run'}")
    ref_hits = {seed: images_to(points, target) for seed, (points, _) in reference.items()}
    for setup in setups:
        hits = {seed: images_to(points, target) for seed, (points, _) in curves[setup].items()}
        finals = [final for _, final in curves[setup].values()]
        reached = [h for h in hits.values() if math.isfinite(h)]
        budget = max(at for points, _ in curves[setup].values() for at, _ in points)
        ert = sum(h if math.isfinite(h) else budget for h in hits.values()) / len(reached) if reached else math.inf
        line = (f"{setup:>12}: reached {len(reached)}/{len(hits)}, ERT {ert:,.0f} images, "
                f"final median {np.median(finals):.4f}")
        if setup != args.reference:
            paired = [s for s in hits if s in ref_hits and not (math.isinf(hits[s]) and math.isinf(ref_hits[s]))]
            wins = sum(hits[s] < ref_hits[s] for s in paired)
            losses = sum(hits[s] > ref_hits[s] for s in paired)
            half = sum(hits[s] < ref_hits[s] / 2 for s in paired)
            over = sum(hits[s] > ref_hits[s] / 2 for s in paired)  # exactly half is a tie
            p = binomtest(wins, wins + losses).pvalue if wins + losses else 1.0
            p_half = binomtest(half, half + over).pvalue if half + over else 1.0
            line += (f"; fewer images than {args.reference} on {wins}/{wins + losses} untied seeds (p = {p:.3f}), "
                     f"under half on {half}/{half + over} (p = {p_half:.3f})")
        print(line)


if __name__ == "__main__":
    main()
