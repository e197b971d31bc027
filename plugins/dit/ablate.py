"""``calibri ablate``: each site set to each value, all else identity, on fixed prompts and seeds.

The study behind Calibri: switching single blocks off sometimes helps, re-weighting them helps
more often. For a run config's model, reward and granularity, every site is set to every value
(in every ensemble copy and time bucket; other sites at 1, ω at its initial value) and scored on
the same images as the identity, so each cell's effect is a paired difference with a standard
error and a Holm-adjusted p-value. Cells go through the config's executor, a few at a time, and
each is saved as it ends: rerunning the command continues a killed study (see
:mod:`.ablation_log`). The report (CSV, JSON, heat-map PNG, markdown) is rewritten at the end.
"""
from __future__ import annotations

import inspect
import json
import shlex
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from .ablation_study import DEFAULT_VALUES


def default_output(config_path: str, name: str | None) -> Path:
    """``runs/<name>-ablation``: beside the run directory ``calibri run`` would use."""
    from calibri.core.commands import default_run_dir

    run_dir = default_run_dir(config_path, name)
    return run_dir.with_name(run_dir.name + "-ablation")


@click.command("ablate")
@click.argument("config_path", metavar="RUN.yaml", type=click.Path())
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--values", "values_text", default=",".join(f"{v:g}" for v in DEFAULT_VALUES), show_default=True,
              help="Values each site is set to, comma-separated (1 is the identity).")
@click.option("--prompts", "n_prompts", type=click.IntRange(min=1), default=None,
              help="Use the first N prompts of the validation set (default: all of them).")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per prompt, each with its own fixed seed.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="Significance level, after Holm's correction over the study's cells.")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Folder for the study (default: runs/<name>-ablation).")
@click.option("--overwrite", is_flag=True, help="Start the study again, discarding the folder's earlier cells.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def ablate_command(config_path: str, overrides: tuple[str, ...], values_text: str, n_prompts: int | None,
                   seeds: int, alpha: float, output: str | None, overwrite: bool, quiet: bool) -> None:
    """Score every site of RUN.yaml's calibration set to each of --values, all else identity.

    Every cell is scored on the same prompts and seeds as the identity; writes ablation.csv,
    ablation.json, ablation.png (heat-map) and ablation.md. Rerun the same command to continue
    an interrupted study.
    """
    from calibri.core.config import load_config

    from .ablation_study import parse_values

    values = parse_values(values_text)
    config = load_config(config_path, overrides)
    out = Path(output) if output else default_output(config_path, config.name)
    command = ["calibri", "ablate", config_path, *overrides, "--values", ",".join(f"{v:g}" for v in values),
               *(["--prompts", str(n_prompts)] if n_prompts is not None else []), "--seeds", str(seeds),
               *(["--alpha", f"{alpha:g}"] if alpha != 0.05 else []), "-o", str(out)]
    document = run_ablation(config, config_path, values, n_prompts, seeds, alpha, out, overwrite, quiet,
                            shlex.join(command))
    summary, identity = document["summary"], document["identity"]
    parts = [f"identity {identity['mean']:.4f} ± {identity['sem']:.4f} over {identity['n']} images"]
    parts += [f"{what}: {tally['improve_significantly']} of {tally['sites']} sites improve significantly"
              for what, tally in (("switched off", summary["switched_off"]), ("re-weighted", summary["reweighted"]))
              if tally]
    click.echo("; ".join(parts))
    click.echo(f"written: {out / 'ablation.md'}")


def run_ablation(config: Any, config_path: str, values: Sequence[float], n_prompts: int | None, seeds: int,
                 alpha: float, out: Path, overwrite: bool = False, quiet: bool = True,
                 command: str = "") -> dict[str, Any]:
    """Run (or continue) the study and write its report; returns ``ablation.json``'s content.
    Everything the user gave is checked before the folder is touched or a model loads."""
    from calibri.core.errors import ConfigError
    from calibri.core.run import plan
    from calibri.core.store import RunStore

    from . import ablation_log as log
    from .ablation_study import Sites, cells, image_set

    if config.objective.name != "calibri":
        raise ConfigError("objective.name", f"calibri ablate studies the sites of the calibri objective, "
                                            f"not of {config.objective.name!r}")
    log.check_folder(out)
    plan_ = plan(config)
    options = plan_.recipe.options
    images = image_set(options, n_prompts, seeds)
    sites = Sites.of(options)
    study = study_definition(config, values, images)
    log.check_study(out, study, overwrite)  # before the lock creates the folder: a refusal leaves nothing
    with RunStore(out).lock():
        if not log.check_study(out, study, overwrite):
            log.start(out, study)
        evaluate_cells(plan_, out, cells(sites, values), images, sites, quiet)
        return write_report(out, config_path, command, options, values, images, sites, alpha,
                            config.executor.name)


def study_definition(config: Any, values: Sequence[float], images: Any) -> dict[str, Any]:
    """What the cells' numbers depend on, keyed as the user names it (a change is reported as
    ``--values changed from ... to ...``); the executor, ``--alpha`` and the budget may change."""
    dumped = config.model_dump(mode="json")
    return {"objective": dumped["objective"], "plugins": dumped["plugins"], "--values": list(values),
            "--prompts": len(images.prompts), "--seeds": images.seeds,
            "prompt set (sha256)": images.digest}


def evaluate_cells(plan_: Any, out: Path, all_cells: Sequence[Any], images: Any, sites: Any, quiet: bool) -> int:
    """Evaluate the cells not yet finished in ``out``, a batch of one per worker at a time, each
    saved as its batch ends. Returns how many were evaluated."""
    from tqdm.auto import tqdm

    from calibri.core.errors import RunFailed, RunInterrupted

    from . import ablation_log as log
    from .ablation_objective import per_image_recipe
    from .ablation_study import candidate

    done = {r["key"] for r in log.read_cells(out) if r.get("status") == "ok"}
    pending = [cell for cell in all_cells if cell.key not in done]
    if not pending:
        return 0
    session, started = uuid.uuid4().hex[:12], time.monotonic()
    ctx = images.context()
    bar = tqdm(total=len(all_cells), initial=len(all_cells) - len(pending), unit="cell", desc="ablate",
               file=sys.stderr, dynamic_ncols=True, disable=quiet)
    evaluated = 0
    try:
        with build_executor(plan_, per_image_recipe(plan_.recipe), out) as executor:
            info = executor.describe()
            space = plan_.space or info.space
            per_batch = batch_size(plan_.config.executor)
            for start in range(0, len(pending), per_batch):
                batch = pending[start : start + per_batch]
                results = executor.evaluate([candidate(cell, sites, space) for cell in batch], ctx)
                for cell, result in zip(batch, results):
                    log.append_cell(out, cell_record(cell, result, info.direction, session,
                                                     time.monotonic() - started))
                    evaluated += 1
                    bar.update(1)
                    bar.set_postfix_str(f"{cell.key}: {result.value:.4g}" if result.ok else f"{cell.key}: failed",
                                        refresh=False)
                failed = [result for cell, result in zip(batch, results) if cell.is_identity and not result.ok]
                if failed:  # no cell could be compared with it: stop now
                    raise RunFailed(f"the identity cell failed ({failed[0].error}); rerun to retry")
    except KeyboardInterrupt:
        raise RunInterrupted(f"interrupted; {len(all_cells) - len(pending) + evaluated} of {len(all_cells)} cells "
                             f"are saved in {out}: rerun the same command to continue") from None
    finally:
        bar.close()
    return evaluated


def build_executor(plan_: Any, recipe: Any, out: Path) -> Any:
    """The config's executor, as ``calibri run`` builds it, for ``recipe``."""
    from calibri.core.plugins import build_from

    registration, settings = plan_.executor, plan_.config.executor
    extra = {"run_dir": str(out)} if "run_dir" in inspect.signature(registration.factory).parameters else {}
    return build_from(registration, registration.factory, recipe, workers=settings.workers, devices=settings.devices,
                      **extra, **plan_.executor_options)


def batch_size(settings: Any) -> int:
    """Cells per executor call: one per worker, so each cell is saved soon after it ends."""
    return max(1, len(settings.devices) if settings.devices else settings.workers)


def cell_record(cell: Any, result: Any, direction: str, session: str, elapsed: float) -> dict[str, Any]:
    """One line of ``cells.jsonl``; ``elapsed`` is the wall time of this invocation (``session``)
    when the cell ended."""
    record: dict[str, Any] = {"key": cell.key, "site": cell.site, "value": cell.value, "status": result.status,
                              "direction": direction, "session": session, "elapsed": round(elapsed, 3),
                              "eval_seconds": round(result.wall_time, 3)}
    if result.ok:
        record.update(mean=result.value, rewards=result.artifacts["rewards"])
    else:
        record["error"] = result.error
    return record


def wall_time(records: Sequence[Mapping[str, Any]]) -> tuple[float, int]:
    """``(seconds, invocations)``: each invocation's wall time up to its last saved cell, summed."""
    per_session: dict[str, float] = {}
    for record in records:
        session = str(record.get("session"))
        per_session[session] = max(per_session.get(session, 0.0), float(record.get("elapsed") or 0.0))
    return sum(per_session.values()), len(per_session)


def write_report(out: Path, config_path: str, command: str, options: Mapping[str, Any], values: Sequence[float],
                 images: Any, sites: Any, alpha: float, executor: str) -> dict[str, Any]:
    """Analyse the saved cells and write ablation.csv/.json/.md and the heat-map."""
    from calibri.core.errors import RunFailed
    from calibri.core.store import atomic_write_text

    from . import ablation_log as log
    from .ablation_plot import plot_heatmap
    from .ablation_report import markdown, write_csv, write_json
    from .ablation_stats import analyse, best_per_site, counts
    from .ablation_study import cells
    from .objective import CalibriOptions

    records = log.read_cells(out)
    latest = {r["key"]: r for r in records}
    ordered = [latest[cell.key] for cell in cells(sites, values) if cell.key in latest]
    identity = latest.get("identity")
    if identity is None or identity["status"] != "ok":
        why = identity.get("error") if identity else "not evaluated"
        raise RunFailed(f"the identity cell failed ({why}); no cell can be compared; rerun to retry")
    direction = identity["direction"]
    maximize = direction == "maximize"
    results = analyse(ordered, maximize, alpha)
    best = best_per_site(results, maximize)
    opts = CalibriOptions.trusted(options)
    seconds, invocations = wall_time(records)
    rows = len(next(iter(sites.parameters.values())))
    copies = f"{opts.copies} cop{'y' if opts.copies == 1 else 'ies'}"
    buckets = f"{opts.time_buckets} time bucket{'s' if opts.time_buckets != 1 else ''}"
    layout = (f"{copies}, {buckets}: each cell sets its site in all {rows} of them" if rows > 1
              else f"{copies}, {buckets}") + "; ω at its initial value"
    steps = opts.step_counts
    document: dict[str, Any] = {
        "command": command,
        "study": {"config": config_path, "model": opts.model, "model_class": sites.model_class,
                  "granularity": sites.granularity, "copies": opts.copies, "time_buckets": opts.time_buckets,
                  "layout": layout, "reward": opts.reward if isinstance(opts.reward, str) else json.dumps(opts.reward),
                  "steps": ", ".join(map(str, steps)) + (" (each image's reward: its mean over them)"
                                                         if len(steps) > 1 else "")},
        "images": {"source": images.source, "split": images.split, "prompts": len(images.prompts),
                   "seeds": images.seeds, "seed": images.seed, "n": images.n_images},
        "values": list(values), "sites": list(sites.names), "site_parameters": {k: list(v) for k, v in
                                                                            sites.parameters.items()},
        "direction": direction, "alpha": alpha, "correction": "holm",
        "family_size": sum(1 for r in results if r.ok and r.site is not None and r.value != 1.0),
        "identity": results[0].as_dict(), "cells": [r.as_dict() for r in results[1:]],
        "best_per_site": {site: (None if r is None else {"value": r.value, "diff": r.diff, "diff_sem": r.diff_sem,
                                                         "p_holm": r.p_holm, "significant": r.significant})
                          for site, r in best.items()},
        "summary": counts(results, sites.names),
        "complete": len(ordered) == len(cells(sites, values)) and all(r.ok for r in results),
        "wall_time_seconds": round(seconds, 1), "invocations": invocations, "executor": executor}
    write_csv(results, out / "ablation.csv")
    write_json(document, out / "ablation.json")
    plot_heatmap(results, sites.names, values, out / "ablation.png", maximize,
                 f"{opts.model}, {sites.granularity} granularity: {images.n_images} images per cell", alpha)
    atomic_write_text(out / "ablation.md", markdown(document, results, best))
    return document
