"""The run directory: resolved config, trials log, atomic checkpoints, best result.

Layout::

    RUN_DIR/config.yaml        the fully resolved config (with package versions)
    RUN_DIR/trials.jsonl       one JSON line per evaluation, appended after each round
    RUN_DIR/validation.jsonl   one JSON line per held-out evaluation (runs with validation)
    RUN_DIR/checkpoint/        state-<round>.pkl, written atomically after each round (newest 2 kept)
    RUN_DIR/optimizer/         files a backend keeps (optuna's journal)
    RUN_DIR/best.json          best evaluated point, the optimiser's recommendation, progress

Checkpoints are pickles (optimiser libraries' states are Python objects): load only run
directories you trust. A checkpoint records how many trial lines it covers, so a resume cuts
``trials.jsonl`` back to that count, which also drops a line half-written by a killed process.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .errors import RunDirError

CHECKPOINT_FORMAT = 1
KEEP_CHECKPOINTS = 2


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = False) -> None:
    """Write to a temporary file in the same folder, then rename it over ``path``.

    The rename makes the write atomic for readers and against a killed process; ``fsync``
    also makes it survive a power loss, at a cost of milliseconds per call."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: Path, text: str, fsync: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync)


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, path: str | Path, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._pruned = False

    config_path = property(lambda self: self.path / "config.yaml")
    trials_path = property(lambda self: self.path / "trials.jsonl")
    validation_path = property(lambda self: self.path / "validation.jsonl")
    best_path = property(lambda self: self.path / "best.json")
    checkpoint_dir = property(lambda self: self.path / "checkpoint")
    optimizer_dir = property(lambda self: self.path / "optimizer")

    # -- lifecycle --------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.config_path.exists()

    def create(self, config_text: str, overwrite: bool = False) -> None:
        """Start a fresh run directory; refuses to replace an existing run unless ``overwrite``."""
        self.check_new(overwrite)
        if self.exists():
            for child in ("trials.jsonl", "validation.jsonl", "best.json", "config.yaml"):
                (self.path / child).unlink(missing_ok=True)
            for child in (self.checkpoint_dir, self.optimizer_dir):
                shutil.rmtree(child, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, config_text)

    def check_new(self, overwrite: bool = False) -> None:
        """Raise :class:`RunDirError` unless :meth:`create` may start a run here; touches nothing."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path}: exists and is not a directory")
        if self.exists() and not overwrite:
            state = "finished" if self.is_finished() else \
                f"unfinished (continue it with: calibri resume {self.path})"
            raise RunDirError(f"{self.path}: holds a {state} run; pass --overwrite to replace it")

    def require(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path}: is a file, not a run directory")
        if not self.path.is_dir():
            raise RunDirError(f"{self.path}: no such run directory")
        if not self.exists():
            raise RunDirError(f"{self.path}: not a calibri run directory (no config.yaml)")

    # -- trials -------------------------------------------------------------------------------
    def append_trials(self, records: list[dict[str, Any]]) -> None:
        self._append(self.trials_path, records)

    def read_trials(self) -> list[dict[str, Any]]:
        """Every complete line; a truncated or corrupt last line is ignored."""
        return self._read(self.trials_path)

    def truncate_trials(self, count: int) -> None:
        """Keep the first ``count`` lines (what the checkpoint covers)."""
        self._truncate(self.trials_path, count)

    # -- validation -----------------------------------------------------------------------------
    def append_validation(self, records: list[dict[str, Any]]) -> None:
        self._append(self.validation_path, records)

    def read_validation(self) -> list[dict[str, Any]]:
        return self._read(self.validation_path)

    def truncate_validation(self, count: int) -> None:
        self._truncate(self.validation_path, count)

    # -- JSON lines -----------------------------------------------------------------------------
    def _append(self, path: Path, records: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(record, allow_nan=False) + "\n" for record in records)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(lines)
            if self.fsync:
                handle.flush()
                os.fsync(handle.fileno())

    @staticmethod
    def _read(path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return out

    @staticmethod
    def _truncate(path: Path, count: int) -> None:
        if not path.exists():
            if count:
                raise RunDirError(f"{path}: missing, but the checkpoint covers {count} lines")
            return
        kept = 0
        offset = 0
        with open(path, "rb") as handle:
            for line in handle:
                if kept == count:
                    break
                if not line.endswith(b"\n"):
                    break
                kept += 1
                offset += len(line)
        if kept < count:
            raise RunDirError(f"{path}: has {kept} complete lines, the checkpoint covers {count}")
        with open(path, "r+b") as handle:
            handle.truncate(offset)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``state`` as a new file (temporary name, then renamed: a new name, which is far
        cheaper than replacing a file on ext4) and drop all but the newest two."""
        state = {"format": CHECKPOINT_FORMAT, **state}
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"state-{state['round']:08d}.pkl"
        tmp = self.checkpoint_dir / f".{path.name}.tmp"
        with open(tmp, "wb") as handle:
            pickle.dump(state, handle, protocol=pickle.HIGHEST_PROTOCOL)
            if self.fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        stale = [self.checkpoint_dir / f"state-{state['round'] - KEEP_CHECKPOINTS:08d}.pkl"]
        if not self._pruned:  # once per process: leftovers of an earlier, resumed session
            stale = sorted(self.checkpoint_dir.glob("state-*.pkl"))[:-KEEP_CHECKPOINTS]
            self._pruned = True
        for old in stale:
            old.unlink(missing_ok=True)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The newest readable checkpoint; unreadable ones (half-written, corrupt) are skipped."""
        states = []
        for path in sorted(self.checkpoint_dir.glob("state-*.pkl")):
            try:
                with open(path, "rb") as handle:
                    state = pickle.load(handle)
                if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
                    raise ValueError("not a calibri checkpoint of a known format")
                states.append(state)
            except Exception as exc:
                warnings.warn(f"calibri: skipping unreadable checkpoint {path}: {type(exc).__name__}: {exc}",
                              RuntimeWarning, stacklevel=2)
        return max(states, key=lambda state: state["round"]) if states else None

    def is_finished(self) -> bool:
        state = self.load_checkpoint() if self.checkpoint_dir.exists() else None
        return bool(state and state.get("finished"))

    # -- best -------------------------------------------------------------------------------
    def write_best(self, best: dict[str, Any]) -> None:
        atomic_write_text(self.best_path, json.dumps(best, indent=2, allow_nan=False) + "\n", self.fsync)

    def read_best(self) -> dict[str, Any] | None:
        if not self.best_path.exists():
            return None
        return json.loads(self.best_path.read_text(encoding="utf-8"))
