"""Cost of Calibri scales on a medium random DiT: untouched vs hooked vs baked, and candidate switch.

A FLUX-class transformer of ~18 M parameters forwards 1,024 image tokens; the three variants are
timed interleaved in the same process (so the machine's speed and drift cancel) and reported as
ratios to the untouched model. The candidate switch (writing a new vector of scales in place) is
timed against one forward.

    python benchmarks/dit_overhead.py                   # CPU, gate granularity
    python benchmarks/dit_overhead.py --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_forward(model: torch.nn.Module, inputs: dict, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    _sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    from calibri.plugins.dit.calibration import attach
    from calibri.plugins.dit.tiny import MEDIUM_FLUX_GRID, dummy_transformer_inputs, medium_flux_transformer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--granularity", default="gate", choices=["block", "layer", "gate"])
    parser.add_argument("--repeats", type=int, default=15, help="timed forwards per variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    model = medium_flux_transformer(seed=0).to(args.device)
    if dtype != torch.float32:
        model = model.to(dtype)
    inputs = dummy_transformer_inputs(model, grid=MEDIUM_FLUX_GRID, text_len=64)
    inputs = {k: (v.to(args.device, dtype) if torch.is_tensor(v) and v.is_floating_point() else
                  v.to(args.device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    params = sum(p.numel() for p in model.parameters())

    calibrator = attach(model, args.granularity)
    rng = np.random.default_rng(0)
    candidate = 1.0 + 0.1 * rng.standard_normal(len(calibrator.sites))
    calibrator.set_values(candidate)

    def untouched() -> float:
        calibrator.state.active = False  # hooks return at once; ω hook passes through
        try:
            return _time_forward(model, inputs, args.device)
        finally:
            calibrator.state.active = True

    def hooked() -> float:
        return _time_forward(model, inputs, args.device)

    def baked() -> float:
        calibrator.bake()
        try:
            return _time_forward(model, inputs, args.device)
        finally:
            calibrator.unbake()

    calibrator.detach()
    with torch.no_grad():
        reference = model(**inputs)
    calibrator.attach()
    calibrator.set_values(candidate)
    for fn in (untouched, hooked, baked):  # warm-up
        fn()

    # "untouched" with hooks present but inactive is not quite untouched: time a truly bare
    # model too, by detaching for those runs.
    def bare() -> float:
        calibrator.detach()
        try:
            return _time_forward(model, inputs, args.device)
        finally:
            calibrator.attach()
            calibrator.set_values(candidate)

    times: dict[str, list[float]] = {"untouched": [], "hooked": [], "baked": []}
    for _ in range(args.repeats):
        times["untouched"].append(bare())
        times["hooked"].append(hooked())
        times["baked"].append(baked())

    switches = []
    for i in range(200):
        vector = candidate + 0.01 * i
        _sync(args.device)
        start = time.perf_counter()
        calibrator.set_values(vector)
        _sync(args.device)
        switches.append(time.perf_counter() - start)

    base = statistics.median(times["untouched"])
    result = {
        "device": args.device, "dtype": args.dtype, "parameters": params, "granularity": args.granularity,
        "sites": len(calibrator.sites), "forward_ms": round(1000 * base, 3),
        "hooked_ratio": round(statistics.median(times["hooked"]) / base, 4),
        "baked_ratio": round(statistics.median(times["baked"]) / base, 4),
        "switch_ms": round(1000 * statistics.median(switches), 4),
        "switch_over_forward": round(statistics.median(switches) / base, 6),
        "identity_exact": None,
    }
    calibrator.reset()
    with torch.no_grad():
        result["identity_exact"] = bool(torch.equal(model(**inputs)[0], reference[0]))
    print(f"{params / 1e6:.1f} M parameters, {len(calibrator.sites)} {args.granularity} sites, "
          f"{args.device}/{args.dtype}: forward {1000 * base:.1f} ms")
    print(f"  hooked / untouched  {result['hooked_ratio']:.3f}x")
    print(f"  baked  / untouched  {result['baked_ratio']:.3f}x")
    print(f"  candidate switch    {result['switch_ms']:.3f} ms ({100 * result['switch_over_forward']:.3f}% of a forward)")
    print(f"  identity bit-exact  {result['identity_exact']}")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
