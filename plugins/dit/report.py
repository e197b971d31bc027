"""The report of a calibration run: calibration file, scores, curves and image grids.

Written into the run directory when the run ends (callback ``calibration_report``) or on demand
(``calibri evaluate RUN_DIR``)::

    calibration.json     the selected values (chosen on validation), ready for apply_calibration
    evaluation.csv/.md   baseline vs calibrated (and tuned-guidance baselines) across NFE
    reward_vs_nfe.png    the same as a plot
    reward_curve.png     training reward per round, validation points, the baseline
    grid.png             baseline vs calibrated images: same prompts, same seeds
    report.md            all of it on one page
"""
from __future__ import annotations

import json
import math
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibri.core.errors import UserError
from calibri.core.report import pyplot
from calibri.core.space import Params

DEFAULT_NFE = (2, 4, 8, 16)


def load_run_objective(run_dir: Path, device: str | None = None,
                       reward: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """``(objective, stream, config)`` rebuilt from a run directory's resolved config; ``reward``,
    when given, replaces the run's reward (evaluating a calibration with another judge)."""
    from calibri.core.config import read_yaml, validate
    from calibri.core.run import plan

    data = read_yaml(run_dir / "config.yaml")
    if reward is not None and isinstance(data.get("objective"), dict):
        objective_spec = data["objective"]
        options = objective_spec.get("options")
        objective_spec["options"] = {**(options if isinstance(options, dict) else {}), "reward": reward}
    config = validate(data)
    if config.objective.name != "calibri":
        raise UserError(f"{run_dir}: not a Calibri calibration run (objective {config.objective.name!r})")
    plan_ = plan(config)
    objective = plan_.recipe.build(device)
    from .objective import calibri_stream

    stream = calibri_stream(config.seed, **plan_.recipe.options)
    return objective, stream, config.model_dump()


def run_best(run_dir: Path) -> dict[str, Any]:
    """The run's best.json; a one-line error before the first round has finished."""
    from calibri.core.store import RunStore

    best = RunStore(run_dir).read_best()
    if best is None:
        raise UserError(f"{run_dir}: no best.json yet (has the run finished a round?)")
    return best


def selected_values(best: dict[str, Any], where: str | Path = "best.json") -> tuple[Params, str]:
    """The run's result: the best point on validation, else the optimiser's recommendation. A
    best.json (``where``) that holds neither as names → finite numbers is a one-line error."""
    validation = best.get("validation")
    selected = validation.get("selected") if isinstance(validation, dict) else None
    if isinstance(selected, dict) and selected:
        params = selected.get("params")
        how = (f"best on validation ({selected.get('source', 'validation')} after round "
               f"{selected.get('after_round', '?')})")
    else:
        params = best.get("recommendation")
        how = "the optimiser's recommendation (the run had no validation)"
    if not (isinstance(params, dict) and params and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for k, v in params.items())):
        raise UserError(f"{where}: holds no parameter values (names mapped to finite numbers); "
                        f"'calibri resume' rewrites it from the checkpoint")
    return params, how


def held_out(stream: Any) -> tuple[list[str], list[Any], int]:
    if getattr(stream, "has_validation", False):
        seed, data = stream.validation_data()
        return data["prompts"], data["metadata"], seed
    data = stream.next_round(0)
    return data["prompts"], data["metadata"], stream.validation_seed


def write_report(run_dir: str | Path, nfe: Sequence[int] = DEFAULT_NFE, guidance: Sequence[float] = (),
                 grid_prompts: int = 8, device: str | None = None) -> Path:
    from .calibration_file import save_calibration
    from .evaluation import evaluate, markdown_table, off_nfe_note, plot_nfe, write_csv

    run_dir = Path(run_dir)
    started = time.monotonic()
    objective, stream, config = load_run_objective(run_dir, device)
    try:
        best = run_best(run_dir)
        values, how = selected_values(best, run_dir / "best.json")
        feasible, projected = objective.feasible(values)  # what validation scored (omega_sum)
        objective.calibrator.set_values(dict(feasible))
        save_calibration(objective.calibrator, run_dir / "calibration.json", objective.calibrated_for())
        if projected:
            how += "; its ω projected into objective.options.omega_sum, as it was scored"
        prompts, metadata, seed = held_out(stream)
        where = ("held-out prompts, fixed seeds" if getattr(stream, "has_validation", False)
                 else "TRAINING prompts of round 0 (the run has no validation set: gains are overstated)")
        made_for = list(objective.step_counts)
        steps = sorted(set(int(s) for s in nfe) | set(made_for))
        variants = ["baseline", "calibrated", *[f"guidance={g:g}" for g in guidance]]
        rows = evaluate(objective, variants, steps, prompts, metadata, seed, calibrated=values)
        write_csv(rows, run_dir / "evaluation.csv", made_for)
        table = markdown_table(rows, made_for)
        note = off_nfe_note(rows, made_for, objective.direction == "maximize")
        (run_dir / "evaluation.md").write_text(table + "\n" + (f"\n{note}\n" if note else ""), encoding="utf-8")
        plot_nfe(rows, run_dir / "reward_vs_nfe.png", f"{run_dir.name}: {where}", made_for)
        plot_curve(run_dir, run_dir / "reward_curve.png")
        pick = np.linspace(0, len(prompts) - 1, min(grid_prompts, len(prompts))).round().astype(int).tolist()
        grid_p = [prompts[i] for i in pick]
        before = objective.images(None, grid_p, seed)
        after = objective.images(values, grid_p, seed)
        plot_grid(grid_p, before, after, run_dir / "grid.png", made_for[0])
        summary = _summary_text(run_dir, best, config, objective, how, rows, table, where, note)
        (run_dir / "report.md").write_text(summary, encoding="utf-8")
    finally:
        objective.close()
    print(f"report: {run_dir / 'report.md'} ({time.monotonic() - started:.0f} s)")
    return run_dir / "report.md"


def _summary_text(run_dir: Path, best: dict[str, Any], config: dict[str, Any], objective: Any, how: str,
                  rows: Sequence[Any], table: str, where: str, note: str | None) -> str:
    from .calibration_file import describe_settings
    from .evaluation import matching_nfe

    opts = objective.options
    made_for = list(objective.step_counts)
    maximize = objective.direction == "maximize"
    own = {(r.variant, r.steps): r for r in rows}
    nfes = ", ".join(map(str, made_for))
    combined = (f" (each candidate scored at NFE {nfes}, {'mean' if opts.steps_combine == 'mean' else 'worst'} of them)"
                if len(made_for) > 1 else "")
    lines = [f"# Calibration report: {run_dir.name}", "",
             f"- model: `{opts.model}` ({type(objective.pipe.transformer).__name__}), granularity **{opts.granularity}**, "
             f"{objective.calibrator.count()} parameters ({opts.copies} cop{'y' if opts.copies == 1 else 'ies'}, "
             f"form {objective.calibrator.form})",
             f"- optimiser `{config['optimizer']['name']}`, {best['rounds']} rounds, {best['evaluations']} evaluations, "
             f"{best['elapsed_seconds']:.0f} s; bucket {opts.bucket_size} prompts per round, {nfes} steps{combined}",
             f"- calibrated for: {describe_settings(objective.calibrated_for())}",
             f"- result: {how}; written to `calibration.json`"]
    for n in made_for:
        cal, base = own.get(("calibrated", n)), own.get(("baseline", n))
        if cal is not None and base is not None:
            z = f", {cal.z:.1f} s.e." if cal.z is not None else ""
            lines.append(f"- reward at NFE {n} ({where}): baseline {base.mean:.4f} ± {base.sem:.4f} → calibrated "
                         f"{cal.mean:.4f} ± {cal.sem:.4f} (paired difference {cal.diff:+.4f} ± {cal.diff_sem:.4f}{z})")
        match = matching_nfe(rows, at_steps=n, maximize=maximize)
        if match is not None:
            lines.append(f"- the baseline needs NFE {match} to match the calibrated model at NFE {n}")
        else:
            lines.append(f"- no evaluated NFE of the baseline matches the calibrated model at NFE {n}")
    if note:
        lines.append(f"- {note}")
    lines += ["", f"## Baseline vs calibrated across NFE ({where})", "", table, "",
              "![reward vs NFE](reward_vs_nfe.png)", "", "## Training", "", "![reward per round](reward_curve.png)",
              "", "## Images (top: baseline, bottom: calibrated; same prompts and seeds)", "", "![grid](grid.png)", ""]
    return "\n".join(lines)


def plot_curve(run_dir: Path, path: Path) -> Path | None:
    plt = pyplot(path.name)
    if plt is None:
        return None
    from calibri.core.store import RunStore

    store = RunStore(run_dir)
    by_round: dict[int, list[float]] = {}
    for trial in store.read_trials():
        if trial.get("status") == "ok":
            by_round.setdefault(trial["round"], []).append(trial["value"])
    rounds = sorted(by_round)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot([r + 1 for r in rounds], [np.mean(by_round[r]) for r in rounds], color="tab:gray", label="round mean (training bucket)")
    best_of = np.max if (store.read_best() or {}).get("direction", "maximize") == "maximize" else np.min
    ax.plot([r + 1 for r in rounds], [best_of(by_round[r]) for r in rounds], color="tab:gray", alpha=0.4,
            linestyle=":", label="round best (training bucket)")
    validation = store.read_validation()
    for source, colour in (("recommendation", "tab:blue"), ("incumbent", "tab:orange")):
        points = [(v["after_round"], v["value"]) for v in validation if v["source"] == source and v["value"] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", color=colour, label=f"validation: {source}")
    baseline = next((v["value"] for v in validation if v["source"] == "baseline"), None)
    if baseline is not None:
        ax.axhline(baseline, color="tab:red", linestyle="--", label="validation: baseline")
    ax.set_xlabel("round (generation)")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_grid(prompts: Sequence[str], before: Any, after: Any, path: Path, steps: int) -> Path | None:
    plt = pyplot(path.name)
    if plt is None:
        return None
    n = len(prompts)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.9), dpi=110, squeeze=False)
    for j in range(n):
        for i, (label, images) in enumerate((("baseline", before), ("calibrated", after))):
            ax = axes[i][j]
            ax.imshow(images[j].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label)
        axes[0][j].set_title("\n".join(textwrap.wrap(prompts[j], 16)), fontsize=7)
    fig.suptitle(f"same prompts and seeds, {steps} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class CalibrationReport:
    """Run callback: writes the report (see the module docstring) when a calibration run ends."""

    def __init__(self, nfe: list[int] = list(DEFAULT_NFE), guidance: list[float] = [], grid_prompts: int = 8,
                 device: str | None = None) -> None:
        from calibri.core.errors import ConfigError

        from .models import check_device, finite_number
        from .objective import MAX_GUIDANCE, MAX_STEPS

        # Checked when the run starts, not when it ends: a mistake here would waste the whole run.
        field = "callbacks.calibration_report.options"
        if any(not 1 <= n <= MAX_STEPS for n in nfe):
            raise ConfigError(f"{field}.nfe", f"step counts must be between 1 and {MAX_STEPS}, got {nfe!r}")
        for g in guidance:
            finite_number(g, f"{field}.guidance", MAX_GUIDANCE)
        if grid_prompts < 1:
            raise ConfigError(f"{field}.grid_prompts", f"must be at least 1, got {grid_prompts}")
        if device is not None:
            check_device(device, f"{field}.device")
        self.nfe, self.guidance, self.grid_prompts, self.device = nfe, guidance, grid_prompts, device
        self._run_dir: str | None = None

    def on_run_start(self, info: Any) -> None:
        self._run_dir = info.run_dir

    def on_run_end(self, summary: Any) -> None:
        if self._run_dir is not None:
            write_report(self._run_dir, self.nfe, self.guidance, self.grid_prompts, self.device)
