"""The calibration file: a small JSON document, applied to a pipeline in one call.

Format (``"format": "calibri.calibration"``, ``"version": 1``)::

    {
      "format": "calibri.calibration", "version": 1, "calibri_version": "0.1.0",
      "architecture": "flux", "model_class": "FluxTransformer2DModel",
      "model": {"name_or_path": "...", "config_sha256": "..."},
      "granularity": "gate", "copies": 1, "form": "single", "guidance_scale": null,
      "sites": ["double.0.img.attn", ...],          # in order, per copy
      "values": {"double.0.img.attn": 1.07, ..., "omega": 1.0}
    }

``values`` uses the calibration's parameter names (``c<m>.<site>`` per copy in an ensemble,
``omega`` or ``omega.<m>``). Applying refuses a file made for another architecture or site set;
a different model config of the same architecture only warns.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

from calibri.core.errors import UserError

from .calibration import MAX_COPIES, MAX_TIME_BUCKETS, Calibrator
from .sites import GRANULARITIES

FORMAT = "calibri.calibration"
VERSION = 1
#: A calibration of every gate of the largest supported model, per copy and time bucket, is well
#: under this; reading stops here (a device file, or the wrong file given).
MAX_FILE_BYTES = 16 << 20


class CalibrationMismatch(UserError):
    """The calibration file does not fit this model."""


def config_sha256(model: Any) -> str:
    """A fingerprint of the model's architecture config (private ``_`` keys left out)."""
    config = {k: v for k, v in dict(model.config).items() if not str(k).startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def calibration_document(calibrator: Calibrator) -> dict[str, Any]:
    from calibri.core import __version__

    model = calibrator.transformer
    return {
        "format": FORMAT, "version": VERSION, "calibri_version": __version__,
        "architecture": calibrator.adapter.name, "model_class": type(model).__name__,
        "model": {"name_or_path": str(dict(model.config).get("_name_or_path", "")),
                  "config_sha256": config_sha256(model)},
        "granularity": calibrator.granularity, "copies": calibrator.copies, "form": calibrator.form,
        "time_buckets": calibrator.time_buckets,
        "guidance_scale": calibrator.guidance_scale,
        "sites": calibrator.site_names,
        "values": calibrator.values(),
    }


def save_calibration(calibrator: Calibrator, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration_document(calibrator), indent=2) + "\n", encoding="utf-8")
    return path


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read and check a calibration file; one-line errors name the file."""
    from .models import read_json_file

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such calibration file")
    document = read_json_file(path, "calibration file", MAX_FILE_BYTES)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise UserError(f"{path}: not a calibri calibration file (format is not {FORMAT!r})")
    if document.get("version") != VERSION:
        raise UserError(f"{path}: calibration file version {document.get('version')!r} is not supported")
    for key in ("architecture", "granularity", "copies", "form", "sites", "values"):
        if key not in document:
            raise UserError(f"{path}: missing {key!r}")
    _check_fields(path, document)
    return document


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fields(path: Path, document: dict[str, Any]) -> None:
    """The types and values of the fields apply_calibration reads (a damaged or hand-edited file)."""
    def fail(message: str) -> None:
        raise UserError(f"{path}: {message}")

    if document["granularity"] not in GRANULARITIES:
        fail(f"granularity {document['granularity']!r} is not one of {', '.join(GRANULARITIES)}")
    if document["form"] not in ("single", "distilled", "cfg"):
        fail(f"form {document['form']!r} is not one of single, distilled, cfg")
    for key, most in (("copies", MAX_COPIES), ("time_buckets", MAX_TIME_BUCKETS)):
        count = document.get(key, 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            fail(f"{key} must be a positive integer, got {count!r}")
        if count > most:
            fail(f"{key} must be at most {most}, got {count}")
    guidance = document.get("guidance_scale")
    if guidance is not None and not _number(guidance):
        fail(f"guidance_scale must be a number or null, got {guidance!r}")
    sites = document["sites"]
    if not isinstance(sites, list) or not all(isinstance(site, str) for site in sites):
        fail("sites must be a list of site names")
    values = document["values"]
    if not isinstance(values, dict):
        fail("values must map parameter names to numbers")
    for name, value in values.items():
        if not _number(value):
            fail(f"value of {name!r} is not a finite number: {value!r}")
    if not isinstance(document.get("model", {}), dict):
        fail("model must be a mapping")


def apply_calibration(pipe_or_transformer: Any, path: str | Path) -> Calibrator:
    """Attach the calibration in ``path`` to a pipeline's transformer (or a transformer)."""
    document = load_calibration(path)
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    try:
        calibrator = Calibrator(transformer, document["granularity"], document["copies"], document["form"],
                                document.get("guidance_scale"), time_buckets=document.get("time_buckets", 1))
    except ValueError as exc:
        raise CalibrationMismatch(f"{path}: {exc}") from None
    check_fits(calibrator, document, path)
    calibrator.attach()
    calibrator.set_values({k: float(v) for k, v in document["values"].items()})
    return calibrator


def check_fits(calibrator: Calibrator, document: dict[str, Any], path: str | Path) -> None:
    """Raise :class:`CalibrationMismatch` unless the calibration ``document`` fits ``calibrator``'s
    model: same architecture, same sites in the same order, no unknown values."""
    transformer = calibrator.transformer
    if calibrator.adapter.name != document["architecture"]:
        raise CalibrationMismatch(f"{path}: made for architecture {document['architecture']!r}, "
                                  f"this model is {calibrator.adapter.name!r} ({type(transformer).__name__})")
    if calibrator.site_names != list(document["sites"]):
        ours, theirs = set(calibrator.site_names), set(document["sites"])
        detail = (f"{len(theirs - ours)} sites unknown to this model, {len(ours - theirs)} missing"
                  if ours != theirs else "same sites in another order")
        raise CalibrationMismatch(f"{path}: its {len(document['sites'])} sites do not match this model's "
                                  f"{len(calibrator.site_names)} ({detail})")
    expected = document.get("model", {}).get("config_sha256")
    if expected and expected != config_sha256(transformer):
        warnings.warn(f"calibri: {path} was made for a model with another config "
                      f"({document['model'].get('name_or_path') or 'unnamed'}); applying it anyway", stacklevel=3)
    unknown = sorted(set(document["values"]) - set(calibrator.parameter_names()))
    if unknown:
        raise CalibrationMismatch(f"{path}: values for {len(unknown)} parameters this calibration does not have "
                                  f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})")
