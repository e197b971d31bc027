"""CLI commands of the Flow-GRPO compatibility plugin: the ``calibri flowgrpo`` group.

Its subcommands share the group object :data:`flowgrpo` (``flowgrpo.add_command(...)`` adds one);
the plugin registers the group through :func:`calibri_register_commands`.
"""
from __future__ import annotations

from pathlib import Path

import click

from calibri.core.hookspecs import hookimpl


@click.group("flowgrpo")
def flowgrpo() -> None:
    """Flow-GRPO compatibility: its evaluation protocol on LoRA and calibration, exports it can train from."""


@flowgrpo.command("export")
@click.argument("target", metavar="RUN_DIR_OR_CALIBRATION", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="New folder for the exported pipeline.")
@click.option("--model", default=None, type=click.Path(),
              help="The base pipeline folder (default: the run's model, or the one the calibration file names).")
@click.option("--lora", default=None, type=click.Path(),
              help="The LoRA folder, if moved since calibrating (its weights must be the recorded ones).")
def export_command(target: str, output: str, model: str | None, lora: str | None) -> None:
    """Export a calibration for Flow-GRPO to start from.

    Writes a diffusers pipeline folder: the base pipeline, its transformer/ with the calibration
    baked in, and lora/, the LoRA the calibration was made on, copied byte for byte. In Flow-GRPO:
    pretrained.model = OUTPUT and train.lora_path = OUTPUT/lora. Everything is checked before the
    weights load; OUTPUT must not exist and appears only once complete.
    """
    from calibri.plugins.dit.calibration_file import describe_settings

    from .export import check_output, export, plan_export

    out = Path(output)
    check_output(out)
    plan = plan_export(target, model, lora)
    calibrator = export(plan, out)
    settings = plan.document.get("calibrated_for")
    click.echo(f"exported {out}: {len(calibrator.sites)} sites baked into transformer/"
               + (f"; lora/ (r {plan.lora.rank}, alpha {plan.lora.alpha:g}) copied from {plan.lora.folder}"
                  if plan.lora is not None else "; no LoRA (the calibration was made without one)"))
    click.echo(f"Flow-GRPO: pretrained.model = {out}"
               + (f", train.lora_path = {out / 'lora'}" if plan.lora is not None else "")
               + (f"; sample it as it was calibrated: {describe_settings(settings)}" if settings else ""))


def _add_evaluate() -> None:
    from .evaluate import evaluate

    flowgrpo.add_command(evaluate)


_add_evaluate()


@hookimpl
def calibri_register_commands(register):
    register(flowgrpo)
