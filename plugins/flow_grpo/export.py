"""A calibration made on top of a Flow-GRPO LoRA, exported for Flow-GRPO to start from.

The export is a diffusers pipeline folder whose ``transformer/`` is the BASE transformer with the
calibration baked in, and whose ``lora/`` is the LoRA the calibration was made on, byte for byte:
Flow-GRPO loads it as it loads any checkpoint (``pretrained.model`` = the folder,
``train.lora_path`` = its ``lora/``) and carries on from the calibrated, adapted model.

Baking onto the base and loading the LoRA after is the same model as the calibration hooked onto
base + LoRA only because the two touch different Linears: Calibri's bake scales rows of the
modulation Linears (and ``proj_out``), while Flow-GRPO's LoRA adapts the attention (and, on FLUX,
feed-forward) projections. A scaled gate multiplies a branch's output, never what a LoRA'd Linear
inside it sees. The export checks that disjointness on the model at hand and refuses otherwise.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibri.core.errors import UserError

#: How calibri names a calibration run's result in its run directory.
CALIBRATION_FILE = "calibration.json"
_TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass(frozen=True)
class ExportPlan:
    """Everything an export reads, checked before a weight loads."""

    calibration: Path
    document: dict[str, Any]
    pipeline: Path
    lora: Any  # a LoraCheckpoint, or None for a calibration made without a LoRA
    sites: int


def plan_export(target: str | Path, model: str | None = None, lora: str | None = None) -> ExportPlan:
    """Check an export of ``target`` (a run directory or a calibration file) without loading
    weights: a calibration that bakes into one set of weights, a local base pipeline folder, the
    LoRA it was made on (the same bytes: sha256), and a LoRA that adapts no Linear the bake scales.
    ``model`` and ``lora`` replace the recorded pipeline folder and LoRA folder (moved since)."""
    from calibri.plugins.dit.calibration import Calibrator
    from calibri.plugins.dit.calibration_file import load_calibration
    from calibri.plugins.dit.commands import unbakeable
    from calibri.plugins.dit.models import build_on_meta, load_model_config

    from .lora import check_fits, file_sha256, read_lora

    path = Path(target)
    run_options: dict[str, Any] = {}
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise UserError(f"{path}: not a calibri run directory (no config.yaml) nor a calibration file")
        calibration = path / CALIBRATION_FILE
        if not calibration.is_file():
            raise UserError(f"{path}: no {CALIBRATION_FILE} (the calibration_report callback writes it at the end "
                            f"of a run); export the calibration file instead")
        run_options = _run_options(path)
    elif path.exists():
        calibration = path
    else:
        raise UserError(f"{path}: no such run directory or calibration file")
    document = load_calibration(calibration)
    why = unbakeable(document)
    if why is not None:
        raise UserError(f"{calibration}: {why}: it cannot be baked into the one transformer Flow-GRPO starts from; "
                        f"calibrate with objective.options.copies: 1 and time_buckets: 1 to export")
    pipeline = _pipeline_folder(model, run_options, document, calibration)
    config = load_model_config(pipeline / "transformer")
    meta = build_on_meta(config, pipeline / "transformer" / "config.json")
    try:
        calibrator = Calibrator(meta, document["granularity"])
    except ValueError as exc:
        raise UserError(f"{calibration}: {exc}") from None
    recorded = (document.get("calibrated_for") or {}).get("lora")
    if lora is not None and recorded is None:
        raise UserError(f"--lora: {calibration} was made without a LoRA; export it without --lora")
    checkpoint = None
    if recorded is not None:
        field = "--lora" if lora is not None else f"{calibration}: calibrated_for.lora"
        checkpoint = read_lora(lora if lora is not None else recorded["path"], field)
        if file_sha256(checkpoint.weights) != recorded["sha256"]:
            raise UserError(f"{field}: {checkpoint.weights} is not the LoRA the calibration was made on "
                            f"(its sha256 differs from the recorded one)")
        check_fits(checkpoint, meta, field)
        baked = {gate.ref.linear for gate in calibrator.gates} | {calibrator.adapter.output_linear}
        shared = sorted(baked & set(checkpoint.shapes))
        if shared:
            raise UserError(f"{field}: the LoRA adapts {shared[0]}, which baking the calibration scales "
                            f"({len(shared)} such Linears): base + bake + LoRA would not be the calibrated model; "
                            f"apply the calibration at run time instead")
    return ExportPlan(calibration, document, pipeline, checkpoint, len(calibrator.sites))


def _run_options(run_dir: Path) -> dict[str, Any]:
    """The ``calibri`` objective's options of a run directory's config (as the run saved them)."""
    from calibri.core.config import read_yaml

    data = read_yaml(run_dir / "config.yaml")
    objective = data.get("objective") if isinstance(data, dict) else None
    if not isinstance(objective, dict) or objective.get("name") != "calibri":
        raise UserError(f"{run_dir}: not a Calibri calibration run")
    options = objective.get("options")
    return options if isinstance(options, dict) else {}


def _pipeline_folder(model: str | None, run_options: dict[str, Any], document: dict[str, Any],
                     calibration: Path) -> Path:
    """The local pipeline folder holding the base model: ``--model``, the run's model, or the
    folder the calibration file names (its transformer's folder's parent)."""
    from calibri.plugins.dit.models import check_pipeline_source, resolve_model

    if model is not None:
        name, field = model, "--model"
    elif run_options.get("model"):
        name, field = str(run_options["model"]), f"{calibration.parent / 'config.yaml'}: objective.options.model"
    else:
        name = str((document.get("model") or {}).get("name_or_path") or "")
        field = f"{calibration}: model.name_or_path"
        if not name:
            raise UserError(f"{calibration}: the file names no model; give --model (the base pipeline folder)")
        saved = Path(name)
        if saved.name == "transformer" and (saved.parent / "model_index.json").is_file():
            name = str(saved.parent)
    try:
        folder = check_pipeline_source(name)
    except UserError as exc:
        raise UserError(f"{field}: {exc}") from None
    if folder is None:
        raise UserError(f"{field}: {name} is a hub id; give --model, a local copy of the pipeline "
                        f"(the export copies its folders)")
    folder = Path(resolve_model(str(folder)))
    if not (folder / "transformer" / "config.json").is_file():
        raise UserError(f"{field}: {folder} has no transformer/config.json")
    return folder


def check_output(out: Path, sources: tuple[Path, ...] = ()) -> None:
    """An export never replaces anything: ``out`` must not exist; its parent must be creatable;
    it must not lie inside a folder the export copies (``sources``)."""
    if out.exists() or out.is_symlink():
        raise UserError(f"-o/--output: {out} already exists; choose a new folder (nothing is overwritten)")
    target = out.resolve()
    for source in sources:
        if source.resolve() in target.parents:
            raise UserError(f"-o/--output: {out} is inside {source}, which the export copies; choose another folder")
    from calibri.plugins.dit.commands import check_creatable

    check_creatable(out)


def stored_dtype(transformer_folder: Path) -> Any:
    """The torch dtype the transformer's weights are saved in (None: unknown; the library's default),
    so the baked copy takes no more room than the original."""
    import torch

    from .lora import safetensors_header

    files = sorted(transformer_folder.glob("*.safetensors"))
    if not files:
        return None
    try:
        header = safetensors_header(files[0], "transformer")
    except UserError:
        return None
    dtypes = {entry.get("dtype") for entry in header.values()}
    name = _TORCH_DTYPES.get(next(iter(dtypes))) if len(dtypes) == 1 else None
    return getattr(torch, name) if name else None


def export(plan: ExportPlan, out: Path) -> Any:
    """Write the export of ``plan`` to ``out`` (checked absent): the pipeline's folders copied,
    ``transformer/`` replaced by the baked base transformer, ``lora/`` copied. Written next to
    ``out`` and moved into place once complete. Returns the calibrator that was baked."""
    from calibri.plugins.dit.commands import _write_folder, baked_transformer
    from calibri.plugins.dit.models import load_model_config, quiet_loading

    from .lora import file_sha256

    check_output(out, (plan.pipeline,) + ((plan.lora.folder,) if plan.lora is not None else ()))
    source = plan.pipeline / "transformer"
    model, calibrator = baked_transformer(source, load_model_config(source), plan.calibration, stored_dtype(source))

    def write(staging: Path) -> None:
        for entry in sorted(plan.pipeline.iterdir()):
            if entry.name in ("transformer", "lora"):
                continue
            if entry.is_dir():
                shutil.copytree(entry, staging / entry.name)
            else:
                shutil.copy2(entry, staging / entry.name)
        with quiet_loading():
            model.save_pretrained(staging / "transformer")
        if plan.lora is not None:
            shutil.copytree(plan.lora.folder, staging / "lora")
            if file_sha256(staging / "lora" / plan.lora.weights.name) != plan.document["calibrated_for"]["lora"]["sha256"]:
                raise UserError(f"{plan.lora.weights}: changed while it was copied; nothing was exported")

    _write_folder(out, write, marker="model_index.json", replace=False)
    return calibrator
