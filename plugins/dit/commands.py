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


def _numbers(text: str | None, kind: type, option: str) -> list:
    from calibri.core.errors import UserError

    if not text:
        return []
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option}: expected comma-separated numbers, got {text!r}") from None
    if kind is int and any(v < 1 for v in values):
        raise UserError(f"{option}: step counts must be at least 1, got {text!r}")
    return values


@click.command("evaluate")
@click.argument("target", type=click.Path())
@click.option("--steps", "steps_text", default="2,4,8,16", show_default=True, help="NFEs to evaluate, comma-separated.")
@click.option("--guidance", "guidance_text", default=None,
              help="Also evaluate the uncalibrated model at these guidance scales (tuned-guidance baselines).")
@click.option("--prompts", default=None, help="Held-out prompts (.txt or .jsonl; default: the run's validation set).")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seed of the held-out images (default: the run's validation seed).")
@click.option("--model", default=None, help="With a calibration file: the pipeline (folder, hub id, or 'toy').")
@click.option("--reward", default=None, help="Reward name (default: the run's reward; toy_oracle for the toy model).")
@click.option("--device", default=None, help="Torch device (default: cpu).")
@click.option("-o", "--output", type=click.Path(), default=None, help="Folder for the table and plot.")
def evaluate_command(target: str, steps_text: str, guidance_text: str | None, prompts: str | None, seed: int | None,
                     model: str | None, reward: str | None, device: str | None, output: str | None) -> None:
    """Baseline vs calibrated across NFE on held-out prompts and seeds.

    TARGET is a calibration run directory or a calibration file. Writes evaluation.csv,
    evaluation.md and reward_vs_nfe.png, and prints the table.
    """
    from pathlib import Path

    from calibri.core.errors import UserError

    from .evaluation import evaluate, markdown_table, matching_nfe, plot_nfe, write_csv

    steps = _numbers(steps_text, int, "--steps")
    guidance = _numbers(guidance_text, float, "--guidance")
    if not steps:
        raise UserError("--steps: give at least one step count")
    path = Path(target)
    objective, values, held = _evaluation_target(path, model, reward, device, prompts, seed)
    out = Path(output) if output else (path / "evaluation" if path.is_dir() else path.with_suffix("").parent / f"{path.stem}-evaluation")
    out.mkdir(parents=True, exist_ok=True)
    texts, metadata, image_seed = held
    variants = ["baseline", "calibrated", *[f"guidance={g:g}" for g in guidance]]
    total = len(steps) * len(variants)
    done = [0]

    def progress(variant: str, n: int) -> None:
        done[0] += 1
        click.echo(f"  [{done[0]}/{total}] {variant} at {n} steps", err=True)

    maximize = objective.direction == "maximize"
    try:
        rows = evaluate(objective, variants, steps, texts, metadata, image_seed, calibrated=values, progress=progress)
    finally:
        objective.close()
    write_csv(rows, out / "evaluation.csv")
    table = markdown_table(rows)
    (out / "evaluation.md").write_text(table + "\n", encoding="utf-8")
    plot_nfe(rows, out / "reward_vs_nfe.png", f"{path.name}: {len(texts)} prompts, seed {image_seed}")
    click.echo(table)
    for n in steps:
        match = matching_nfe(rows, at_steps=n, maximize=maximize)
        if match is not None:
            click.echo(f"baseline matches calibrated@{n} at NFE {match}")
    click.echo(f"written: {out}")


def _evaluation_target(path, model, reward, device, prompts, seed):
    """(objective, calibrated values, (prompts, metadata, seed)) for a run dir or a calibration file."""
    from pathlib import Path

    import pydantic

    from calibri.core.errors import UserError

    from .calibration_file import check_fits, load_calibration
    from .models import SHIPPED_MODELS, resolve_model
    from .objective import CalibriObjective, CalibriOptions
    from .prompts import load_prompts
    from .report import held_out, load_run_objective, run_best, selected_values

    if path.is_dir():
        if not (path / "config.yaml").exists():
            raise UserError(f"{path}: not a calibri run directory (no config.yaml)")
        values, _ = selected_values(run_best(path))
        objective, stream, _ = load_run_objective(path, device)
        if prompts is None and not getattr(stream, "has_validation", False):
            objective.close()
            raise UserError(f"--prompts: {path} has no validation prompts; give held-out prompts to evaluate on")
        texts, metadata, image_seed = held_out(stream)
    else:
        document = load_calibration(path)
        name = model or document.get("model", {}).get("name_or_path") or ""
        if not name:
            raise UserError(f"{path}: the file names no model; give --model")

        is_toy = name in SHIPPED_MODELS or Path(name).resolve() == Path(resolve_model("toy")).resolve()
        if reward is None and not is_toy:
            raise UserError("--reward: give the reward to evaluate with (e.g. hpsv3)")
        try:
            options = CalibriOptions(model=name, granularity=document["granularity"], copies=document["copies"],
                                     form=document["form"], guidance_scale=document.get("guidance_scale"),
                                     time_buckets=document.get("time_buckets", 1),
                                     reward=reward or "toy_oracle", device=device)
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise UserError(f"{path}: {where}: {error['msg'].removeprefix('Value error, ')}") from None
        if prompts is None and not is_toy:
            raise UserError("--prompts: give the held-out prompts to evaluate on")
        objective = CalibriObjective(options)
        try:
            check_fits(objective.calibrator, document, path)
        except Exception:
            objective.close()
            raise
        values = {k: float(v) for k, v in document["values"].items()}
        image_seed = options.validation_seed
        if prompts is None:  # the toy model: its shipped held-out prompts
            shipped = load_prompts(options.validation_prompts, "--prompts")
            texts, metadata = list(shipped.prompts), list(shipped.metadata)
    if prompts is not None:
        chosen = load_prompts(prompts, "--prompts")
        texts, metadata = list(chosen.prompts), list(chosen.metadata)
    if seed is not None:
        image_seed = seed
    return objective, values, (texts, metadata, image_seed)
