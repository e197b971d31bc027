"""``calibri import-official``: one result of the official Calibri research code as a calibri
calibration file, matched entry by entry by site name (see docs/import-official.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from calibri.core.errors import UserError

from .official_order import ENSEMBLE_FORMS, OFFICIAL_MODELS, QWEN_OFFICIAL_CFG, OfficialModel, official_entries
from .official_run import OfficialResult, config_field, copies_of, read_result

#: ``--round-to``: the dtypes an official run could hold its scales and ω in.
ROUND_TO = ("bfloat16", "float16")


@dataclass
class Imported:
    """An imported result: the calibration document to write and what to tell the user."""

    document: dict[str, Any]
    model_name: str
    scales: int
    omega: list[float]
    identity: int = 0
    dead: int = 0
    notes: list[str] = field(default_factory=list)


def official_model(result: OfficialResult) -> tuple[str, OfficialModel]:
    """The run's ``model.model_name`` and what it calibrated."""
    name = config_field(result, "model.model_name")
    if not isinstance(name, str) or not name:
        raise UserError(f"{result.config_path}: model.model_name is missing (the run's model)")
    if name not in OFFICIAL_MODELS:
        raise UserError(f"{result.config_path}: model.model_name {name!r} is not a model the official code "
                        f"calibrates (known: {', '.join(OFFICIAL_MODELS)})")
    return name, OFFICIAL_MODELS[name]


def _build_model(official: OfficialModel, model_config: str | None) -> tuple[Any, str]:
    """The transformer the run calibrated, on the meta device, and the config it came from."""
    from .calibration import find_adapter
    from .models import build_on_meta, load_model_config

    source = model_config or official.model_config
    try:
        model = build_on_meta(load_model_config(source), source)
    except UserError as exc:
        raise UserError(f"--model-config: {exc}" if model_config else str(exc)) from None
    adapter = find_adapter(model)
    if adapter.name != official.architecture:
        raise UserError(f"--model-config: {source} describes a {type(model).__name__} ({adapter.name}); "
                        f"the run calibrated a {official.architecture} model")
    return model, source


def _guidance(result: OfficialResult, official: OfficialModel, given: float | None, notes: list[str]) -> float | None:
    """The guidance scale the run sampled with: ``--guidance-scale``, else the config's
    ``gen.guidance_scale`` — except on Qwen-Image, whose official pipeline ignored it."""
    if given is not None:
        return given
    configured = config_field(result, "gen.guidance_scale")
    if configured is not None and (isinstance(configured, bool) or not isinstance(configured, (int, float))
                                   or not math.isfinite(configured)):
        raise UserError(f"{result.config_path}: gen.guidance_scale must be a number, got {configured!r}")
    if official.architecture == "qwenimage":
        if configured is not None and float(configured) != QWEN_OFFICIAL_CFG:
            notes.append(f"{result.config_path} has gen.guidance_scale {configured:g}, but the official Qwen-Image "
                         f"training sampled at the pipeline's default cfg_scale {QWEN_OFFICIAL_CFG:g} (its training "
                         f"script does not pass it); recording {QWEN_OFFICIAL_CFG:g} (--guidance-scale to override)")
        return QWEN_OFFICIAL_CFG
    return None if configured is None else float(configured)


def _rounded(value: float, dtype_name: str | None) -> float:
    if dtype_name is None:
        return value
    import torch

    return torch.tensor(value, dtype=getattr(torch, dtype_name)).float().item()


def import_result(result: OfficialResult, model_config: str | None = None, guidance_scale: float | None = None,
                  round_to: str | None = None) -> Imported:
    """The calibration document of ``result``: each official entry matched by name to a calibri
    parameter, written by calibri's own writer, with where it came from."""
    import torch

    from .calibration import Calibrator, ScaleState
    from .calibration_file import calibration_document

    notes = list(result.notes)
    name, official = official_model(result)
    model, source = _build_model(official, model_config)
    copies = copies_of(result)
    form = "single" if copies == 1 else ENSEMBLE_FORMS[official.architecture]
    guidance = _guidance(result, official, guidance_scale, notes)
    where = "--guidance-scale" if guidance_scale is not None else f"{result.config_path}: gen.guidance_scale"
    if form == "cfg" and (guidance is None or guidance == 1.0):
        raise UserError(f"{where}: an ensemble of a conditional and an unconditional copy needs the run's "
                        f"guidance scale (not 1), got {guidance!r}")
    try:
        calibrator = Calibrator(model, official.granularity, copies, form, guidance)  # type: ignore[arg-type]
    except ValueError as exc:
        raise UserError(f"{result.config_path}: scaleguidance.num_models {copies}: {exc}") from None
    entries = official_entries(official.architecture, official.granularity, copies, model)
    if len(result.solution) != len(entries):
        raise UserError(f"{result.path}: solution has {len(result.solution)} values, but a {name!r} run of {copies} "
                        f"cop{'y' if copies == 1 else 'ies'} on {source} has {len(entries)} ({len(entries) - copies} "
                        f"scales and {copies} ω); give --model-config if the run used another model")
    values: dict[str, float] = {}
    imported = Imported({}, name, 0, [], notes=notes)
    changed_identity = 0
    for entry, value in zip(entries, result.solution):
        if entry.fate == "dead":
            imported.dead += 1
        elif entry.fate == "identity":
            imported.identity += 1
            changed_identity += value != 1.0
            values[entry.name] = 1.0
        else:
            values[entry.name] = _rounded(value, round_to)
    expected = calibrator.parameter_names()
    if set(values) != set(expected):
        missing, unknown = sorted(set(expected) - set(values)), sorted(set(values) - set(expected))
        raise UserError(f"--model-config: the sites of {source} do not match the official order ({len(missing)} "
                        f"without a value, e.g. {missing[:2]}; {len(unknown)} unknown, e.g. {unknown[:2]})")
    if imported.identity:
        notes.append(f"the official code's {imported.identity} Qwen-Image MLP values ({changed_identity} not 1) never "
                     f"took effect (its hooks skipped the feed-forward outputs); imported as 1.0, as they acted")
    # A calibrator on the meta-device model, given a CPU table, holds the values for the writer.
    calibrator.state = ScaleState(torch.ones(calibrator.rows, len(calibrator.sites) + 1, dtype=torch.float32))
    calibrator.set_values(values)
    document = calibration_document(calibrator, None if guidance is None else {"guidance_scale": guidance})
    document["model"]["name_or_path"] = official.pipeline
    document["provenance"] = {
        "source": "official Calibri code", "run": str(result.run_dir.resolve()),
        "file": result.path.relative_to(result.run_dir).as_posix(), "step": result.step,
        "model_name": name, "model_config": source,
        "train_best": result.train_best, "train_mean": result.train_mean, "val": result.val,
        "timestamp": result.timestamp if isinstance(result.timestamp, (str, int, float)) else None,
        "rounded_to": round_to, "mlp_values_set_to_1": imported.identity, "values_without_site": imported.dead,
    }
    imported.document = document
    imported.scales = len(expected) - copies
    imported.omega = [float(document["values"][n]) for n in expected[-copies:]]
    return imported


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output that would lose something: a folder, or a file without ``--overwrite``."""
    from .commands import check_creatable

    if out.is_dir():
        raise UserError(f"-o/--output: {out} is a folder; give the calibration file's name")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UserError(f"-o/--output: {out} already exists; give --overwrite to replace it")
    check_creatable(out)


def write_document(document: dict[str, Any], out: Path) -> None:
    """Write beside ``out`` then move into place: an interrupted write leaves ``out`` as it was."""
    import json

    from calibri.core.store import atomic_write_text

    try:
        atomic_write_text(out, json.dumps(document, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"-o/--output: cannot write {out}: {exc.strerror or exc}") from None


def _number_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.6g}"


def summary(imported: Imported, result: OfficialResult, out: Path, steps: list[int]) -> list[str]:
    """What was imported, in four lines: enough to tell a wrong step, model or copy count at a glance."""
    document = imported.document
    copies = document["copies"]
    guidance = document["guidance_scale"]
    skipped = [f"{imported.identity} MLP values set to 1.0"] if imported.identity else []
    skipped += [f"{imported.dead} values without a site skipped"] if imported.dead else []
    return [
        f"official run {result.run_dir}: step {result.step} (available: {', '.join(map(str, steps))}); "
        f"val {_number_text(result.val)}, train_best {_number_text(result.train_best)}",
        f"{imported.model_name} -> {document['architecture']}, {document['granularity']} granularity, "
        f"{copies} cop{'y' if copies == 1 else 'ies'} (form {document['form']})"
        + (f", guidance {guidance:g}" if guidance is not None else ""),
        f"{len(result.solution)} official values -> {imported.scales + copies} calibri values: {imported.scales} "
        f"scales and ω {', '.join(f'{w:.6g}' for w in imported.omega)}"
        + (f" ({'; '.join(skipped)})" if skipped else "")
        + (f"; rounded to {document['provenance']['rounded_to']}" if document["provenance"]["rounded_to"] else ""),
        f"written: {out}" + (f" ({len(imported.notes)} warning{'s' if len(imported.notes) > 1 else ''} above)"
                             if imported.notes else ""),
    ]


@click.command("import-official")
@click.argument("run_dir", type=click.Path())
@click.option("--step", type=click.IntRange(min=0), default=None,
              help="The checkpoints/step_N to import (default: the newest).")
@click.option("-o", "--output", required=True, type=click.Path(), help="The calibration file to write.")
@click.option("--model-config", "model_config", default=None,
              help="The transformer's config (file, folder or known name) when the run used another model "
                   "than the one its model_name implies (a fine-tune, a smaller model).")
@click.option("--guidance-scale", type=float, default=None,
              help="The guidance scale the run sampled with (default: config.json's gen.guidance_scale; "
                   f"Qwen-Image: {QWEN_OFFICIAL_CFG:g}, its official pipeline's).")
@click.option("--round-to", type=click.Choice(ROUND_TO), default=None,
              help="Round the values to the dtype the run held them in (bfloat16 reproduces a bf16 run exactly).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def import_official_command(run_dir: str, step: int | None, output: str, model_config: str | None,
                            guidance_scale: float | None, round_to: str | None, overwrite: bool) -> None:
    """Import one result of the official Calibri code as a calibri calibration file.

    RUN_DIR is the official run folder (logs/<run>_<time>) holding checkpoints/step_N/ and
    config.json. Only JSON is read: the pickled optimiser state is never opened.
    """
    import warnings

    from .models import finite_number
    from .objective import MAX_GUIDANCE
    from .official_run import available_steps

    out = Path(output)
    check_output(out, overwrite)
    if guidance_scale is not None:
        finite_number(guidance_scale, "--guidance-scale", MAX_GUIDANCE)
    run = Path(run_dir)
    result = read_result(run, step)
    for read in (result.path, result.config_path):
        if out.exists() and out.resolve() == read.resolve():
            raise UserError(f"-o/--output: {out} is {read}, which the import reads; choose another file")
    imported = import_result(result, model_config, guidance_scale, round_to)
    write_document(imported.document, out)
    for note in imported.notes:
        warnings.warn(f"calibri: {note}", RuntimeWarning, stacklevel=2)
    for line in summary(imported, result, out, list(available_steps(run))):
        click.echo(line)
