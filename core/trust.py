"""Signing checkpoints, so that ``calibri resume`` never unpickles a file this user did not write.

Checkpoints are pickles (optimiser libraries keep their state as Python objects), and loading a
pickle runs code. Run directories get shared, so each checkpoint carries an HMAC-SHA256 of its
bytes under a per-user secret key; a checkpoint whose tag does not verify is not loaded unless the
user says they trust it (``calibri resume --trust-checkpoint``).

The key is 32 random bytes in ``$CALIBRI_KEY_FILE``, or ``$XDG_CONFIG_HOME/calibri/checkpoint.key``
(``~/.config/calibri/checkpoint.key``), created on first use readable by its owner only.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from .errors import UserError

KEY_ENV = "CALIBRI_KEY_FILE"
KEY_BYTES = 32
TAG_BYTES = hashlib.sha256().digest_size


def key_path() -> Path:
    """Where this user's checkpoint key lives."""
    explicit = os.environ.get(KEY_ENV)
    if explicit:
        return Path(explicit).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "calibri" / "checkpoint.key"


def checkpoint_key() -> bytes:
    """This user's key, created (mode 0600) the first time a checkpoint is written."""
    path = key_path()
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = _create_key(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the checkpoint key: {exc.strerror or exc} "
                        f"(set {KEY_ENV} to a file this user may read and write)") from None
    if len(key) < KEY_BYTES:
        raise UserError(f"{path}: not a calibri checkpoint key ({len(key)} bytes, expected {KEY_BYTES}); "
                        f"remove it and a new one is made (checkpoints signed with it will need --trust-checkpoint)")
    return key


def _create_key(path: Path) -> bytes:
    key = secrets.token_bytes(KEY_BYTES)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot create the checkpoint key: {exc.strerror or exc} "
                        f"(set {KEY_ENV} to a file this user may write)") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key


def sign(payload: bytes) -> bytes:
    """The tag that :func:`verify` checks."""
    return hmac.new(checkpoint_key(), payload, hashlib.sha256).digest()


def verify(payload: bytes, tag: bytes) -> bool:
    """Whether ``tag`` was made by :func:`sign` with this user's key (constant-time compare)."""
    return hmac.compare_digest(sign(payload), tag)
