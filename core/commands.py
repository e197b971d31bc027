"""Built-in CLI commands: ``run``, ``resume``, ``plugins``, ``show``."""
from __future__ import annotations

import json
import re
from pathlib import Path

import click

from .hookspecs import hookimpl


def default_run_dir(config_path: str, name: str | None) -> Path:
    """``runs/<name>``: where ``calibri run`` writes without ``-o`` (the config's name, else its file's)."""
    stem = name or Path(config_path).stem
    return Path("runs") / re.sub(r"[^A-Za-z0-9._-]+", "-", stem)


def _report(summary: dict) -> None:
    best = summary.get("best")
    if best:
        failed_validations = (summary.get("validation") or {}).get("failures")
        click.echo(f"best {summary['direction'][:3]} value {best['value']:.6g} at round {best['round']} "
                   f"(candidate {best['candidate']}); {summary['evaluations']} evaluations, "
                   f"{summary['failures']} failed"
                   + (f", {failed_validations} validation evaluations failed" if failed_validations else ""))
    click.echo(f"run directory: {summary['run_dir']}")


@click.command("run")
@click.argument("config_path", metavar="RUN.yaml", type=click.Path())
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("-o", "--output", "run_dir", type=click.Path(), help="Run directory (default: runs/<name>).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in the run directory.")
@click.option("--quiet", is_flag=True, help="No progress bars: the run's, the report's and model-loading libraries'.")
def run_command(config_path: str, overrides: tuple[str, ...], run_dir: str | None, overwrite: bool,
                quiet: bool) -> None:
    """Run the optimisation described by RUN.yaml, with dotted KEY=VALUE overrides."""
    from .config import load_config
    from .run import start_run

    config = load_config(config_path, overrides)
    summary = start_run(config, run_dir or default_run_dir(config_path, config.name), overwrite=overwrite,
                        quiet=quiet)
    _report(summary)


@click.command("resume")
@click.argument("run_dir", type=click.Path())
@click.option("--rounds", type=click.IntRange(min=1), help="Raise the round budget.")
@click.option("--evaluations", type=click.IntRange(min=1), help="Raise the evaluation budget.")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), help="Raise the wall-time budget.")
@click.option("--quiet", is_flag=True, help="No progress bars: the run's, the report's and model-loading libraries'.")
@click.option("--trust-checkpoint", is_flag=True,
              help="Load checkpoints not signed with your key (another user's run directory). Loading a "
                   "checkpoint runs code: only for run directories from someone you trust.")
def resume_command(run_dir: str, rounds: int | None, evaluations: int | None, seconds: float | None,
                   quiet: bool, trust_checkpoint: bool) -> None:
    """Continue an interrupted run (or extend a finished one) exactly where it stopped."""
    from .run import resume_run

    budget = {k: v for k, v in {"rounds": rounds, "evaluations": evaluations, "seconds": seconds}.items()
              if v is not None}
    _report(resume_run(run_dir, budget, quiet=quiet, trust_checkpoint=trust_checkpoint))


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_command(as_json: bool) -> None:
    """List the loaded plugins and what each registers."""
    from .plugins import get_registry

    listing = get_registry().plugins()
    if as_json:
        click.echo(json.dumps(listing, indent=2, sort_keys=True))
        return
    for plugin, kinds in sorted(listing.items()):
        click.echo(plugin)
        for kind, names in sorted(kinds.items()):
            click.echo(f"  {kind}: {', '.join(names)}")


@click.command("show")
@click.argument("run_dir", type=click.Path())
def show_command(run_dir: str) -> None:
    """Print a run's progress and best result (best.json)."""
    from .errors import RunDirError
    from .store import RunStore

    store = RunStore(run_dir)
    store.require()
    best = store.read_best()
    if best is None:
        raise RunDirError(f"{run_dir}: no round has finished yet")
    click.echo(json.dumps(best, indent=2))


@click.command("plot")
@click.argument("run_dir", type=click.Path())
@click.option("-o", "--output", type=click.Path(), help="Where to write the PNG (default: RUN_DIR/convergence.png).")
def plot_command(run_dir: str, output: str | None) -> None:
    """Draw a run's convergence curve as a PNG."""
    from .report import plot_convergence
    from .store import RunStore

    RunStore(run_dir).require()
    written = plot_convergence(run_dir, output)
    if written is not None:
        click.echo(str(written))


@hookimpl
def calibri_register_commands(register):
    for command in (run_command, resume_command, plugins_command, show_command, plot_command):
        register(command)
