"""Framework overhead: a calibri run vs a hand-written ask/tell loop of the same library.

Both minimise the same trivial objective (sphere, d=10) for the same number of evaluations with
the same population size. The calibri side is a full run: config validation, plugin registry,
serial executor, ``trials.jsonl``, a checkpoint after every round and ``best.json`` — everything
but the progress bar. Reported as time ratios (calibri / raw) measured in the same process, so the
machine's speed cancels out.

    python benchmarks/overhead.py                 # 2,000 evaluations, all libraries
    python benchmarks/overhead.py --evaluations 500 --repeats 1 --only pycma
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import numpy as np

DIM = 10
POPSIZE = 10
X0 = 3.0
SIGMA = 1.0


def sphere(x: np.ndarray) -> float:
    return float(np.sum(np.asarray(x) ** 2))


# -- raw loops: what a user would write against each library directly -----------------------------
def raw_pycma(evaluations: int, seed: int) -> float:
    import cma

    rng = np.random.RandomState(seed)
    es = cma.CMAEvolutionStrategy([X0] * DIM, SIGMA, {"popsize": POPSIZE, "bounds": [-5, 5], "randn": rng.randn,
                                                     "seed": np.nan, "verbose": -9, "verb_log": 0})
    done = 0
    while done < evaluations:
        xs = es.ask()
        es.tell(xs, [sphere(x) for x in xs])
        done += len(xs)
    return float(es.result.fbest)


def raw_nevergrad(evaluations: int, seed: int) -> float:
    import nevergrad as ng

    param = ng.p.Array(init=np.full(DIM, X0))
    param.random_state = np.random.RandomState(seed)
    opt = ng.families.ParametrizedCMA(scale=SIGMA, popsize=POPSIZE)(param, budget=None, num_workers=POPSIZE)
    best = np.inf
    done = 0
    while done < evaluations:
        cands = [opt.ask() for _ in range(POPSIZE)]
        for cand in cands:
            value = sphere(np.clip(cand.value, -5, 5))
            best = min(best, value)
            opt.tell(cand, value)
        done += POPSIZE
    return best


def raw_optuna(evaluations: int, seed: int, sampler: str = "tpe") -> float:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler_obj = optuna.samplers.TPESampler(seed=seed) if sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(sampler=sampler_obj)
    dists = {f"x[{i}]": optuna.distributions.FloatDistribution(-5, 5) for i in range(DIM)}
    done = 0
    while done < evaluations:
        trials = [study.ask(dists) for _ in range(POPSIZE)]
        for trial in trials:
            study.tell(trial, sphere([trial.params[f"x[{i}]"] for i in range(DIM)]))
        done += POPSIZE
    return study.best_value


def raw_random(evaluations: int, seed: int) -> float:
    rng = np.random.Generator(np.random.PCG64(seed))
    best = np.inf
    for _ in range(evaluations // POPSIZE):
        for x in rng.uniform(-5, 5, size=(POPSIZE, DIM)):
            best = min(best, sphere(x))
    return best


# -- the calibri side ----------------------------------------------------------------------------------
def calibri_run(optimizer: str, evaluations: int, seed: int) -> float:
    from calibri.core.config import validate
    from calibri.core.run import start_run

    config = validate({
        "seed": seed,
        "objective": {"name": "sphere", "options": {"dim": DIM, "init": X0}},
        "optimizer": {"name": optimizer, "sigma": SIGMA, "popsize": POPSIZE},
        "budget": {"evaluations": evaluations},
        "callbacks": [],
    })
    with tempfile.TemporaryDirectory() as run_dir:
        summary = start_run(config, run_dir)
    return summary["best"]["value"]


CASES: dict[str, tuple[str, Callable[[int, int], float]]] = {
    "pycma": ("pycma", raw_pycma),
    "nevergrad.cma": ("nevergrad.cma", raw_nevergrad),
    "optuna.tpe": ("optuna.tpe", raw_optuna),
    "optuna.random": ("optuna.random", lambda n, s: raw_optuna(n, s, "random")),
    "random": ("random", raw_random),
}


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluations", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="libraries to measure")
    parser.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")

    calibri_run("random", 20, 0)  # warm imports and the plugin registry outside the timings
    rows = []
    for name in args.only or list(CASES):
        optimizer, raw = CASES[name]
        raw(POPSIZE, 0)
        raw_times, calibri_times = [], []
        for repeat in range(args.repeats):  # interleave so drift hits both sides alike
            t_raw, _ = timed(lambda: raw(args.evaluations, repeat))
            t_cal, _ = timed(lambda: calibri_run(optimizer, args.evaluations, repeat))
            raw_times.append(t_raw)
            calibri_times.append(t_cal)
        t_raw, t_cal = statistics.median(raw_times), statistics.median(calibri_times)
        rows.append({"optimizer": name, "evaluations": args.evaluations, "raw_s": round(t_raw, 4),
                     "calibri_s": round(t_cal, 4), "ratio": round(t_cal / t_raw, 3),
                     "overhead_ms_per_eval": round(1000 * (t_cal - t_raw) / args.evaluations, 4)})
        print(f"{name:14s} raw {t_raw:7.3f}s  calibri {t_cal:7.3f}s  ratio {t_cal / t_raw:5.2f}x  "
              f"overhead {1000 * (t_cal - t_raw) / args.evaluations:+.3f} ms/eval", flush=True)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
