"""The report of a calibration run: calibration file, scores, curves and image grids.

Written into the run directory when the run ends (callback ``calibration_report``) or on demand
(``calibri evaluate RUN_DIR``)::

    calibration.json     the selected values (chosen on validation), ready for apply_calibration
    evaluation.csv/.md   baseline vs calibrated (and tuned-guidance baselines) across NFE
    reward_vs_nfe.png    the same as a plot
    reward_curve.png     training reward per round, validation points, the baseline
    grid.png             baseline vs calibrated images: same prompts, same seeds
    report.md            all of it on one page

Its size follows the run (:func:`plan_report`): unless given, the NFEs and the number of held-out
prompts are chosen so that the report makes at most ``budget_fraction`` (default 1/4) of the
images-times-steps the run made, so a short run gets a short report.
"""
from __future__ import annotations

import json
import math
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibri.core.errors import UserError
from calibri.core.report import pyplot
from calibri.core.space import Params

if TYPE_CHECKING:
    from .buckets import BucketSchedule

#: The NFEs an automatic plan may add to those the calibration was made for, cheapest first.
DEFAULT_NFE = (2, 4, 8, 16)
#: The report's default share of the run's own sampling work (see :func:`plan_report`).
DEFAULT_BUDGET_FRACTION = 0.25
#: The fewest held-out prompts an automatic plan scores (all of them when there are fewer): below
#: this a mean reward says little, whatever the run cost.
MIN_PROMPTS = 8


@dataclass(frozen=True)
class ReportPlan:
    """What a report evaluates, and what that costs next to the run, in image-steps (one image
    sampled for one step; every variant samples the same way, so it is the unit of time)."""

    nfe: tuple[int, ...]
    prompts: int  # the first ``prompts`` held-out prompts: their images are the ones validation made
    available: int  # held-out prompts there are
    variants: int
    grid_prompts: int
    cost: int
    run_cost: int
    budget_fraction: float | None

    def describe(self) -> str:
        """One line for the log and report.md: what was evaluated, its cost next to the run's."""
        share = f"{self.cost / self.run_cost:.0%} of" if self.run_cost else "vs"
        if self.budget_fraction is None:
            limit = "budget_fraction null: no limit"
        else:
            limit = f"budget_fraction {self.budget_fraction:g}"
            if self.cost > self.budget_fraction * self.run_cost:
                limit += (f", exceeded by what is always evaluated: the NFEs it was made for, given options, "
                          f"at least {MIN_PROMPTS} prompts")
        return (f"NFE {', '.join(map(str, self.nfe))} on {self.prompts} of {self.available} held-out prompts, "
                f"{self.variants} variants: {self.cost:,} image-steps, {share} the run's {self.run_cost:,} "
                f"({limit})")


def report_cost(nfe: Sequence[int], prompts: int, variants: int, grid_prompts: int, grid_steps: int) -> int:
    """Image-steps of a report: every variant at every NFE on ``prompts``, plus the grid's two rows."""
    return variants * prompts * sum(nfe) + 2 * grid_prompts * grid_steps


def run_cost(run_dir: Path, bucket_size: "int | BucketSchedule", step_counts: Sequence[int],
             validation_prompts: int) -> int:
    """Image-steps the run made: each trial scored its round's bucket of prompts (``bucket_size``:
    a count or a schedule), each validation record ``validation_prompts``, at every NFE it was
    calibrated for (counted from the run's files)."""
    from calibri.core.store import RunStore

    from .buckets import BucketSchedule

    store = RunStore(run_dir)
    schedule = BucketSchedule.of(bucket_size)
    per_nfe = sum(step_counts)
    trained = sum(schedule.size(int(trial.get("round", 0))) for trial in store.read_trials())
    return (trained + len(store.read_validation()) * validation_prompts) * per_nfe


def plan_report(made_for: Sequence[int], available: int, run_image_steps: int, variants: int,
                nfe: Sequence[int] | None = None, prompts: int | None = None, grid_prompts: int = 8,
                budget_fraction: float | None = DEFAULT_BUDGET_FRACTION) -> ReportPlan:
    """The report's NFEs and prompt count. Given values are used as they are; the others fill the
    budget, ``budget_fraction`` × the run's image-steps (None: no budget, everything):

    1. the NFEs the calibration was made for, and ``nfe`` when given, are always evaluated;
    2. prompts (unless given): as many of the held-out prompts as fit with those NFEs and the
       grid, at least :data:`MIN_PROMPTS` (or all there are);
    3. NFEs (unless given): :data:`DEFAULT_NFE` ones are added, cheapest first, while they fit.
    """
    made_for = [int(n) for n in made_for]
    grid = min(grid_prompts, available)
    required = sorted(set(made_for) | {int(n) for n in (nfe or ())})
    budget = None if budget_fraction is None else budget_fraction * run_image_steps

    def cost(steps: Sequence[int], count: int) -> int:
        return report_cost(steps, count, variants, grid, made_for[0])

    if prompts is not None:
        count = min(prompts, available)
    elif budget is None:
        count = available
    else:
        fits = int((budget - cost(required, 0)) // max(1, variants * sum(required)))
        count = min(available, max(MIN_PROMPTS, fits))
    steps = list(required)
    if nfe is None:
        for n in DEFAULT_NFE:
            if n not in steps and (budget is None or cost([*steps, n], count) <= budget):
                steps.append(n)
    steps.sort()
    return ReportPlan(tuple(steps), count, available, variants, grid, cost(steps, count), run_image_steps,
                      budget_fraction)


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


def write_report(run_dir: str | Path, nfe: Sequence[int] | None = None, guidance: Sequence[float] = (),
                 grid_prompts: int = 8, device: str | None = None, prompts: int | None = None,
                 budget_fraction: float | None = DEFAULT_BUDGET_FRACTION, quiet: bool = False) -> Path:
    """Write the report (see the module docstring) into ``run_dir``; its size is
    :func:`plan_report`'s. Progress goes to stderr unless ``quiet``."""
    from tqdm.auto import tqdm

    from .calibration_file import save_calibration
    from .evaluation import evaluate, markdown_table, off_nfe_note, plot_nfe, write_csv

    run_dir = Path(run_dir)
    started = time.monotonic()
    objective, stream, config = load_run_objective(run_dir, device)
    bar = None
    try:
        best = run_best(run_dir)
        values, how = selected_values(best, run_dir / "best.json")
        feasible, projected = objective.feasible(values)  # what validation scored (omega_sum)
        objective.calibrator.set_values(dict(feasible))
        save_calibration(objective.calibrator, run_dir / "calibration.json", objective.calibrated_for())
        if projected:
            how += "; its ω projected into objective.options.omega_sum, as it was scored"
        all_prompts, all_metadata, seed = held_out(stream)
        where = ("held-out prompts, fixed seeds" if getattr(stream, "has_validation", False)
                 else "TRAINING prompts of round 0 (the run has no validation set: gains are overstated)")
        made_for = list(objective.step_counts)
        variants = ["baseline", "calibrated", *[f"guidance={g:g}" for g in guidance]]
        spent = run_cost(run_dir, objective.options.bucket_schedule, made_for,
                         len(all_prompts) if getattr(stream, "has_validation", False) else 0)
        plan_ = plan_report(made_for, len(all_prompts), spent, len(variants), nfe, prompts, grid_prompts,
                            budget_fraction)
        if not quiet:
            print(f"report: {plan_.describe()}", file=sys.stderr)
        prompt_list, metadata = all_prompts[: plan_.prompts], all_metadata[: plan_.prompts]
        bar = tqdm(total=plan_.prompts * len(plan_.nfe) * len(variants) + 2 * plan_.grid_prompts, unit="image",
                   desc="report", file=sys.stderr, disable=quiet, dynamic_ncols=True, leave=False)
        rows = evaluate(objective, variants, plan_.nfe, prompt_list, metadata, seed, calibrated=values,
                        progress=lambda variant, n: bar.update(plan_.prompts))
        write_csv(rows, run_dir / "evaluation.csv", made_for)
        table = markdown_table(rows, made_for)
        note = off_nfe_note(rows, made_for, objective.direction == "maximize")
        (run_dir / "evaluation.md").write_text(table + "\n" + (f"\n{note}\n" if note else ""), encoding="utf-8")
        plot_nfe(rows, run_dir / "reward_vs_nfe.png", f"{run_dir.name}: {where}", made_for)
        plot_curve(run_dir, run_dir / "reward_curve.png")
        grid_p = grid_pick(all_prompts, plan_.grid_prompts)
        before = objective.images(None, grid_p, seed)
        bar.update(len(grid_p))
        after = objective.images(values, grid_p, seed)
        bar.update(len(grid_p))
        plot_grid(grid_p, before, after, run_dir / "grid.png", made_for[0])
        summary = _summary_text(run_dir, best, config, objective, how, rows, table, where, note, plan_)
        (run_dir / "report.md").write_text(summary, encoding="utf-8")
    finally:
        if bar is not None:
            bar.close()
        objective.close()
    print(f"report: {run_dir / 'report.md'} ({time.monotonic() - started:.0f} s)")
    return run_dir / "report.md"


def grid_pick(prompts: Sequence[str], count: int) -> list[str]:
    """``count`` prompts spread evenly over ``prompts`` (the first and last included)."""
    pick = np.linspace(0, len(prompts) - 1, min(count, len(prompts))).round().astype(int).tolist()
    return [prompts[i] for i in pick]


def _summary_text(run_dir: Path, best: dict[str, Any], config: dict[str, Any], objective: Any, how: str,
                  rows: Sequence[Any], table: str, where: str, note: str | None, plan_: ReportPlan) -> str:
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
             f"{best['elapsed_seconds']:.0f} s; bucket {opts.bucket_schedule.label()} prompts per round, {nfes} steps{combined}",
             f"- calibrated for: {describe_settings(objective.calibrated_for())}",
             f"- result: {how}; written to `calibration.json`",
             f"- this report: {plan_.describe()}"]
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


def grid_figure(prompts: Sequence[str], before: Any, after: Any, steps: int, plt: Any,
                labels: tuple[str, str] = ("baseline", "calibrated")) -> Any:
    """A matplotlib figure: ``before`` images on top, ``after`` below, one column per prompt."""
    n = len(prompts)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.9), dpi=110, squeeze=False)
    for j in range(n):
        for i, (label, images) in enumerate(zip(labels, (before, after))):
            ax = axes[i][j]
            ax.imshow(images[j].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label)
        axes[0][j].set_title("\n".join(textwrap.wrap(prompts[j], 16)), fontsize=7)
    fig.suptitle(f"same prompts and seeds, {steps} steps", fontsize=9)
    fig.tight_layout()
    return fig


def plot_grid(prompts: Sequence[str], before: Any, after: Any, path: Path, steps: int) -> Path | None:
    plt = pyplot(path.name)
    if plt is None:
        return None
    fig = grid_figure(prompts, before, after, steps, plt)
    fig.savefig(path)
    plt.close(fig)
    return path


class CalibrationReport:
    """Run callback: writes the report (see the module docstring) when a calibration run ends.

    ``nfe`` and ``prompts`` left unset are chosen to keep the report within ``budget_fraction``
    of the run's own sampling work (:func:`plan_report`; null: no limit)."""

    def __init__(self, nfe: list[int] | None = None, guidance: list[float] = [], prompts: int | None = None,
                 budget_fraction: float | None = DEFAULT_BUDGET_FRACTION, grid_prompts: int = 8,
                 device: str | None = None) -> None:
        from calibri.core.errors import ConfigError

        from .models import check_device, finite_number
        from .objective import MAX_GUIDANCE, MAX_STEPS

        # Checked when the run starts, not when it ends: a mistake here would waste the whole run.
        field = "callbacks.calibration_report.options"
        if nfe is not None and (not nfe or any(not 1 <= n <= MAX_STEPS for n in nfe)):
            raise ConfigError(f"{field}.nfe", f"step counts must be between 1 and {MAX_STEPS}, got {nfe!r}")
        for g in guidance:
            finite_number(g, f"{field}.guidance", MAX_GUIDANCE)
        if prompts is not None and prompts < 1:
            raise ConfigError(f"{field}.prompts", f"must be at least 1, got {prompts}")
        if budget_fraction is not None and not (math.isfinite(budget_fraction) and budget_fraction > 0):
            raise ConfigError(f"{field}.budget_fraction",
                              f"must be a positive number (null: no limit), got {budget_fraction!r}")
        if grid_prompts < 1:
            raise ConfigError(f"{field}.grid_prompts", f"must be at least 1, got {grid_prompts}")
        if device is not None:
            check_device(device, f"{field}.device")
        self.nfe, self.guidance, self.grid_prompts, self.device = nfe, guidance, grid_prompts, device
        self.prompts, self.budget_fraction = prompts, budget_fraction
        self._run_dir: str | None = None
        self._quiet = False

    def on_run_start(self, info: Any) -> None:
        self._run_dir = info.run_dir
        self._quiet = bool(getattr(info, "quiet", False))

    def on_run_end(self, summary: Any) -> None:
        if self._run_dir is not None:
            write_report(self._run_dir, self.nfe, self.guidance, self.grid_prompts, self.device, self.prompts,
                         self.budget_fraction, self._quiet)
