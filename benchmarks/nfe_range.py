"""Calibrations for one NFE or for a range of NFEs, against the best guidance scale at each NFE.

On the shipped toy model (``examples/toy.yaml``, guidance 2, the same run seed for all), three
calibrations are run — for NFE 2, for NFE 4, and for NFE 2 and 4 at once (``steps: [2, 4]``, the
mean of both) — and, optionally (``--with-guard``), the NFE-2 and the NFE-2-and-4 ones with their
ω guarded (``omega_sum: [1, 1]``). Each
is then scored at NFE 2, 4 and 8 on the 80 held-out prompts with image seeds no run uses (the
validation seed picked each run's result, so scoring on it would flatter the calibrations),
against the uncalibrated model at each of eight guidance scales; the baseline of an NFE is the
best of those scales *at that NFE* on these very images (a choice that flatters the baseline).
Differences are paired: same prompts, same seeds.

    python benchmarks/nfe_range.py [--rounds 60] [--out bench-out/nfe-range] [--reuse] [--with-guard] [--threads 1]

Writes ``table.md``, ``results.json`` and ``reward_vs_nfe.png`` (reward vs NFE for each
calibration and the best-guidance baseline) into ``--out``, each run in ``--out/<name>`` with its
``calibration.json``. ``--reuse`` keeps finished runs of the same length (only the scoring is
redone). Every run and the scoring use ``--threads`` torch threads (default 1: on cores shared
with other work, two spinning threads per process slow a round down up to 30x; one degrades
gently). Wall times are the machine's at the time: on shared cores they vary.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: name → (label, overrides) of each calibration; all start from examples/toy.yaml at guidance 2.
CALIBRATIONS = {
    "nfe2": ("calibrated for NFE 2", ["objective.options.steps=2"]),
    "nfe4": ("calibrated for NFE 4", ["objective.options.steps=4"]),
    "nfe2-4": ("calibrated for NFE 2 and 4 (mean)", ["objective.options.steps=[2,4]"]),
}
GUARDED = {
    "nfe2-guard": ("calibrated for NFE 2, Σω = 1", ["objective.options.steps=2", "objective.options.omega_sum=[1,1]"]),
    "nfe2-4-guard": ("calibrated for NFE 2 and 4, Σω = 1",
                     ["objective.options.steps=[2,4]", "objective.options.omega_sum=[1,1]"]),
}


def numbers(text: str, kind: type) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def run_calibration(name: str, overrides: list[str], out: Path, rounds: int, reuse: bool, threads: int) -> float | None:
    """Run one calibration (unless ``reuse`` finds it finished); its wall time in seconds, or the
    recorded one of a reused run."""
    run_dir = out / name
    best = run_dir / "best.json"
    if reuse and best.is_file():
        summary = json.loads(best.read_text())
        if summary.get("finished") and summary.get("rounds") == rounds:
            wall = run_dir / "wall.json"
            print(f"{name}: reusing the finished run in {run_dir}", flush=True)
            return json.loads(wall.read_text())["seconds"] if wall.is_file() else None
    command = [sys.executable, "-m", "calibri.core.cli", "run", str(ROOT / "examples" / "toy.yaml"), "-o", str(run_dir),
               "--overwrite", "--quiet", "objective.options.guidance_scale=2", f"budget.rounds={rounds}",
               "callbacks=[]", *overrides]
    print(f"{name}: {' '.join(command[3:])}", flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads),
                                             "MKL_NUM_THREADS": str(threads)})
    seconds = time.monotonic() - started
    (run_dir / "wall.json").write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
    print(f"{name}: {seconds:.0f} s", flush=True)
    return seconds


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = a - b
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def mean_sem(a: np.ndarray) -> tuple[float, float]:
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60, help="rounds of every calibration (default 60)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "nfe-range")
    parser.add_argument("--steps", default="2,4,8", help="NFEs to score at")
    parser.add_argument("--guidance", default="1.25,1.5,2,2.5,3,4,5,6", help="guidance scales of the baseline")
    parser.add_argument("--seeds", default="9001,9002", help="image seeds of the held-out scoring (none a run uses)")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of the same length")
    parser.add_argument("--with-guard", action="store_true", help="also the NFE-2 and NFE-2-and-4 calibrations with omega_sum: [1, 1]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run and of the scoring")
    args = parser.parse_args()
    steps, guidance, seeds = numbers(args.steps, int), numbers(args.guidance, float), numbers(args.seeds, int)
    calibrations = {**CALIBRATIONS, **(GUARDED if args.with_guard else {})}
    args.out.mkdir(parents=True, exist_ok=True)

    walls = {name: run_calibration(name, overrides, args.out, args.rounds, args.reuse, args.threads)
             for name, (_, overrides) in calibrations.items()}

    import torch

    from calibri.plugins.dit.calibration_file import save_calibration
    from calibri.plugins.dit.evaluation import variant_values
    from calibri.plugins.dit.objective import score_images
    from calibri.plugins.dit.report import held_out, load_run_objective, run_best, selected_values

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    scores: dict[tuple[str, int], np.ndarray] = {}  # (variant, NFE) → per-image rewards, seeds concatenated

    def score(objective: Any, key: str, values: Any, n_steps: int, prompts: list[str], metadata: list[Any]) -> None:
        parts = []
        for seed in seeds:
            images = objective.images(values, prompts, seed, n_steps)
            parts.append(score_images(objective.reward, images, prompts, metadata)[0])
        scores[(key, n_steps)] = np.concatenate(parts)

    for i, name in enumerate(calibrations):
        run_dir = args.out / name
        objective, stream, _ = load_run_objective(run_dir)
        try:
            values, _ = selected_values(run_best(run_dir), run_dir / "best.json")
            feasible, _ = objective.feasible(values)
            objective.calibrator.set_values(dict(feasible))
            save_calibration(objective.calibrator, run_dir / "calibration.json", objective.calibrated_for())
            prompts, metadata, _ = held_out(stream)
            for n_steps in steps:
                score(objective, name, values, n_steps, prompts, metadata)
                if i == 0:  # the uncalibrated model: the same for every run (same model, guidance 2, cfg form)
                    for g in guidance:
                        g_values, _ = variant_values(objective, f"guidance={g:g}", None)
                        score(objective, f"g={g:g}", g_values, n_steps, prompts, metadata)
        finally:
            objective.close()
        print(f"scored {name} ({time.monotonic() - started:.0f} s)", flush=True)
    scoring_seconds = time.monotonic() - started

    best_g = {n: max(guidance, key=lambda g: scores[(f"g={g:g}", n)].mean()) for n in steps}
    results: dict[str, Any] = {"rounds": args.rounds, "steps": steps, "guidance": guidance, "seeds": seeds,
                               "images_per_cell": int(len(scores[(next(iter(calibrations)), steps[0])])),
                               "wall_seconds": walls, "scoring_seconds": round(scoring_seconds, 1),
                               "baseline": {}, "calibrations": {}}
    for n in steps:
        base = scores[(f"g={best_g[n]:g}", n)]
        results["baseline"][str(n)] = {"guidance": best_g[n], "mean_sem": mean_sem(base),
                                       "by_guidance": {f"{g:g}": mean_sem(scores[(f"g={g:g}", n)]) for g in guidance}}
        for name in calibrations:
            own = scores[(name, n)]
            results["calibrations"].setdefault(name, {})[str(n)] = {"mean_sem": mean_sem(own), "vs_best_g": paired(own, base)}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    header = "| held-out prompts × seeds (n = {}) | {} | wall time |".format(
        results["images_per_cell"], " | ".join(f"NFE {n}" for n in steps))
    lines = [header, "|---|" + "---|" * (len(steps) + 1)]
    lines.append("| baseline, best guidance at each NFE | " + " | ".join(
        "{:.3f} ± {:.3f} (g = {:g})".format(*results["baseline"][str(n)]["mean_sem"], best_g[n]) for n in steps) + " | — |")
    for name, (label, _) in calibrations.items():
        cells = []
        for n in steps:
            cell = results["calibrations"][name][str(n)]
            cells.append("{:.3f} ± {:.3f} ({:+.3f} ± {:.3f})".format(*cell["mean_sem"], *cell["vs_best_g"]))
        wall = walls[name]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'—' if wall is None else f'{wall:.0f} s'} |")
    lines += ["", f"Mean reward ± s.e. (toy_oracle); in brackets the paired difference from the best-guidance "
              f"baseline at the same NFE. {args.rounds} rounds each, {args.threads} torch thread(s); scored on seeds "
              f"{', '.join(map(str, seeds))}; scoring took {scoring_seconds:.0f} s."]
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    plot(results, calibrations, args.out / "reward_vs_nfe.png")


def plot(results: dict[str, Any], calibrations: dict[str, tuple[str, list[str]]], path: Path) -> None:
    from calibri.core.report import pyplot

    plt = pyplot(path.name)
    if plt is None:
        return
    steps = results["steps"]
    fig, ax = plt.subplots(figsize=(9.5, 4.4), dpi=110)
    curves = [("baseline, best guidance per NFE", [results["baseline"][str(n)]["mean_sem"] for n in steps], "k", "--")]
    curves += [(label, [results["calibrations"][name][str(n)]["mean_sem"] for n in steps], None, "-")
               for name, (label, _) in calibrations.items()]
    for label, points, colour, style in curves:
        ys, es = np.array([p[0] for p in points]), np.array([p[1] for p in points])
        line, = ax.plot(steps, ys, marker="o", linestyle=style, label=label, **({"color": colour} if colour else {}))
        ax.fill_between(steps, ys - es, ys + es, alpha=0.15, color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps)
    ax.set_xticklabels([str(n) for n in steps])
    ax.set_xlabel("sampling steps (NFE)")
    ax.set_ylabel("mean reward, held-out prompts and seeds")
    ax.set_title(f"toy model: calibrations vs NFE ({results['rounds']} rounds each)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
