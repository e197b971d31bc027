"""Throughput of the weight-free rewards (``calibri.rewards.offline``): images per second.

Each reward scores the same batch (default 16 images of 256×256, synthetic but photo-like:
smooth colour fields, hard-edged shapes and mild noise) handed over in the canonical form (a
float32 N×3×H×W tensor in [0, 1]), so the time includes the input checks of ``Reward.__call__``.
After a warm-up call, each reward is timed over ``--repeats`` calls; the table reports the median
(and the fastest) time per batch and the median throughput. ``combined`` is the raw sum of all
the offline rewards at once (a :class:`calibri.rewards.combine.CombinedReward`).

    python benchmarks/rewards_throughput.py
    python benchmarks/rewards_throughput.py --only sharpness,jpeg_compressibility --repeats 20
    python benchmarks/rewards_throughput.py --json rewards_throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

PROMPTS = ("a red apple on a table", "a blue car in the rain", "a green field under a grey sky",
           "a portrait of an old man", "a white cat on a black sofa", "an orange sunset over the sea",
           "a purple flower", "a brown dog in the snow")


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` photo-like uint8 images, size×size×3: colour gradients, a few discs and rectangles,
    Gaussian noise of varying strength."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    images = []
    for _ in range(n):
        base = rng.uniform(40, 215, 3)
        tilt = rng.uniform(-80, 80, (2, 3))
        image = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1]
        for _ in range(rng.integers(2, 6)):
            colour = rng.uniform(0, 255, 3)
            if rng.random() < 0.5:
                cy, cx, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.3)]
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
            else:
                y0, x0 = rng.uniform(0, 0.8, 2)
                mask = (yy > y0) & (yy < y0 + rng.uniform(0.1, 0.4)) & (xx > x0) & (xx < x0 + rng.uniform(0.1, 0.4))
            image[mask] = colour
        image += rng.normal(0, rng.uniform(1, 12), image.shape)
        images.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return np.stack(images)


def build_rewards(names: list[str] | None) -> dict[str, Callable]:
    from calibri.rewards.combine import CombinedReward
    from calibri.rewards.offline import OFFLINE_REWARDS

    rewards: dict[str, Callable] = {name: cls() for name, cls in OFFLINE_REWARDS.items()}
    rewards["combined"] = CombinedReward({name: cls() for name, cls in OFFLINE_REWARDS.items()})
    if names:
        unknown = sorted(set(names) - set(rewards))
        if unknown:
            raise SystemExit(f"unknown reward(s) {', '.join(unknown)} (available: {', '.join(rewards)})")
        rewards = {name: rewards[name] for name in rewards if name in names}
    return rewards


def measure(reward: Callable, images, prompts: list[str], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        reward(images, prompts)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        reward(images, prompts)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per reward (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    parser.add_argument("--only", action="append", default=[],
                        help="comma-separated reward names to run (repeatable); default: all")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch, --size and --repeats must be positive, --warmup non-negative")

    import PIL
    import torch

    names = [name.strip() for chunk in args.only for name in chunk.split(",") if name.strip()] or None
    rewards = build_rewards(names)
    uint8 = synthetic_images(args.batch, args.size)
    images = torch.from_numpy(uint8).permute(0, 3, 1, 2).float().div(255).contiguous()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]

    results = {}
    print(f"{args.batch} images of {args.size}×{args.size}, median of {args.repeats} calls "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads; numpy {np.__version__}; "
          f"Pillow {PIL.__version__}; {os.cpu_count()} CPUs)")
    header = f"{'reward':<22}{'median ms/batch':>17}{'best ms/batch':>15}{'images/s':>11}"
    print(header)
    print("-" * len(header))
    for name, reward in rewards.items():
        times = measure(reward, images, prompts, args.repeats, args.warmup)
        median = statistics.median(times)
        results[name] = {"median_s": median, "min_s": min(times), "images_per_s": args.batch / median,
                         "times_s": times}
        print(f"{name:<22}{median * 1e3:>17.2f}{min(times) * 1e3:>15.2f}{args.batch / median:>11.1f}")

    report = {
        "benchmark": "rewards_throughput", "batch": args.batch, "size": args.size, "repeats": args.repeats,
        "warmup": args.warmup, "results": results,
        "environment": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                        "pillow": PIL.__version__, "torch_threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "machine": platform.machine()},
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
