"""The run directory: resolved config, trials log, atomic checkpoints, best result.

Layout::

    RUN_DIR/config.yaml        the fully resolved config (with package versions)
    RUN_DIR/trials.jsonl       one JSON line per evaluation, appended after each round
    RUN_DIR/validation.jsonl   one JSON line per held-out evaluation (runs with validation)
    RUN_DIR/checkpoint/        state-<round>.pkl, written atomically after each round (newest 2 kept)
    RUN_DIR/optimizer/         files a backend keeps (optuna's journal)
    RUN_DIR/best.json          best evaluated point, the optimiser's recommendation, progress

Checkpoints are pickles (optimiser libraries' states are Python objects), signed with this
user's key (:mod:`calibri.core.trust`): one that does not verify is not loaded without
``trust=True``. A checkpoint records how many trial lines it covers and a digest chained over
them, so a resume cuts ``trials.jsonl`` back to that count (which also drops a line half-written
by a killed process) and refuses a log that differs from what the checkpoint saw.

One process writes a run directory at a time: :meth:`RunStore.lock` holds an exclusive lock on
``RUN_DIR/.lock`` (released by the kernel if the process dies) and names the holder's pid.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import trust as signing
from .errors import RunDirError

CHECKPOINT_FORMAT = 2
KEEP_CHECKPOINTS = 2
#: A checkpoint file: this line, the HMAC tag of the pickle, the pickle.
CHECKPOINT_MAGIC = b"calibri-checkpoint 2\n"
#: Keys every checkpoint state has; a state without one is refused, not half-used.
STATE_KEYS = ("round", "n_evals", "n_failed", "elapsed", "best", "finished", "optimizer", "rng")
#: The digest chain of an empty log.
EMPTY_DIGEST = hashlib.sha256(b"calibri trials").hexdigest()
LOCK_NAME = ".lock"


def chain_digest(digest: str, line: bytes) -> str:
    """The trials digest after one more line: each step hashes the previous digest and the line."""
    return hashlib.sha256(digest.encode("ascii") + line).hexdigest()


class UntrustedCheckpoint(Exception):
    """A checkpoint file this user's key did not sign (or one damaged after it was written)."""


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

    def __init__(self, path: str | Path, fsync: bool = False, trust_checkpoints: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.trust_checkpoints = trust_checkpoints
        self._pruned = False

    config_path = property(lambda self: self.path / "config.yaml")
    trials_path = property(lambda self: self.path / "trials.jsonl")
    validation_path = property(lambda self: self.path / "validation.jsonl")
    best_path = property(lambda self: self.path / "best.json")
    checkpoint_dir = property(lambda self: self.path / "checkpoint")
    optimizer_dir = property(lambda self: self.path / "optimizer")
    lock_path = property(lambda self: self.path / LOCK_NAME)

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

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for this process (creating the directory if needed).

        A second writer gets a :class:`RunDirError` naming the holder's pid. The lock is an
        ``flock`` on ``RUN_DIR/.lock``, so a killed holder never leaves a stale lock behind."""
        try:
            import fcntl
        except ImportError:  # no flock on this platform: one writer is the user's to ensure
            yield
            return
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path}: exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
                raise RunDirError(f"{self.path}: in use by another calibri process (pid {holder}); "
                                  f"wait for it to end or stop it") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- trials -------------------------------------------------------------------------------
    def append_trials(self, records: list[dict[str, Any]], digest: str = EMPTY_DIGEST) -> str:
        """Append one round's records; returns the digest chain continued from ``digest``."""
        lines = self._append(self.trials_path, records)
        for line in lines:
            digest = chain_digest(digest, line)
        return digest

    def verify_trials(self, count: int, digest: str | None) -> str:
        """Refuse a trials log whose first ``count`` lines are not what the checkpoint saw:
        duplicated or edited lines, or another process's appends. ``digest=None`` (a checkpoint
        from before digests) checks only that candidate ids run 0, 1, 2, …; returns the digest."""
        running = EMPTY_DIGEST
        if count == 0:
            return running
        if not self.trials_path.exists():
            raise RunDirError(f"{self.trials_path}: missing, but the checkpoint covers {count} lines")
        complete = 0
        with open(self.trials_path, "rb") as handle:
            for number, line in enumerate(handle):
                if number == count or not line.endswith(b"\n"):
                    break
                complete += 1
                running = chain_digest(running, line)
                if digest is None:
                    try:
                        candidate = json.loads(line).get("candidate")
                    except (ValueError, AttributeError):
                        candidate = None
                    if candidate != number:
                        raise RunDirError(f"{self.trials_path}: line {number + 1} holds candidate {candidate!r}, "
                                          f"expected {number} (duplicated or edited lines); start a new run")
        if complete < count:
            raise RunDirError(f"{self.trials_path}: has {complete} complete lines, the checkpoint covers {count}")
        if digest is not None and running != digest:
            raise RunDirError(f"{self.trials_path}: differs from what the checkpoint recorded (lines edited, "
                              f"duplicated or appended by another process); start a new run")
        return running

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
    def _append(self, path: Path, records: list[dict[str, Any]]) -> list[bytes]:
        lines = [(json.dumps(record, allow_nan=False) + "\n").encode("utf-8") for record in records]
        with open(path, "ab") as handle:
            handle.write(b"".join(lines))
            if self.fsync:
                handle.flush()
                os.fsync(handle.fileno())
        return lines

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
        """Write ``state`` as a new, signed file (temporary name, then renamed: a new name, which
        is far cheaper than replacing a file on ext4) and drop all but the newest two."""
        state = {"format": CHECKPOINT_FORMAT, **state}
        payload = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"state-{state['round']:08d}.pkl"
        tmp = self.checkpoint_dir / f".{path.name}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(CHECKPOINT_MAGIC + signing.sign(payload) + payload)
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

    def checkpoint_files(self) -> list[Path]:
        return sorted(self.checkpoint_dir.glob("state-*.pkl"))

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The newest loadable checkpoint. Unreadable ones (damaged) are skipped with a warning;
        if none loads and some were skipped only for their signature, the run is refused rather
        than silently started over (unless ``trust_checkpoints``)."""
        states, untrusted = [], []
        for path in self.checkpoint_files():
            try:
                state = read_checkpoint(path, trust=self.trust_checkpoints)
            except UntrustedCheckpoint as exc:
                untrusted.append((path, exc))
                continue
            except Exception as exc:
                warnings.warn(f"calibri: skipping unreadable checkpoint {path}: {type(exc).__name__}: {exc}",
                              RuntimeWarning, stacklevel=2)
                continue
            missing = [key for key in STATE_KEYS if key not in state]
            if missing:
                raise RunDirError(f"{path}: not a calibri checkpoint (no {missing[0]!r}); remove it to resume "
                                  f"from the one before")
            states.append(state)
        if not states and untrusted:
            raise RunDirError(f"{untrusted[-1][0]}: not signed with this user's checkpoint key ({signing.key_path()}), "
                              f"or damaged; loading a checkpoint runs code, so resume with --trust-checkpoint "
                              f"only if you trust where this run directory came from")
        for path, exc in untrusted:  # an older signed one is used: say which were passed over
            warnings.warn(f"calibri: skipping unreadable checkpoint {path}: {exc}", RuntimeWarning, stacklevel=2)
        return max(states, key=lambda state: state["round"]) if states else None

    def is_finished(self) -> bool:
        """Whether the newest checkpoint says finished; reads only checkpoints this user signed."""
        for path in reversed(self.checkpoint_files()):
            try:
                return bool(read_checkpoint(path, trust=False).get("finished"))
            except Exception:  # noqa: BLE001 - untrusted or damaged: try the one before
                continue
        return False

    # -- best -------------------------------------------------------------------------------
    def write_best(self, best: dict[str, Any]) -> None:
        atomic_write_text(self.best_path, json.dumps(best, indent=2, allow_nan=False) + "\n", self.fsync)

    def read_best(self) -> dict[str, Any] | None:
        """best.json, or None before the first round; a damaged file is a one-line error."""
        if not self.best_path.exists():
            return None
        try:
            best = json.loads(self.best_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise RunDirError(f"{self.best_path}: unreadable ({type(exc).__name__}: {exc}); "
                              f"'calibri resume {self.path}' rewrites it from the checkpoint") from None
        if not isinstance(best, dict) or not isinstance(best.get("direction"), str):
            raise RunDirError(f"{self.best_path}: not a calibri best.json; "
                              f"'calibri resume {self.path}' rewrites it from the checkpoint")
        return best


def read_checkpoint(path: Path, trust: bool = False) -> dict[str, Any]:
    """One checkpoint file's state. Raises :class:`UntrustedCheckpoint` (without unpickling) when
    its signature does not verify and ``trust`` is false."""
    data = Path(path).read_bytes()
    if data.startswith(CHECKPOINT_MAGIC):
        body = data[len(CHECKPOINT_MAGIC):]
        tag, payload = body[:signing.TAG_BYTES], body[signing.TAG_BYTES:]
        if not trust and not signing.verify(payload, tag):
            raise UntrustedCheckpoint("not signed with this user's checkpoint key, or damaged")
    elif not trust:
        raise UntrustedCheckpoint("not a signed calibri checkpoint (an older format, or damaged)")
    else:
        payload = data
    state = pickle.loads(payload)
    if not isinstance(state, dict) or state.get("format") not in (1, CHECKPOINT_FORMAT):
        raise ValueError("not a calibri checkpoint of a known format")
    return state
