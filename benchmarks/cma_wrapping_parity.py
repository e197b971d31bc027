"""Does calibri's pycma backend lose anything to pycma itself? On the same BBOB cells and seeds,
the fraction of the 51 standard targets reached by calibri-wrapped pycma (a ``calibri bench``
run) against raw ``cma.CMAEvolutionStrategy`` driven by hand with the same x0, σ, popsize,
bounds and seed.

"Same settings" means what calibri's backend gives pycma (see optimizers/pycma_backend.py): x0
(the problem's, the origin for BBOB) with σ0 = 1 and ``CMA_stds`` = σ per coordinate, bounds
[-5, 5], active CMA, samples from ``numpy.random.RandomState(seed)``, x0 injected as the first
candidate, one generation per round and a last partial generation evaluated but not told. With
those, the two trajectories are bit-identical, so the fractions are equal: the wrapper loses
nothing. ``--idiomatic`` also drives pycma the way its README does (σ0 = σ, pycma's own seeding,
no injection): a different random stream, so only statistically comparable.

    python benchmarks/cma_wrapping_parity.py                        # f1-f24, d=10, 5 seeds, 100·d
    python benchmarks/cma_wrapping_parity.py --functions 1-5 --dimension 5 --seeds 2 --per-dim 50
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def raw_pycma(function: int, dimension: int, instance: int, seed: int, sigma: float, popsize: int,
              evaluations: int, idiomatic: bool = False) -> np.ndarray:
    """Best-so-far precision f - f_opt of raw pycma, evaluation by evaluation."""
    import cma
    import ioh

    problem = ioh.get_problem(function, instance=instance, dimension=dimension, problem_class=ioh.ProblemClass.BBOB)
    f_opt = problem.optimum.y
    x0 = np.zeros(dimension)
    lows, highs = np.full(dimension, -5.0), np.full(dimension, 5.0)
    common = {"popsize": popsize, "bounds": [list(lows), list(highs)], "verbose": -9, "verb_log": 0,
              "verb_disp": 0, "tolx": 0, "tolfun": 0, "tolfunhist": 0, "tolstagnation": 10**9,
              "tolflatfitness": 10**9}
    if idiomatic:
        es = cma.CMAEvolutionStrategy(list(x0), sigma, {**common, "seed": seed + 1})
    else:
        rng = np.random.RandomState(seed % 2**32)
        es = cma.CMAEvolutionStrategy(list(x0), 1.0, {**common, "CMA_stds": [sigma] * dimension,
                                                      "CMA_active": True, "randn": rng.randn, "seed": np.nan})
        es.inject([es.gp.geno(x0, from_bounds=es.boundary_handler.inverse)], force=True)
    values: list[float] = []
    first = not idiomatic
    while len(values) < evaluations:
        solutions = es.ask(popsize)
        n = min(popsize, evaluations - len(values))
        batch = []
        for k, z in enumerate(solutions[:n]):
            x = x0.copy() if first and k == 0 else np.clip(np.asarray(z, dtype=np.float64), lows, highs)
            batch.append(float(problem(x)) - f_opt)
        first = False
        values.extend(batch)
        if n == popsize:
            es.tell(solutions, batch)
    return np.minimum.accumulate(np.array(values))


def calibri_pycma(functions: list[int], dimension: int, instance: int, seeds: list[int], sigma: float,
                  evaluations: int, bench_dir: Path, workers: int = 1) -> dict[tuple[int, int], np.ndarray]:
    """Best-so-far precision of calibri-wrapped pycma, per (function, seed), run as a bench."""
    from calibri.plugins.bench.analysis import load_run
    from calibri.plugins.bench.bench import run_bench
    from calibri.plugins.bench.cells import build_cells
    from calibri.plugins.bench.config import validate_bench

    config = validate_bench({"name": "cma-parity", "seeds": seeds, "sigma": sigma,
                             "problems": [{"bbob": {"functions": functions, "dimensions": [dimension],
                                                    "instances": [instance]}}],
                             "optimizers": ["pycma"], "budgets": [{"evaluations": evaluations}]})
    run_bench(config, bench_dir, workers=workers, progress=False, report=False, export=False)
    return {(cell.problem.function, cell.seed): load_run(cell, bench_dir).best for cell in build_cells(config)}


def parity(functions: list[int], dimension: int = 10, seeds: list[int] = (0, 1, 2, 3, 4), sigma: float = 2.0,
           per_dim: float = 100, instance: int = 1, bench_dir: Path | None = None, workers: int = 1,
           idiomatic: bool = False) -> dict:
    from calibri.core.optimizer import default_popsize
    from calibri.plugins.bench.analysis import fraction_of_targets

    evaluations = int(round(per_dim * dimension))
    popsize = default_popsize(dimension)
    with tempfile.TemporaryDirectory() as tmp:
        wrapped = calibri_pycma(functions, dimension, instance, list(seeds), sigma, evaluations,
                                Path(bench_dir or tmp), workers)
    raw = {(f, s): raw_pycma(f, dimension, instance, s, sigma, popsize, evaluations)
           for f in functions for s in seeds}
    keys = sorted(raw)
    out = {"cells": len(keys), "dimension": dimension, "evaluations": evaluations, "popsize": popsize, "sigma": sigma,
           "calibri": fraction_of_targets([wrapped[k] for k in keys]),
           "raw": fraction_of_targets([raw[k] for k in keys]),
           "identical_trajectories": sum(bool(np.array_equal(wrapped[k], raw[k])) for k in keys)}
    out["difference"] = out["calibri"] - out["raw"]
    if idiomatic:
        idio = [raw_pycma(f, dimension, instance, s, sigma, popsize, evaluations, idiomatic=True) for f, s in keys]
        out["raw_idiomatic"] = fraction_of_targets(idio)
    return out


def main(argv: list[str] | None = None) -> int:
    from calibri.plugins.bench.config import parse_indices

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--functions", default="1-24")
    parser.add_argument("--dimension", type=int, default=10)
    parser.add_argument("--instance", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sigma", type=float, default=2.0)
    parser.add_argument("--per-dim", type=float, default=100.0, help="evaluations per dimension")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--bench-dir", type=Path, help="keep the calibri runs here (default: a temporary folder)")
    parser.add_argument("--idiomatic", action="store_true", help="also run pycma as its README does")
    args = parser.parse_args(argv)
    result = parity(parse_indices(args.functions), args.dimension, list(range(args.seeds)), args.sigma, args.per_dim,
                    args.instance, args.bench_dir, args.workers, args.idiomatic)
    print(json.dumps(result, indent=1))
    print(f"fraction of targets reached: calibri-wrapped pycma {result['calibri']:.4f}, raw pycma "
          f"{result['raw']:.4f}, difference {result['difference']:+.4f}; "
          f"{result['identical_trajectories']}/{result['cells']} trajectories bit-identical")
    return 0 if result["difference"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
