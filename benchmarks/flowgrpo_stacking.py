"""Stacking a calibration on a Flow-GRPO-layout LoRA, on the toy model (the paper's Table 4, on a CPU).

1. A LoRA (rank 8, alpha 16, Flow-GRPO's SD3 targets) is trained on the toy DiT against the toy
   oracle by reward-weighted regression on its own samples
   (:mod:`calibri.plugins.flow_grpo.toy_lora`) and saved as Flow-GRPO saves checkpoints
   (``checkpoint-N/lora/``), or an existing one is given with ``--lora``.
2. Two calibrations are run with ``calibri run examples/toy.yaml`` (its settings: layer
   granularity, cfg ensemble of 2 copies, 2 time buckets, 4 steps, guidance 4): one of the base
   model, one of base+LoRA (``objective.options.lora``: the LoRA is merged before the scales are
   searched, as the paper stacked Calibri on Flow-GRPO).
3. ``calibri flowgrpo evaluate`` scores base, +LoRA, +calibration and LoRA+calibration on the 80
   held-out prompts (toy/validation) with image seeds no run uses (the validation seed picked each
   run's result, so scoring on it would flatter the calibrations), once per calibration and NFE:
   at 4, the NFE the calibrations were made for, and at 8. Every row sees the same prompts and
   seeds: differences are paired.

    python benchmarks/flowgrpo_stacking.py [--rounds 40] [--lora-iterations 6] [--out bench-out/flowgrpo-stacking]
                                           [--lora DIR] [--reuse] [--steps 4,8] [--seeds 9001,9002] [--threads 1]

Writes ``table.md``, ``results.json`` and ``grid.png`` into ``--out`` (and the LoRA in
``--out/lora``, the runs in ``--out/calibration-base`` and ``--out/calibration-lora``, each
evaluation in ``--out/evaluate-*``). ``--reuse`` keeps a finished LoRA and finished runs of the
same length. Everything uses ``--threads`` torch threads (default 1: on cores shared with other
work, one thread per process degrades gently). Wall times are the machine's at the time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EVALUATE_GUIDANCE = 4.0  # examples/toy.yaml's (it calibrates for 4 steps)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def lora_stage(args: argparse.Namespace) -> tuple[Path, float | None]:
    """The LoRA folder (trained unless given or reusable) and its training time."""
    from calibri.plugins.flow_grpo.toy_lora import LoraSettings, train_lora

    if args.lora is not None:
        log(f"LoRA: using {args.lora}")
        return Path(args.lora), None
    settings = LoraSettings(iterations=args.lora_iterations, seed=args.seed, threads=args.threads)
    folder = args.out / "lora"
    target = folder / f"checkpoint-{settings.iterations}" / "lora"
    saved = folder / "settings.json"
    if args.reuse and saved.is_file() and json.loads(saved.read_text()) == asdict(settings) and target.is_dir():
        log(f"LoRA: reusing {target}")
        wall = folder / "wall.json"
        return target, json.loads(wall.read_text())["seconds"] if wall.is_file() else None
    log(f"LoRA: training {settings.iterations} iterations of reward-weighted regression into {folder}")
    started = time.monotonic()
    target = train_lora(folder, settings, progress=log)
    seconds = time.monotonic() - started
    (folder / "wall.json").write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
    log(f"LoRA: saved {target} ({seconds:.0f} s)")
    return target, seconds


def calibration_stage(name: str, overrides: list[str], args: argparse.Namespace) -> tuple[Path, float | None]:
    """Run one calibration of examples/toy.yaml (unless ``--reuse`` finds it finished)."""
    run_dir = args.out / name
    best = run_dir / "best.json"
    if args.reuse and best.is_file():
        summary = json.loads(best.read_text())
        config = (run_dir / "config.yaml").read_text()
        if summary.get("finished") and summary.get("rounds") == args.rounds and all(
                o.split("=", 1)[1] in config for o in overrides):
            log(f"{name}: reusing the finished run in {run_dir}")
            wall = run_dir / "wall.json"
            return run_dir, json.loads(wall.read_text())["seconds"] if wall.is_file() else None
    command = [sys.executable, "-m", "calibri.core.cli", "run", str(ROOT / "examples" / "toy.yaml"), "-o", str(run_dir),
               "--overwrite", f"budget.rounds={args.rounds}", f"seed={args.seed}", "callbacks=[progress]", *overrides]
    log(f"{name}: calibri {' '.join(command[4:])}")
    started = time.monotonic()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads),
                                             "MKL_NUM_THREADS": str(args.threads)})
    seconds = time.monotonic() - started
    (run_dir / "wall.json").write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
    log(f"{name}: {seconds:.0f} s")
    return run_dir, seconds


def evaluate_stage(name: str, lora: Path, calibration: Path, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    """``calibri flowgrpo evaluate`` on the toy model with this calibration; its JSON record."""
    from calibri.plugins.flow_grpo.evaluate import evaluate

    out = args.out / name
    argv = ["--model", "toy", "--lora", str(lora), "--calibration", str(calibration), "--prompts", "toy/validation",
            "--seeds", args.seeds, "--steps", str(steps), "--guidance", f"{EVALUATE_GUIDANCE:g}",
            "--reward", "toy_oracle", "-o", str(out)]
    log(f"{name}: calibri flowgrpo evaluate {' '.join(argv)}")
    evaluate.main(argv, standalone_mode=False)
    return json.loads((out / "evaluation.json").read_text())


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = a - b
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


#: The benchmark's rows: (label, LoRA, calibration made on, evaluation, variant of that evaluation).
ROWS = [
    ("base", "–", "–", "base", "baseline"),
    ("+calibration", "–", "base", "base", "+calibration"),
    ("+LoRA", "toy oracle", "–", "base", "+LoRA"),
    ("LoRA+calibration", "toy oracle", "base+LoRA", "lora", "LoRA+calibration"),
    ("(LoRA + calibration made on base)", "toy oracle", "base", "base", "LoRA+calibration"),
    ("(base + calibration made on base+LoRA)", "–", "base+LoRA", "lora", "+calibration"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "flowgrpo-stacking")
    parser.add_argument("--rounds", type=int, default=40, help="rounds of each calibration (default 40, examples/toy.yaml's)")
    parser.add_argument("--lora-iterations", type=int, default=6, help="iterations of LoRA training (default 6)")
    parser.add_argument("--lora", type=Path, default=None, help="use this Flow-GRPO LoRA folder instead of training one")
    parser.add_argument("--steps", default="4,8", help="NFEs to score at (the calibrations are made for 4)")
    parser.add_argument("--seeds", default="9001,9002", help="image seeds of the held-out scoring (none a run uses)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the LoRA training and of both runs")
    parser.add_argument("--reuse", action="store_true", help="keep a finished LoRA and finished runs of the same length")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every stage")
    args = parser.parse_args()
    steps = [int(n) for n in args.steps.split(",") if n.strip()]
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    lora, lora_seconds = lora_stage(args)
    base_run, base_seconds = calibration_stage("calibration-base", [], args)
    lora_run, lora_run_seconds = calibration_stage("calibration-lora", [f"objective.options.lora={lora}"], args)
    scoring = time.monotonic()
    records = {(made_on, n): evaluate_stage(f"evaluate-calibration-{made_on}-nfe{n}", lora, run, n, args)
               for n in steps for made_on, run in (("base", base_run), ("lora", lora_run))}
    scoring_seconds = time.monotonic() - scoring

    def scores(made_on: str, n: int, variant: str) -> np.ndarray:
        return np.array(next(r for r in records[(made_on, n)]["rows"] if r["variant"] == variant)["scores"])

    for n in steps:  # both evaluations make the rows without a calibration from the same images
        for variant in ("baseline", "+LoRA"):
            assert np.array_equal(scores("base", n, variant), scores("lora", n, variant)), \
                f"the {variant} rows at NFE {n} differ between the two evaluations: not deterministic"
    total = time.monotonic() - started
    results: dict[str, Any] = {
        "rounds": args.rounds, "lora_iterations": args.lora_iterations, "lora": str(lora), "steps": steps,
        "seeds": [int(s) for s in args.seeds.split(",")], "guidance": EVALUATE_GUIDANCE,
        "images_per_row": int(len(scores("base", steps[0], "baseline"))),
        "wall_seconds": {"lora": lora_seconds, "calibration_base": base_seconds, "calibration_lora": lora_run_seconds,
                         "scoring": round(scoring_seconds, 1), "total": round(total, 1)},
        "rows": [], "stacking_gain_vs_lora": {},
    }
    for label, lora_cell, made_on_cell, made_on, variant in ROWS:
        row: dict[str, Any] = {"row": label, "lora": lora_cell, "calibration_made_on": made_on_cell, "by_nfe": {}}
        for n in steps:
            own, base = scores(made_on, n, variant), scores("base", n, "baseline")
            row["by_nfe"][str(n)] = {"mean_sem": [float(own.mean()), float(own.std(ddof=1) / math.sqrt(len(own)))],
                                     "vs_base": None if label == "base" else paired(own, base)}
        results["rows"].append(row)
    for n in steps:
        results["stacking_gain_vs_lora"][str(n)] = paired(scores("lora", n, "LoRA+calibration"), scores("base", n, "+LoRA"))
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results, args)
    (args.out / "table.md").write_text(table + "\n")
    stack_grids([args.out / f"evaluate-calibration-{m}-nfe{steps[0]}" / "grid.png" for m in ("base", "lora")],
                [f"NFE {steps[0]}, calibration made on base", f"NFE {steps[0]}, calibration made on base+LoRA"],
                args.out / "grid.png")
    print(table)
    log(f"written: {args.out}")


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    steps, walls = results["steps"], results["wall_seconds"]
    lines = [f"| row | LoRA | calibration made on | " + " | ".join(f"NFE {n}: toy oracle (vs base, paired)" for n in steps)
             + " |", "|---|---|---|" + "---|" * len(steps)]
    for row in results["rows"]:
        cells = []
        for n in steps:
            cell = row["by_nfe"][str(n)]
            diff = "" if cell["vs_base"] is None else " ({:+.4f} ± {:.4f})".format(*cell["vs_base"])
            cells.append("{:.4f} ± {:.4f}".format(*cell["mean_sem"]) + diff)
        lines.append(f"| {row['row']} | {row['lora']} | {row['calibration_made_on']} | " + " | ".join(cells) + " |")
    gains = "; ".join("NFE {}: {:+.4f} ± {:.4f}".format(n, *results["stacking_gain_vs_lora"][str(n)]) for n in steps)
    lines += ["", f"LoRA+calibration vs +LoRA (paired): {gains}.",
              f"Toy model, {results['images_per_row']} images per cell (80 held-out prompts × seeds {args.seeds}), "
              f"guidance {EVALUATE_GUIDANCE:g}; calibrations: examples/toy.yaml (made for NFE 4), {args.rounds} rounds "
              f"each; LoRA: rank 8, alpha 16, {args.lora_iterations} iterations of reward-weighted regression. Wall "
              f"time {walls['total'] / 60:.1f} min (LoRA {_seconds(walls['lora'])}, calibrations "
              f"{_seconds(walls['calibration_base'])} and {_seconds(walls['calibration_lora'])}, scoring "
              f"{walls['scoring']:.0f} s), {args.threads} torch thread(s)."]
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "reused" if value is None else f"{value:.0f} s"


def stack_grids(paths: list[Path], titles: list[str], out: Path) -> None:
    """The evaluations' grids one above the other, each under its title."""
    from PIL import Image, ImageDraw

    grids = [Image.open(p).convert("RGB") for p in paths]
    title = 20
    canvas = Image.new("RGB", (max(g.width for g in grids), sum(g.height + title for g in grids)), "white")
    draw, top = ImageDraw.Draw(canvas), 0
    for grid, text in zip(grids, titles):
        draw.text((4, top + 4), text, fill="black")
        canvas.paste(grid, (0, top + title))
        top += grid.height + title
    canvas.save(out)


if __name__ == "__main__":
    main()
