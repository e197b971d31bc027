"""CLI commands of the Calibri plugin: ``calibri sites`` and ``calibri bake``."""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

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
    from calibri.core.errors import UserError

    from .calibration import Calibrator, find_adapter
    from .models import build_on_meta, finite_number, load_model_config
    from .objective import MAX_GUIDANCE

    if guidance_scale is not None:
        finite_number(guidance_scale, "--guidance-scale", MAX_GUIDANCE)
    config = load_model_config(model_config)
    model = build_on_meta(config, model_config)
    family_cfg = form is None and copies > 1 and find_adapter(model).default_form == "cfg"
    if (form == "cfg" or family_cfg) and guidance_scale is None:
        guidance_scale = 7.0
    try:
        calibrator = Calibrator(model, granularity, copies, form, guidance_scale)  # type: ignore[arg-type]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    per_copy = len(calibrator.sites)
    if per_copy == 0:
        raise UserError(f"{model_config}: this {type(model).__name__} has no blocks, so no Calibri sites")
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
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def bake_command(model_dir: str, calibration: str, output: str, overwrite: bool) -> None:
    """Fold CALIBRATION into the transformer saved in MODEL_DIR and save it the diffusers way.

    MODEL_DIR is a transformer folder (config.json + weights) or a pipeline folder with a
    transformer/ subfolder. The result loads as a plain diffusers model with from_pretrained.
    Everything is checked before the weights load; the output folder appears only once complete.
    """
    from calibri.core.errors import UserError

    from .calibration_file import describe_settings, load_calibration, off_settings, warn_off_settings
    from .models import load_model_config

    folder = Path(model_dir)
    if (folder / "transformer" / "config.json").exists():
        folder = folder / "transformer"
    if not folder.is_dir():
        raise UserError(f"{model_dir}: no such model folder" if not folder.exists() else f"{model_dir}: not a folder")
    if not (folder / "config.json").exists():
        raise UserError(f"{model_dir}: not a transformer or pipeline folder (no config.json or transformer/config.json)")
    config = load_model_config(folder)
    document = load_calibration(calibration)
    why = unbakeable(document)
    if why is not None:
        raise UserError(f"{calibration}: {why}: such a calibration cannot be baked into one set of weights; "
                        f"apply it at run time with apply_calibration")
    out = Path(output)
    _check_output(out, overwrite, [folder, Path(model_dir), Path(calibration)])
    settings = document.get("calibrated_for")
    pipeline_scheduler = _saved_scheduler(Path(model_dir))
    if settings and pipeline_scheduler is not None:
        warn_off_settings(calibration, off_settings(settings, scheduler=pipeline_scheduler))
    model, calibrator = baked_transformer(folder, config, calibration)
    _write_folder(out, model.save_pretrained)
    lora = (settings or {}).get("lora")
    click.echo(f"baked {len(calibrator.sites)} sites into {output}"
               + (f"; sample it as it was calibrated: {describe_settings(settings)}" if settings else "")
               + (f"; it was calibrated on top of the LoRA {lora['path']}: load that LoRA onto the baked model "
                  f"(calibri flowgrpo export writes both)" if lora else ""))


def unbakeable(document: Mapping[str, Any]) -> str | None:
    """Why a calibration cannot be folded into one set of weights (None: it can): an ensemble
    (several copies mixed by ω) or a timestep-dependent one (several time buckets)."""
    copies, buckets = document["copies"], document.get("time_buckets", 1)
    if copies != 1:
        return f"an ensemble of {copies} copies"
    if buckets != 1:
        return f"timestep-dependent ({buckets} time buckets)"
    return None


def baked_transformer(folder: Path, config: dict[str, Any], calibration: str | Path, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, calibrator)``: the transformer saved in ``folder`` with ``calibration`` folded
    into its weights and no hooks left — a plain model to save. The base model is baked as it
    is: a LoRA the calibration was made on top of is not merged (the caller saves it beside)."""
    from .calibration_file import apply_calibration
    from .models import load_transformer

    model = load_transformer(folder, config, dtype)
    calibrator = apply_calibration(model, calibration, check_lora=False)
    calibrator.bake()
    calibrator.detach_hooks_keep_weights()
    return model, calibrator


def _saved_scheduler(model_dir: Path) -> dict[str, object] | None:
    """The class and shift of a pipeline folder's scheduler (None: a transformer folder, or no
    readable scheduler config: nothing to compare)."""
    from calibri.core.errors import UserError

    from .models import read_json_file

    path = model_dir / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        config = read_json_file(path, "scheduler config")
    except UserError:
        return None
    if not isinstance(config, dict):
        return None
    shift = config.get("shift")
    return {"class": config.get("_class_name"),
            "shift": float(shift) if isinstance(shift, (int, float)) and not isinstance(shift, bool) else None,
            "use_dynamic_shifting": config.get("use_dynamic_shifting")}


def _check_output(out: Path, overwrite: bool, keep: list[Path]) -> None:
    """Refuse an output that would lose something: a file, a folder with content (without
    ``--overwrite``), or a folder holding the model or calibration being baked."""
    from calibri.core.errors import UserError

    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"-o/--output: {out} exists and is not a folder (bake writes a folder); remove it first")
        if any(out.iterdir()) and not overwrite:
            raise UserError(f"-o/--output: {out} already exists and is not empty; give --overwrite to replace it")
        target = out.resolve()
        for path in keep:
            if path.exists() and (path.resolve() == target or target in path.resolve().parents):
                raise UserError(f"-o/--output: {out} is or holds {path}, which baking reads; choose another folder")
    check_creatable(out)


def check_creatable(out: Path) -> None:
    """``out`` can be made: its nearest existing ancestor is a folder (one line naming it if not)."""
    from calibri.core.errors import UserError

    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"-o/--output: {parent} is a file, so {out} cannot be created")
            break


def _write_folder(out: Path, write: Callable[[Path], object], marker: str = "config.json", replace: bool = True) -> None:
    """``write(folder)`` into a temporary folder next to ``out``, then move it into place: a
    failed or interrupted write leaves ``out`` as it was, and success is never claimed for a
    folder that was not written (one without ``marker``). ``replace=False``: an ``out`` that
    appeared meanwhile is refused, never replaced."""
    import os
    import secrets
    import shutil
    import tempfile

    from calibri.core.errors import UserError

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
        staging.mkdir()  # as a plain mkdir: the folder gets the user's usual permissions
    except OSError as exc:
        raise UserError(f"-o/--output: cannot create {out}: {exc.strerror or exc}") from None
    try:
        write(staging)
        if not (staging / marker).is_file():
            raise UserError(f"-o/--output: nothing was written to {out}")
        if out.exists() and not replace:
            raise UserError(f"-o/--output: {out} appeared while it was written; nothing was replaced")
        if out.exists():  # an empty folder, or one --overwrite replaces
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "replaced")
            try:
                os.replace(staging, out)
            except OSError:
                os.replace(old / "replaced", out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except OSError as exc:
        raise UserError(f"-o/--output: cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _numbers(text: str | None, kind: type, option: str) -> list:
    """Comma-separated step counts (``int``: 1 to MAX_STEPS) or guidance scales (``float``: finite,
    at most MAX_GUIDANCE in magnitude); a one-line error naming ``option``."""
    from calibri.core.errors import UserError

    from .models import finite_number
    from .objective import MAX_GUIDANCE, MAX_STEPS

    if not text:
        return []
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option}: expected comma-separated numbers, got {text!r}") from None
    if kind is int:
        if any(v < 1 for v in values):
            raise UserError(f"{option}: step counts must be at least 1, got {text!r}")
        if any(v > MAX_STEPS for v in values):
            raise UserError(f"{option}: step counts must be at most {MAX_STEPS}, got {text!r}")
    else:
        for value in values:
            finite_number(value, option, MAX_GUIDANCE)
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
@click.option("--max-prompts", type=click.IntRange(min=2), default=None,
              help="Score only the first N held-out prompts (each keeps its seed): a quicker, noisier look.")
@click.option("-o", "--output", type=click.Path(), default=None, help="Folder for the table and plot.")
@click.option("--quiet", is_flag=True, help="No progress lines and no model-loading bars.")
def evaluate_command(target: str, steps_text: str, guidance_text: str | None, prompts: str | None, seed: int | None,
                     model: str | None, reward: str | None, device: str | None, max_prompts: int | None,
                     output: str | None, quiet: bool) -> None:
    """Baseline vs calibrated across NFE on held-out prompts and seeds.

    TARGET is a calibration run directory or a calibration file. Writes evaluation.csv,
    evaluation.md and reward_vs_nfe.png, and prints the table. Every option is checked before
    the model loads.
    """
    from calibri.core.errors import UserError
    from calibri.core.run import quiet_libraries

    from .models import check_device
    from .objective import check_reward_spec
    from .prompts import load_prompts

    steps = _numbers(steps_text, int, "--steps")
    guidance = _numbers(guidance_text, float, "--guidance")
    if not steps:
        raise UserError("--steps: give at least one step count")
    if device is not None:
        check_device(device, "--device")
    if reward is not None:
        check_reward_spec(reward, "--reward")
    chosen = load_prompts(prompts, "--prompts") if prompts is not None else None
    path = Path(target)
    out = Path(output) if output else (path / "evaluation" if path.is_dir() else path.with_suffix("").parent / f"{path.stem}-evaluation")
    if out.exists() and not out.is_dir():
        raise UserError(f"-o/--output: {out} exists and is not a folder")
    with quiet_libraries(quiet):
        _evaluate(path, out, steps, guidance, model, reward, device, chosen, seed, max_prompts, quiet)


def _evaluate(path: Path, out: Path, steps: list[int], guidance: list[float], model: str | None,
              reward: str | None, device: str | None, chosen: Any, seed: int | None, max_prompts: int | None,
              quiet: bool) -> None:
    """``calibri evaluate`` once its options are checked: load, score, write, print."""
    from calibri.core.errors import UserError

    from .calibration_file import off_settings, scheduler_settings, warn_off_settings
    from .evaluation import evaluate, markdown_table, matching_nfe, off_nfe_note, plot_nfe, write_csv

    objective, values, held, settings = _evaluation_target(path, model, reward, device, chosen, seed)
    height, width = objective.generator.resolution()
    warn_off_settings(path, off_settings(settings, steps=steps, guidance_scale=objective.generator.effective_guidance(),
                                         scheduler=scheduler_settings(getattr(objective.pipe, "scheduler", None)),
                                         height=height, width=width))
    made_for = (settings or {}).get("steps")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        objective.close()
        raise UserError(f"-o/--output: cannot create {out}: {exc.strerror or exc}") from None
    texts, metadata, image_seed = held
    if max_prompts is not None:  # image j keeps the seed derived from (image_seed, j): a prefix of the full set
        texts, metadata = texts[:max_prompts], metadata[:max_prompts]
    variants = ["baseline", "calibrated", *[f"guidance={g:g}" for g in guidance]]
    total = len(steps) * len(variants)
    done = [0]

    def progress(variant: str, n: int) -> None:
        done[0] += 1
        click.echo(f"  [{done[0]}/{total}] {variant} at {n} steps", err=True)

    maximize = objective.direction == "maximize"
    try:
        rows = evaluate(objective, variants, steps, texts, metadata, image_seed, calibrated=values,
                        progress=None if quiet else progress)
    finally:
        objective.close()
    write_csv(rows, out / "evaluation.csv", made_for)
    table = markdown_table(rows, made_for)
    note = off_nfe_note(rows, made_for, maximize)
    (out / "evaluation.md").write_text(table + "\n" + (f"\n{note}\n" if note else ""), encoding="utf-8")
    plot_nfe(rows, out / "reward_vs_nfe.png", f"{path.name}: {len(texts)} prompts, seed {image_seed}", made_for)
    click.echo(table)
    for n in steps:
        match = matching_nfe(rows, at_steps=n, maximize=maximize)
        if match is not None:
            click.echo(f"baseline matches calibrated@{n} at NFE {match}")
    if note:
        click.echo(note)
    click.echo(f"written: {out}")


def _evaluation_target(path, model, reward, device, chosen, seed):
    """(objective, calibrated values, (prompts, metadata, seed), recorded settings or None) for a
    run dir or a calibration file; ``chosen`` is the ``--prompts`` set, already loaded (or None).
    A file's recorded guidance scale and image size are used where the pipeline takes them."""
    import pydantic

    from calibri.core.errors import ConfigError, UserError

    from .calibration_file import check_fits, load_calibration, lora_mismatch
    from .models import SHIPPED_MODELS, check_pipeline_source, resolve_model
    from .objective import FIELD, CalibriObjective, CalibriOptions, check_reward_prompts
    from .prompts import load_prompts
    from .report import held_out, load_run_objective, run_best, selected_values

    if path.is_dir():
        if not (path / "config.yaml").exists():
            raise UserError(f"{path}: not a calibri run directory (no config.yaml)")
        if model is not None:
            raise UserError(f"--model: only with a calibration file; {path} is a run directory, "
                            f"evaluated with the model it was run on")
        values, _ = selected_values(run_best(path), path / "best.json")
        objective, stream, _ = load_run_objective(path, device, reward)
        try:
            if chosen is None and not getattr(stream, "has_validation", False):
                raise UserError(f"--prompts: {path} has no validation prompts; give held-out prompts to evaluate on")
            if chosen is not None:
                check_reward_prompts(objective.options.reward, chosen, "--prompts")
        except UserError:
            objective.close()
            raise
        texts, metadata, image_seed = held_out(stream)
        settings = objective.calibrated_for()
    else:
        document = load_calibration(path)
        name = model or document.get("model", {}).get("name_or_path") or ""
        if not name:
            raise UserError(f"{path}: the file names no model; give --model")
        model_field = "--model" if model else f"{path}: model.name_or_path"
        saved = Path(name)
        if not model and saved.name == "transformer" and (saved.parent / "model_index.json").is_file():
            name = str(saved.parent)  # the file names the transformer's folder: use its pipeline
        try:
            check_pipeline_source(name)
        except UserError as exc:
            raise UserError(f"{model_field}: {exc}") from None
        is_toy = name in SHIPPED_MODELS or Path(name).resolve() == Path(resolve_model("toy")).resolve()
        if reward is None and not is_toy:
            raise UserError("--reward: give the reward to evaluate with (e.g. hpsv3)")
        settings = document.get("calibrated_for")
        guidance = document.get("guidance_scale")
        if document["form"] != "cfg" and settings and settings.get("guidance_scale") is not None:
            guidance = settings["guidance_scale"]  # the pipeline's guidance it was calibrated at
        try:
            options = CalibriOptions(model=name, granularity=document["granularity"], copies=document["copies"],
                                     form=document["form"], guidance_scale=guidance,
                                     time_buckets=document.get("time_buckets", 1),
                                     reward=reward or "toy_oracle", device=device,
                                     lora=((settings or {}).get("lora") or {}).get("path"))
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise UserError(f"{path}: {where}: {error['msg'].removeprefix('Value error, ')}") from None
        if chosen is None and not is_toy:
            raise UserError("--prompts: give the held-out prompts to evaluate on")
        if chosen is not None:
            check_reward_prompts(options.reward, chosen, "--prompts")
        try:
            objective = CalibriObjective(options)
        except ConfigError as exc:  # name what the user gave: an option of this command, not a config field
            for prefix, option in ((f"{FIELD}.model", model_field), (f"{FIELD}.reward", "--reward"),
                                   (f"{FIELD}.lora", f"{path}: calibrated_for.lora")):
                if exc.field == prefix or exc.field.startswith(prefix + "."):
                    raise UserError(f"{option + exc.field[len(prefix):]}: {exc.message}") from None
            raise
        try:
            check_fits(objective.calibrator, document, path)
            mismatch = lora_mismatch(document, objective.pipe.transformer)
            if mismatch:  # the recorded LoRA's file holds other weights now
                raise UserError(f"{path}: {mismatch}; evaluating it there would measure another model")
        except Exception:
            objective.close()
            raise
        _use_recorded_size(objective, settings)
        values = {k: float(v) for k, v in document["values"].items()}
        image_seed = options.validation_seed
        if chosen is None:  # the toy model: its shipped held-out prompts
            shipped = load_prompts(options.validation_prompts, "--prompts")
            texts, metadata = list(shipped.prompts), list(shipped.metadata)
    if chosen is not None:
        texts, metadata = list(chosen.prompts), list(chosen.metadata)
    if seed is not None:
        image_seed = seed
    return objective, values, (texts, metadata, image_seed), settings


def _use_recorded_size(objective: Any, settings: Mapping[str, Any] | None) -> None:
    """Make images at the size a calibration file records, where the pipeline takes a size."""
    import inspect

    if not settings or settings.get("height") is None or settings.get("width") is None:
        return
    if objective.generator.resolution() == (settings["height"], settings["width"]):
        return
    try:
        parameters = inspect.signature(type(objective.pipe).__call__).parameters
    except (TypeError, ValueError):
        return
    if {"height", "width"} <= set(parameters) or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        objective.generator.height, objective.generator.width = settings["height"], settings["width"]
