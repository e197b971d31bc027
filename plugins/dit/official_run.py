"""Reading one result of an official Calibri run folder (``logs/<run>_<time>``).

Only the JSON files are read: ``checkpoints/step_N/cmaes_step_NNNN.json`` (the result) and the
run's ``config.json``. The pickled optimiser state beside them is never opened: unpickling runs
arbitrary code, and nothing in it is needed. Every mistake is one line naming the file.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibri.core.errors import UserError

from .models import read_json_file

_STEP_DIR = re.compile(r"step_(\d+)")
_RESULT_FILE = re.compile(r"cmaes_step_(\d+)\.json")
#: A result holds a few hundred numbers per copy; far larger is not one.
MAX_RESULT_BYTES = 16 << 20


@dataclass(frozen=True)
class OfficialResult:
    """One saved result: its file, the run's config, and what they say."""

    run_dir: Path
    step: int
    path: Path
    config_path: Path
    solution: list[float]
    train_best: float | None
    train_mean: float | None
    val: float | None
    sigma: float | None
    timestamp: Any
    shapes: dict[str, Any]
    config: dict[str, Any]
    #: Warnings about the files themselves (a skipped incomplete step, a mismatched step number).
    notes: tuple[str, ...] = ()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def available_steps(run_dir: Path) -> dict[int, Path]:
    """``step_N`` folders under ``run_dir/checkpoints``, by N."""
    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such run folder")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a folder (expected an official run folder logs/<run>_<time>)")
    checkpoints = run_dir / "checkpoints"
    if not checkpoints.is_dir():
        if _STEP_DIR.fullmatch(run_dir.name) and run_dir.parent.name == "checkpoints":
            raise UserError(f"{run_dir}: a step folder; give its run folder {run_dir.parent.parent} "
                            f"(and --step {_STEP_DIR.fullmatch(run_dir.name).group(1)})")
        raise UserError(f"{run_dir}: no checkpoints/ folder (expected an official run folder logs/<run>_<time>)")
    steps = {}
    for child in checkpoints.iterdir():
        match = _STEP_DIR.fullmatch(child.name)
        if match and child.is_dir():
            steps[int(match.group(1))] = child
    if not steps:
        raise UserError(f"{checkpoints}: no step_N folders (the run saved no result)")
    return dict(sorted(steps.items()))


def _result_file(folder: Path, step: int) -> Path | None:
    """The ``cmaes_step_NNNN.json`` of ``folder`` (its number may be zero-padded to any width)."""
    found = [p for p in folder.iterdir() if (m := _RESULT_FILE.fullmatch(p.name)) and int(m.group(1)) == step]
    return found[0] if len(found) == 1 and found[0].is_file() else None


def choose_step(run_dir: Path, step: int | None) -> tuple[int, Path, list[str]]:
    """``(N, result file, notes)``: ``--step N``, or the newest step that holds a result (a newer
    folder without one, as an interrupted save leaves, is skipped with a note)."""
    steps = available_steps(run_dir)
    listed = ", ".join(map(str, steps))
    if step is not None:
        if step not in steps:
            raise UserError(f"--step: {run_dir} has no step_{step} (available: {listed})")
        path = _result_file(steps[step], step)
        if path is None:
            raise UserError(f"{steps[step]}: no cmaes_step_{step:04d}.json (the result of step {step})")
        return step, path, []
    skipped = []
    for number in reversed(steps):
        path = _result_file(steps[number], number)
        if path is not None:
            notes = [f"{', '.join(skipped)} of {run_dir} hold{'s' if len(skipped) == 1 else ''} no "
                     f"cmaes_step_*.json result (an interrupted save?); importing step {number}"] if skipped else []
            return number, path, notes
        skipped.append(f"step_{number}")
    raise UserError(f"{run_dir / 'checkpoints'}: no step_N folder holds a cmaes_step_*.json result")


def find_config(run_dir: Path, result: Path) -> Path:
    """The run's ``config.json``: in the run folder, else beside the result file."""
    tried = [run_dir / "config.json", result.parent / "config.json"]
    for path in tried:
        if path.is_file():
            return path
    raise UserError(f"{run_dir}: no config.json of the run (tried {' and '.join(map(str, tried))})")


def read_result(run_dir: Path, step: int | None = None) -> OfficialResult:
    """The chosen result of ``run_dir`` and its run's config, checked field by field."""
    number, path, notes = choose_step(run_dir, step)
    config_path = find_config(run_dir, path)
    document = read_json_file(path, "official Calibri result", MAX_RESULT_BYTES)
    if not isinstance(document, dict):
        raise UserError(f"{path}: not an official Calibri result (expected a JSON object)")
    solution = document.get("solution")
    if not isinstance(solution, list) or not solution:
        raise UserError(f"{path}: solution must be a non-empty list of numbers")
    bad = next((i for i, v in enumerate(solution) if not _number(v)), None)
    if bad is not None:
        raise UserError(f"{path}: solution[{bad}] is not a finite number: {solution[bad]!r}")
    shapes = document.get("shapes", {})
    if not isinstance(shapes, dict):
        raise UserError(f"{path}: shapes must be a mapping")
    total = shapes.get("total")
    if total is not None and total != len(solution):
        raise UserError(f"{path}: shapes.total is {total!r} but solution has {len(solution)} values (a damaged file?)")
    if document.get("step") is not None and document["step"] != number:
        notes.append(f"{path} says step {document['step']!r}, its folder step {number}")
    numbers = {}
    for key in ("train_best", "train_mean", "val", "sigma"):
        value = document.get(key)
        if value is not None and not _number(value):
            raise UserError(f"{path}: {key} must be a number or null, got {value!r}")
        numbers[key] = None if value is None else float(value)
    config = read_json_file(config_path, "official run config")
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: not an official run config (expected a JSON object)")
    return OfficialResult(run_dir, number, path, config_path, [float(v) for v in solution], numbers["train_best"],
                          numbers["train_mean"], numbers["val"], numbers["sigma"], document.get("timestamp"),
                          shapes, config, tuple(notes))


def config_field(result: OfficialResult, dotted: str) -> Any:
    """``model.model_name``-style lookup in the run's config (None where absent)."""
    node: Any = result.config
    for part in dotted.split("."):
        if not isinstance(node, dict):
            raise UserError(f"{result.config_path}: {dotted}: {part!r} is inside a non-mapping")
        node = node.get(part)
    return node


def copies_of(result: OfficialResult) -> int:
    """The number of copies M: ``scaleguidance.num_models`` of the config (else the result's
    ``shapes.n_models``); the two must agree where both are given."""
    configured = config_field(result, "scaleguidance.num_models")
    saved = result.shapes.get("n_models")
    for value, where in ((configured, f"{result.config_path}: scaleguidance.num_models"),
                         (saved, f"{result.path}: shapes.n_models")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{where}: expected a positive whole number of copies, got {value!r}")
    if configured is not None and saved is not None and configured != saved:
        raise UserError(f"{result.path}: shapes.n_models is {saved} but {result.config_path} has "
                        f"scaleguidance.num_models {configured}")
    if configured is None and saved is None:
        raise UserError(f"{result.config_path}: no scaleguidance.num_models (nor shapes.n_models in {result.path})")
    return configured if configured is not None else saved
