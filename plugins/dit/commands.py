"""CLI commands of the Calibri plugin: ``calibri sites`` and ``calibri bake``."""
from __future__ import annotations

import json

import click

GRANULARITY = click.Choice(["block", "layer", "gate"])


@click.command("sites")
@click.option("--model-config", "model_config", required=True,
              help="A diffusers transformer config.json (or its folder), or a known model name.")
@click.option("--granularity", type=GRANULARITY, default="gate", show_default=True)
@click.option("--copies", type=click.IntRange(min=1), default=1, show_default=True, help="Ensemble copies.")
@click.option("--form", type=click.Choice(["single", "distilled", "cfg"]), help="Ensemble form (default: the family's).")
@click.option("--guidance-scale", type=float, default=None, help="The cfg form's guidance scale.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def sites_command(model_config: str, granularity: str, copies: int, form: str | None,
                  guidance_scale: float | None, as_json: bool) -> None:
    """List a DiT's Calibri scale sites (built on the meta device: no weights are loaded)."""
    from .calibration import Calibrator, find_adapter
    from .models import build_on_meta, load_model_config

    config = load_model_config(model_config)
    model = build_on_meta(config)
    family_cfg = form is None and copies > 1 and find_adapter(model).default_form == "cfg"
    if (form == "cfg" or family_cfg) and guidance_scale is None:
        guidance_scale = 7.0
    try:
        calibrator = Calibrator(model, granularity, copies, form, guidance_scale)  # type: ignore[arg-type]
    except ValueError as exc:
        from calibri.core.errors import UserError
        raise UserError(str(exc)) from None
    per_copy = len(calibrator.sites)
    summary = {
        "model_class": type(model).__name__, "architecture": calibrator.adapter.name,
        "granularity": granularity, "copies": copies, "form": calibrator.form,
        "sites_per_copy": per_copy, "parameters_without_omega": calibrator.count(with_omega=False),
        "parameters_with_omega": calibrator.count(with_omega=True),
        "sites": [{"name": s.name, "group": s.group, "gates": [g.gate_name for g in s.gates]} for s in calibrator.sites],
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for site in calibrator.sites:
        click.echo(f"{site.name:32s} {site.group}")
    click.echo(f"{type(model).__name__} ({calibrator.adapter.name}), {granularity} granularity: {per_copy} sites per copy; "
               f"{calibrator.count(False)} parameters without ω, {calibrator.count(True)} with ω "
               f"({copies} cop{'y' if copies == 1 else 'ies'}, form {calibrator.form})")


@click.command("bake")
@click.argument("model_dir", type=click.Path())
@click.argument("calibration", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for the baked transformer.")
def bake_command(model_dir: str, calibration: str, output: str) -> None:
    """Fold CALIBRATION into the transformer saved in MODEL_DIR and save it the diffusers way.

    MODEL_DIR is a transformer folder (config.json + weights) or a pipeline folder with a
    transformer/ subfolder. The result loads as a plain diffusers model with from_pretrained.
    """
    from pathlib import Path

    from calibri.core.errors import UserError

    from .calibration_file import apply_calibration, load_calibration
    from .models import load_model_config

    folder = Path(model_dir)
    if (folder / "transformer" / "config.json").exists():
        folder = folder / "transformer"
    config = load_model_config(folder) if folder.exists() else None
    if config is None:
        raise UserError(f"{model_dir}: no such model folder")
    load_calibration(calibration)
    import diffusers

    model = getattr(diffusers, config["_class_name"]).from_pretrained(folder)
    calibrator = apply_calibration(model, calibration)
    calibrator.bake()
    calibrator.detach_hooks_keep_weights()
    model.save_pretrained(output)
    click.echo(f"baked {len(calibrator.sites)} sites into {output}")
