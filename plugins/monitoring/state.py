"""Small JSON state a monitor keeps in the run directory (``RUN_DIR/monitoring/<name>.json``), so
that a resumed run continues the same log instead of starting another."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from calibri.core.store import atomic_write_text


def state_path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "monitoring" / f"{name}.json"


def read_state(run_dir: str | Path, name: str) -> dict[str, Any]:
    """The saved state, or ``{}`` when there is none (or it is unreadable: start a new log)."""
    try:
        data = json.loads(state_path(run_dir, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(run_dir: str | Path, name: str, state: dict[str, Any]) -> None:
    path = state_path(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(state, indent=2) + "\n")
