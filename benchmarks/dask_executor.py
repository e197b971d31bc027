"""Rounds per second of the toy calibration on each executor, and Dask's cost per chunk.

The objective is the main job's (``examples/toy.yaml``: the shipped toy DiT, its prompt buckets
and oracle reward). The same rounds of candidates (drawn around the starting point, with the
run's round seeds and prompt buckets) go through ``serial``, ``process`` (2 workers) and ``dask``
(1 and 2 workers on a loopback cluster). Every executor is started, and its workers have built
the objective, before any timing; then the executors are timed in turn, interleaved over
``--repeats``, and reported as ratios in the same run (the machine's speed cancels). Each
executor also checks that its values equal the serial ones.

The scheduler's overhead per chunk is measured apart, on a trivial objective (sphere, d=10) with
one candidate per chunk on one worker: the time of a round divided by its chunks.

Run it on an otherwise idle machine: with other work on the cores, executors whose workers use
several OpenMP threads (``serial`` and ``dask`` with 1 worker here) slow down far more than those
with one thread per worker, and the ratios say more about the load than about the executors.

    python benchmarks/dask_executor.py                          # 4 rounds x 3 repeats
    python benchmarks/dask_executor.py --rounds 2 --repeats 1 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "toy.yaml"


def toy_rounds(rounds: int, popsize: int | None, seed: int = 0):
    """The toy calibration's recipe and ``rounds`` rounds of (candidates, context)."""
    import yaml

    from calibri.core.config import validate
    from calibri.core.objective import RoundContext
    from calibri.core.plugins import build_from
    from calibri.core.run import plan, round_seed

    data = yaml.safe_load(CONFIG.read_text())
    data.update(callbacks=[], validation={})
    if popsize:
        data["optimizer"]["popsize"] = popsize
    p = plan(validate(data))
    space = p.space
    n = popsize or 4 + int(3 * np.log(len(space)))  # CMA-ES's default population
    stream = build_from(p.objective, p.objective.extras["stream"], seed=seed, **p.recipe.options)
    rng = np.random.default_rng(seed)
    low, high = space.search_bounds()
    x0, sigmas = space.search_x0(), space.search_sigmas(data["optimizer"].get("sigma"))
    out = []
    for index in range(rounds):
        ctx = RoundContext(round=index, seed=round_seed(seed, index), data=stream.next_round(index))
        candidates = [space.from_search(np.clip(x0 + sigmas * rng.standard_normal(len(space)), low, high))
                      for _ in range(n)]
        out.append((candidates, ctx))
    return p.recipe, out


def build(name: str, recipe):
    from calibri.core.executors import ProcessExecutor, SerialExecutor
    from calibri.plugins.dask.executor import DaskExecutor

    if name == "serial":
        return SerialExecutor(recipe)
    if name == "process-2":
        return ProcessExecutor(recipe, workers=2)
    return DaskExecutor(recipe, workers=int(name.rsplit("-", 1)[1]), dashboard=None)


def values(results) -> list:
    return [(r.value, r.status) for r in results]


def chunk_overhead_ms(rounds: int, candidates: int) -> float:
    """Dask's cost per chunk: one worker, one candidate per chunk, a microsecond objective."""
    from calibri.core.executor import ObjectiveRecipe
    from calibri.core.objective import RoundContext
    from calibri.plugins.dask.executor import DaskExecutor

    recipe = ObjectiveRecipe("sphere", {"dim": 10})
    points = [{f"x[{i}]": 0.01 * (i + j) for i in range(10)} for j in range(candidates)]
    with DaskExecutor(recipe, workers=1, chunk_size=1, dashboard=None) as executor:
        executor.evaluate(points, RoundContext(0, 0))  # warm
        times = []
        for index in range(rounds):
            start = time.perf_counter()
            executor.evaluate(points, RoundContext(index, index))
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / candidates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per executor and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    parser.add_argument("--popsize", type=int, default=None, help="candidates per round (default: CMA-ES's)")
    parser.add_argument("--chunk-rounds", type=int, default=20, help="rounds for the per-chunk overhead")
    parser.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")

    recipe, rounds = toy_rounds(args.rounds + 1, args.popsize)
    warm, timed = rounds[0], rounds[1:]
    names = ["serial", "process-2", "dask-1", "dask-2"]
    executors = {}
    try:
        for name in names:
            print(f"starting {name} ...", file=sys.stderr, flush=True)
            executors[name] = build(name, recipe)
            executors[name].describe()
            for _ in range(2):  # every worker takes a chunk, so every worker has built the objective
                executors[name].evaluate(*warm)
        reference = [values(executors["serial"].evaluate(*r)) for r in timed]
        seconds: dict[str, list[float]] = {name: [] for name in names}
        identical = {name: True for name in names}
        for repeat in range(args.repeats):
            for name in names:  # interleaved, so drift hits every executor alike
                print(f"repeat {repeat + 1}/{args.repeats}: {name} ...", file=sys.stderr, flush=True)
                start = time.perf_counter()
                got = [values(executors[name].evaluate(*r)) for r in timed]
                seconds[name].append(time.perf_counter() - start)
                identical[name] &= got == reference
    finally:
        for executor in reversed(list(executors.values())):  # the last cluster started stops first
            executor.close()

    rps = {name: len(timed) / statistics.median(seconds[name]) for name in names}
    overhead = chunk_overhead_ms(args.chunk_rounds, 32)
    result = {
        "candidates_per_round": len(timed[0][0]), "rounds": len(timed), "repeats": args.repeats,
        "rounds_per_second": {name: round(value, 4) for name, value in rps.items()},
        "ratio_to_serial": {name: round(rps[name] / rps["serial"], 3) for name in names},
        "dask2_over_dask1": round(rps["dask-2"] / rps["dask-1"], 3),
        "dask2_over_process2": round(rps["dask-2"] / rps["process-2"], 3),
        "values_equal_serial": identical,
        "scheduler_overhead_ms_per_chunk": round(overhead, 3),
    }
    print(f"toy calibration, {result['candidates_per_round']} candidates per round, "
          f"median of {args.repeats} x {len(timed)} rounds:")
    for name in names:
        print(f"  {name:10s} {rps[name]:7.3f} rounds/s  {rps[name] / rps['serial']:5.2f}x serial"
              f"  values equal serial: {identical[name]}")
    print(f"  dask-2 / dask-1     {result['dask2_over_dask1']:.2f}x  (target >= 1.6)")
    print(f"  dask-2 / process-2  {result['dask2_over_process2']:.2f}x  (target >= 0.9)")
    print(f"  Dask scheduler overhead: {overhead:.2f} ms per chunk")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
