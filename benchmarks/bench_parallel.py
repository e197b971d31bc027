"""Parallel bench cells with and without splitting the cores' threads.

Runs the same cells of ``examples/bench-bbob-d76.yaml`` (76-d BBOB, pycma and nevergrad CMA-ES,
whose covariance updates are BLAS work) three ways in one process, each into a fresh directory:
one cell at a time (``-j 1``), two at a time with every library's default threads (``-j 2
--threads inherit``: two processes each using every core), and two at a time with the cores split
between them (``-j 2``, the default ``--threads auto``). Reported as wall-time ratios against
``-j 1`` measured in the same run, so the machine's speed cancels out.

    python benchmarks/bench_parallel.py                  # 2 optimisers x 4 functions x 2 seeds
    python benchmarks/bench_parallel.py --seeds 3 --evaluations-per-dim 5
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_config(seeds: int, per_dim: int) -> dict:
    import yaml

    config = yaml.safe_load((ROOT / "examples" / "bench-bbob-d76.yaml").read_text(encoding="utf-8"))
    config["optimizers"] = [o for o in config["optimizers"] if o["label"] in ("pycma", "nevergrad-cma")]
    config["budgets"] = [{"evaluations_per_dim": per_dim}]
    config["seeds"] = seeds
    return config


def timed(config: dict, workers: int, threads: str, where: Path) -> float:
    from calibri.plugins.bench.bench import run_bench
    from calibri.plugins.bench.config import BenchConfig

    started = time.perf_counter()
    result = run_bench(BenchConfig.model_validate(config), where, workers=workers, threads=threads,
                       progress=False, report=False, export=False)
    seconds = time.perf_counter() - started
    if result["failed"]:
        sys.exit(f"cells failed: {result['failed']}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--evaluations-per-dim", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    config = bench_config(args.seeds, args.evaluations_per_dim)
    modes = [("-j 1", 1, "auto"), ("-j 2 --threads inherit", 2, "inherit"), ("-j 2 (threads auto)", 2, "auto")]
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, workers, threads) in enumerate(modes):
            print(f"{label} ...", file=sys.stderr, flush=True)
            seconds[label] = timed(config, workers, threads, Path(tmp) / f"mode{i}")
    base = seconds["-j 1"]
    cells = len(config["optimizers"]) * 4 * args.seeds
    print(f"{cells} cells of examples/bench-bbob-d76.yaml (pycma, nevergrad-cma; f1 f8 f10 f15; d = 76)")
    print(f"{'mode':<26}{'wall s':>9}{'speed-up vs -j 1':>19}")
    for label, value in seconds.items():
        print(f"{label:<26}{value:>9.1f}{base / value:>18.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"cells": cells, "seconds": seconds,
                                         "speedup": {k: base / v for k, v in seconds.items()}}, indent=2))


if __name__ == "__main__":
    main()
