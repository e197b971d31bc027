"""Per-round metrics read from a run directory as it grows.

Callbacks get a :class:`~calibri.core.callbacks.RoundRecord` per round; the round mean, the
validation records and the points behind the values are in the run's JSON-lines logs. Reading
those (only the lines added since the last read) gives the same numbers for a round whether it
is logged live, caught up after a resume, or by a callback added on resume.

Steps count finished rounds: step 0 holds the baseline's validation, step ``k`` round ``k - 1``'s
training values and the validation made after it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibri.core.objective import to_loss


@dataclass
class Step:
    """What happened by the end of one step (a finished round, or 0: before the first)."""

    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    best_params: dict[str, Any] | None = None  # the best training point so far
    validation: list[dict[str, Any]] = field(default_factory=list)  # records made at this step
    selected: dict[str, Any] | None = None  # the validation record selected so far (best value)


class _Tail:
    """The complete JSON lines appended to a file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1  # a half-written last line waits for the next call
        self.offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


class RunFollower:
    """Turns a run directory's trials and validation logs into :class:`Step` s, in order."""

    def __init__(self, run_dir: str | Path, direction: str) -> None:
        run_dir = Path(run_dir)
        self.direction = direction
        self._trials, self._validation = _Tail(run_dir / "trials.jsonl"), _Tail(run_dir / "validation.jsonl")
        self._pending_trials: list[dict[str, Any]] = []
        self._pending_validation: list[dict[str, Any]] = []
        self.validation_records: list[dict[str, Any]] = []  # every record read so far
        self._next = 0  # the next step to emit
        self._evaluations = self._failures = 0
        self._best: dict[str, Any] | None = None
        self._selected: dict[str, Any] | None = None

    def _better(self, value: float, than: float | None) -> bool:
        return than is None or to_loss(value, self.direction) < to_loss(than, self.direction)

    def steps(self, upto: int) -> list[Step]:
        """The steps not returned yet, up to ``upto`` (finished rounds) included."""
        self._pending_trials += self._trials.read()
        self._pending_validation += self._validation.read()
        out = []
        while self._next <= upto:
            out.append(self._step(self._next))
            self._next += 1
        return out

    def _step(self, step: int) -> Step:
        result = Step(step)
        if step > 0:
            trials = [t for t in self._pending_trials if t["round"] == step - 1]
            self._pending_trials = [t for t in self._pending_trials if t["round"] >= step]
            values = [t["value"] for t in trials if t.get("status") == "ok" and t.get("value") is not None]
            for trial in trials:
                if trial.get("status") == "ok" and trial.get("value") is not None \
                        and self._better(trial["value"], self._best and self._best["value"]):
                    self._best = trial
            self._evaluations += len(trials)
            self._failures += len(trials) - len(values)
            result.scalars.update({"train/evaluations": float(self._evaluations),
                                   "train/failures": float(self._failures)})
            if values:
                round_best = min(values, key=lambda v: to_loss(v, self.direction))
                result.scalars.update({"train/round_best": float(round_best),
                                       "train/round_mean": float(sum(values) / len(values))})
            if self._best is not None:
                result.scalars["train/best"] = float(self._best["value"])
                result.best_params = self._best["params"]
        records = [r for r in self._pending_validation if r["after_round"] == step]
        self._pending_validation = [r for r in self._pending_validation if r["after_round"] > step]
        for record in records:
            self.validation_records.append(record)
            if record.get("value") is not None:
                result.scalars[f"validation/{record['source']}"] = float(record["value"])
                if self._better(record["value"], self._selected and self._selected["value"]):
                    self._selected = record
        result.validation = records
        result.selected = self._selected
        if records and self._selected is not None:
            result.scalars["validation/selected"] = float(self._selected["value"])
        return result


def validation_table(records: list[dict[str, Any]]) -> str:
    """The validation records as a markdown table (TensorBoard renders it in its text tab)."""
    lines = ["| after round | point | value | status |", "|---|---|---|---|"]
    for record in records:
        value = "" if record.get("value") is None else f"{record['value']:.6g}"
        lines.append(f"| {record['after_round']} | {record['source']} | {value} | {record.get('status', '')} |")
    return "\n".join(lines)


def split_params(params: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """``(scales, omegas)``: a calibration's guidance weights (names ending in ``omega`` or
    ``omega.<m>``) apart from its scales; any other space's values are all "scales"."""
    scales, omegas = {}, {}
    for name, value in params.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        parts = name.split(".")
        is_omega = parts[-1] == "omega" or (len(parts) > 1 and parts[-2] == "omega" and parts[-1].isdigit())
        (omegas if is_omega else scales)[name] = float(value)
    return scales, omegas
