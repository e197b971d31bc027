"""One candidate evaluation through calibri vs a plain loop over the diffusers pipeline.

Both produce the same images (same prompts, same per-image seeds) with a medium random FLUX
pipeline on the CPU and score them with the same reward:

* naive:   ``pipe(prompt=[...], generator=[...])`` — the prompts are encoded on every call;
* calibri: the Calibri objective's path — the candidate's scales written in place into the attached
           calibration, the pipeline called with cached prompt encodings.

A calibration run evaluates every candidate on the round's prompts, so after the first candidate
calibri never runs the text encoders again; the ratio below is calibri / naive per candidate
(steady state, interleaved repeats, median). The calibrated path also carries the hooks, so a
ratio under 1 means encoding reuse more than pays for them.

    python benchmarks/calibri_vs_naive.py [--repeats 5] [--prompts 4] [--steps 4]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (256 → 1024 image tokens)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    from calibri.plugins.dit.calibration import attach
    from calibri.plugins.dit.generation import ImageGenerator
    from calibri.plugins.dit.prompts import image_seed
    from calibri.plugins.dit.tiny import medium_flux_pipeline
    from calibri.rewards.offline import Colorfulness

    pipe = medium_flux_pipeline(seed=0)
    reward = Colorfulness()
    prompts = [f"a photograph of object number {i} on a wooden table, studio light" for i in range(args.prompts)]
    seed = 1234

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(image_seed(seed, j)) for j in range(len(prompts))]

    def naive() -> torch.Tensor:
        images = pipe(prompt=prompts, num_inference_steps=args.steps, guidance_scale=3.5, height=args.size,
                      width=args.size, generator=generators(), output_type="pt").images
        reward(images, prompts)
        return images

    calibrator = attach(pipe.transformer, "layer")
    generator = ImageGenerator(pipe, steps=args.steps, guidance_scale=3.5, height=args.size, width=args.size,
                               batch_size=len(prompts))
    candidate = [1.0] * (calibrator.count() - 1) + [1.0]

    def calibri() -> torch.Tensor:
        calibrator.set_values(candidate)
        images = generator.generate(prompts, seed)
        reward(images, prompts)
        return images

    with torch.no_grad():
        reference, ours = naive(), calibri()  # warm-up; calibri encodes its prompts here, once
        difference = (reference - ours).abs().max().item()
        times: dict[str, list[float]] = {"naive": [], "calibri": []}
        for _ in range(args.repeats):
            for name, fn in (("naive", naive), ("calibri", calibri)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    naive_s, ours_s = statistics.median(times["naive"]), statistics.median(times["calibri"])
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e6
    print(f"medium random FLUX ({params:.0f} M transformer, {calibrator.count()} calibration parameters), "
          f"{len(prompts)} prompts × {args.steps} steps at {args.size}², CPU, {args.threads} threads")
    print(f"naive pipeline loop : {naive_s * 1000:8.1f} ms per candidate (median of {args.repeats})")
    print(f"calibri objective   : {ours_s * 1000:8.1f} ms per candidate")
    print(f"ratio calibri/naive : {ours_s / naive_s:.3f}   (images max |difference| {difference:.2e})")


if __name__ == "__main__":
    main()
