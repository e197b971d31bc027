"""The calibration file: a small JSON document, applied to a pipeline in one call.

Format (``"format": "calibri.calibration"``, ``"version": 1``)::

    {
      "format": "calibri.calibration", "version": 1, "calibri_version": "0.1.0",
      "architecture": "flux", "model_class": "FluxTransformer2DModel",
      "model": {"name_or_path": "...", "config_sha256": "..."},
      "granularity": "gate", "copies": 1, "form": "single", "guidance_scale": null,
      "sites": ["double.0.img.attn", ...],          # in order, per copy
      "values": {"double.0.img.attn": 1.07, ..., "omega": 1.0},
      "calibrated_for": {"steps": [2, 4], "steps_combine": "mean",   # optional (see below)
                         "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
                                       "use_dynamic_shifting": false},
                         "guidance_scale": 2.0, "height": 512, "width": 512,
                         "lora": {"path": "/abs/checkpoint-300/lora", "sha256": "...",  # only on a LoRA
                                  "rank": 32, "alpha": 64}}
    }

``values`` uses the calibration's parameter names (``c<m>.<site>`` per copy in an ensemble,
``omega`` or ``omega.<m>``). Applying refuses a file made for another architecture or site set;
a different model config of the same architecture only warns.

``calibrated_for`` records the sampling settings the values were found under. A calibration can
be far better than the model at its NFE and destroy images at another, so applying it off those
settings warns, one line saying which: :func:`apply_calibration` checks the pipeline's scheduler
at once and the step count (and guidance, where the pipeline keeps it) each time the pipeline
samples; ``calibri evaluate`` and ``calibri bake`` check what they are given. The field is
optional within version 1: files written before it load as before, their settings unknown and
nothing checked. Its ``lora`` records a Flow-GRPO LoRA merged into the transformer before the
calibration was made (``objective.options.lora``): the values hold only on top of it, so applying
the file to a transformer without that LoRA merged (or with another) warns.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
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


def calibration_document(calibrator: Calibrator, calibrated_for: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The file's content; ``calibrated_for``: the sampling settings (see the module docstring)."""
    from calibri.core import __version__

    model = calibrator.transformer
    document = {
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
    if calibrated_for is not None:
        document["calibrated_for"] = dict(calibrated_for)
    return document


def save_calibration(calibrator: Calibrator, path: str | Path,
                     calibrated_for: Mapping[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration_document(calibrator, calibrated_for), indent=2) + "\n", encoding="utf-8")
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
    settings = document.get("calibrated_for")
    if settings is not None:
        _check_settings(settings, fail)


def _check_settings(settings: Any, fail: Callable[[str], None]) -> None:
    """The recorded sampling settings: each field optional, each of its type when present."""
    from .objective import MAX_STEPS

    if not isinstance(settings, dict):
        fail("calibrated_for must be a mapping")
    steps = settings.get("steps")
    if steps is not None and not (isinstance(steps, list) and steps and all(
            isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_STEPS for n in steps)):
        fail(f"calibrated_for.steps must be a list of step counts (1 to {MAX_STEPS}), got {steps!r}")
    if settings.get("steps_combine") not in (None, "mean", "worst"):
        fail(f"calibrated_for.steps_combine must be mean or worst, got {settings['steps_combine']!r}")
    scheduler = settings.get("scheduler")
    if scheduler is not None:
        if not isinstance(scheduler, dict):
            fail("calibrated_for.scheduler must be a mapping")
        if scheduler.get("class") is not None and not isinstance(scheduler["class"], str):
            fail(f"calibrated_for.scheduler.class must be a class name, got {scheduler['class']!r}")
        if scheduler.get("shift") is not None and not _number(scheduler["shift"]):
            fail(f"calibrated_for.scheduler.shift must be a number or null, got {scheduler['shift']!r}")
        if scheduler.get("use_dynamic_shifting") not in (None, True, False):
            fail("calibrated_for.scheduler.use_dynamic_shifting must be true, false or null")
    if settings.get("guidance_scale") is not None and not _number(settings["guidance_scale"]):
        fail(f"calibrated_for.guidance_scale must be a number or null, got {settings['guidance_scale']!r}")
    for key in ("height", "width"):
        value = settings.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            fail(f"calibrated_for.{key} must be a positive number of pixels or null, got {value!r}")
    lora = settings.get("lora")
    if lora is not None:
        if not isinstance(lora, dict) or not isinstance(lora.get("path"), str) or not lora["path"]:
            fail("calibrated_for.lora must be a mapping with the LoRA's path")
        sha = lora.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            fail(f"calibrated_for.lora.sha256 must be a sha256 in hex, got {sha!r}")


# -- the recorded settings against those of use --------------------------------------------------
def describe_settings(settings: Mapping[str, Any] | None) -> str:
    """``NFE 2, 4 (mean), guidance 2, FlowMatchEulerDiscreteScheduler shift 3, 512×512``, or
    ``unknown`` for a file that records none."""
    if not settings:
        return "unknown"
    parts = []
    steps = settings.get("steps")
    if steps:
        combine = settings.get("steps_combine")
        parts.append(f"NFE {', '.join(map(str, steps))}" + (f" ({combine})" if len(steps) > 1 and combine else ""))
    if settings.get("guidance_scale") is not None:
        parts.append(f"guidance {settings['guidance_scale']:g}")
    scheduler = settings.get("scheduler") or {}
    if scheduler.get("class"):
        shift = scheduler.get("shift")
        parts.append(scheduler["class"] + (f" shift {shift:g}" if shift is not None else "")
                     + (" (dynamic shifting)" if scheduler.get("use_dynamic_shifting") else ""))
    if settings.get("height") and settings.get("width"):
        parts.append(f"{settings['height']}×{settings['width']}")
    if isinstance(settings.get("lora"), Mapping):
        parts.append(f"on the LoRA {settings['lora'].get('path')}")
    return ", ".join(parts) or "unknown"


def scheduler_settings(scheduler: Any) -> dict[str, Any] | None:
    """What is recorded of a scheduler (None: no scheduler to compare)."""
    if scheduler is None:
        return None
    config = dict(getattr(scheduler, "config", None) or {})
    shift = config.get("shift")
    return {"class": type(scheduler).__name__,
            "shift": float(shift) if _number(shift) else None,
            "use_dynamic_shifting": config.get("use_dynamic_shifting")}


def off_settings(settings: Mapping[str, Any] | None, *, steps: Iterable[int] = (), guidance_scale: float | None = None,
                 scheduler: Mapping[str, Any] | None = None, height: int | None = None,
                 width: int | None = None) -> list[str]:
    """What of the given use differs from the recorded ``settings``, in words (empty: nothing,
    or nothing recorded); a setting not given, or not recorded, is not compared."""
    if not settings:
        return []
    found = []
    made_for = settings.get("steps")
    if made_for:
        off = sorted({int(n) for n in steps} - set(made_for))
        if off:
            found.append(f"NFE {', '.join(map(str, off))} (made for {', '.join(map(str, made_for))})")
    recorded = settings.get("guidance_scale")
    if guidance_scale is not None and recorded is not None and not math.isclose(guidance_scale, recorded, rel_tol=1e-9):
        found.append(f"guidance {guidance_scale:g} (made for {recorded:g})")
    theirs = settings.get("scheduler") or {}
    if scheduler is not None and theirs:
        if theirs.get("class") and scheduler.get("class") != theirs["class"]:
            found.append(f"scheduler {scheduler.get('class')} (made for {theirs['class']})")
        elif (theirs.get("shift") is not None and scheduler.get("shift") is not None
              and not math.isclose(scheduler["shift"], theirs["shift"], rel_tol=1e-9)):
            found.append(f"scheduler shift {scheduler['shift']:g} (made for {theirs['shift']:g})")
        elif (theirs.get("use_dynamic_shifting") is not None and scheduler.get("use_dynamic_shifting") is not None
              and bool(scheduler["use_dynamic_shifting"]) != bool(theirs["use_dynamic_shifting"])):
            found.append(f"dynamic shifting {'on' if scheduler['use_dynamic_shifting'] else 'off'} "
                         f"(made with it {'on' if theirs['use_dynamic_shifting'] else 'off'})")
    for name, value in (("height", height), ("width", width)):
        if value is not None and settings.get(name) is not None and value != settings[name]:
            found.append(f"{name} {value} (made for {settings[name]})")
    return found


def warn_off_settings(path: str | Path, found: Sequence[str], stacklevel: int = 2) -> None:
    """One warning line saying which settings of use differ from the calibration's."""
    if found:
        warnings.warn(f"calibri: {path} is used off the settings it was calibrated for: {'; '.join(found)}; "
                      f"expect worse images, or calibrate for these settings", RuntimeWarning,
                      stacklevel=stacklevel + 1)


def apply_calibration(pipe_or_transformer: Any, path: str | Path, *, check_lora: bool = True) -> Calibrator:
    """Attach the calibration in ``path`` to a pipeline's transformer (or a transformer).

    Given a pipeline and a file that records its settings, it warns (one line) when the
    pipeline's scheduler is not the one calibrated with, and, each time the pipeline samples, when
    it samples with a step count (or a guidance scale, where the pipeline keeps it) the
    calibration was not made for. It warns too when the file was made on top of a LoRA the
    transformer does not have merged (``load_flowgrpo_lora``), or the transformer has one merged
    the file was not made on; ``check_lora=False`` is for baking onto the base model on purpose."""
    document = load_calibration(path)
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    try:
        calibrator = Calibrator(transformer, document["granularity"], document["copies"], document["form"],
                                document.get("guidance_scale"), time_buckets=document.get("time_buckets", 1))
    except ValueError as exc:
        raise CalibrationMismatch(f"{path}: {exc}") from None
    check_fits(calibrator, document, path)
    if check_lora:
        warn_lora_mismatch(path, document, transformer)
    calibrator.attach()
    calibrator.set_values({k: float(v) for k, v in document["values"].items()})
    settings = document.get("calibrated_for")
    scheduler = getattr(pipe_or_transformer, "scheduler", None) if pipe_or_transformer is not transformer else None
    if settings and scheduler is not None:
        warn_off_settings(path, off_settings(settings, scheduler=scheduler_settings(scheduler)))
        calibrator.watch = SamplingWatch(pipe_or_transformer, settings, path)
    return calibrator


def lora_mismatch(document: Mapping[str, Any], transformer: Any) -> str | None:
    """In words, how the LoRA merged into ``transformer`` differs from the one the calibration
    was made on (None: the same one — same weights, by sha256 — or neither has one)."""
    from calibri.plugins.flow_grpo.lora import merged_lora

    recorded = (document.get("calibrated_for") or {}).get("lora")
    merged = merged_lora(transformer)
    if recorded is None and merged is None:
        return None
    if recorded is None:
        return f"it was made without a LoRA, and this transformer has {merged['path']} merged"
    if merged is None:
        return (f"it was made on top of the LoRA {recorded['path']}, which this transformer does not have merged "
                f"(merge it first: calibri.plugins.flow_grpo.lora.load_flowgrpo_lora)")
    if merged.get("sha256") != recorded.get("sha256"):
        return (f"it was made on top of the LoRA {recorded['path']}; this transformer has other LoRA weights "
                f"merged ({merged['path']})")
    return None


def warn_lora_mismatch(path: str | Path, document: Mapping[str, Any], transformer: Any) -> None:
    found = lora_mismatch(document, transformer)
    if found:
        warnings.warn(f"calibri: {path}: {found}; its values do not hold here", RuntimeWarning, stacklevel=3)


class SamplingWatch:
    """Checks, once per sampling loop, the step count (and the guidance scale, where the pipeline
    keeps it as ``_guidance_scale``) against a calibration's recorded settings.

    Called by the calibration's hook on every transformer call; a new sampling loop is a new
    ``scheduler.timesteps`` (``set_timesteps`` replaces it), so the check costs one identity
    comparison per call otherwise."""

    def __init__(self, pipe: Any, settings: Mapping[str, Any], path: str | Path) -> None:
        self.pipe, self.settings, self.path = pipe, settings, path
        self._seen: Any = None

    def __call__(self) -> None:
        scheduler = getattr(self.pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or timesteps is self._seen:
            return
        self._seen = timesteps
        steps = getattr(scheduler, "num_inference_steps", None)
        if not isinstance(steps, int):
            steps = len(timesteps)
        guidance = getattr(self.pipe, "_guidance_scale", None)
        guidance = float(guidance) if _number(guidance) and self._keeps_guidance() else None
        warn_off_settings(self.path, off_settings(self.settings, steps=[steps], guidance_scale=guidance), stacklevel=3)

    def _keeps_guidance(self) -> bool:
        """Whether ``_guidance_scale`` is the scale calibri passes (not so for Qwen-Image, whose
        classifier-free scale is ``true_cfg_scale``)."""
        from .generation import family_of

        try:
            return family_of(self.pipe).guidance_argument == "guidance_scale"
        except ValueError:
            return False


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
