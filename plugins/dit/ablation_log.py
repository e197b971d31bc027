"""An ablation's folder as a resumable record: what the study is, and each finished cell.

``study.json`` holds what defines the study (the objective's options, the values, the prompt set
and seeds); a rerun under anything else is refused, naming what changed. ``cells.jsonl`` gets one
line per finished cell, appended and flushed to disk as the cell ends, so a killed study loses at
most the cells it was evaluating: a line cut short by the kill is dropped when the study resumes.
The reports beside them are rewritten whole (atomically) from these two files.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from calibri.core.errors import RunDirError
from calibri.core.run import config_changes
from calibri.core.store import atomic_write_text

FORMAT = 1
STUDY = "study.json"
CELLS = "cells.jsonl"
#: What ``--overwrite`` removes: the study's own files, nothing else in the folder.
OWN_FILES = (STUDY, CELLS, "ablation.csv", "ablation.json", "ablation.md", "ablation.png")


def check_folder(out: Path) -> None:
    """``out`` can hold a study: not a file, and its nearest existing ancestor is a folder."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"-o/--output: {out} exists and is not a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"-o/--output: {parent} is a file, so {out} cannot be created")
            break


def check_study(out: Path, study: Mapping[str, Any], overwrite: bool) -> bool:
    """Whether ``out`` continues this ``study`` (True) or starts it (False). A folder holding
    another study, or other files, is refused in one line unless ``overwrite``. Touches nothing."""
    path = out / STUDY
    if overwrite or not out.exists():
        return False
    if not path.exists():
        if (out / CELLS).exists() or any(p.name not in OWN_FILES and not p.name.startswith(".") for p in out.iterdir()):
            raise RunDirError(f"-o/--output: {out} holds files of something other than an ablation study; "
                              f"choose another folder (or give --overwrite to write the study there)")
        return False
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path}: unreadable ({type(exc).__name__}); give --overwrite to start again") from None
    if not isinstance(before, dict) or before.get("format") != FORMAT:
        raise RunDirError(f"{path}: not a study of this calibri version; give --overwrite to start again")
    changes = config_changes(before.get("study"), dict(study))
    if changes:
        more = f" (and {len(changes) - 3} more)" if len(changes) > 3 else ""
        raise RunDirError(f"{out}: {'; '.join(changes[:3])}{more} since the study began; "
                          f"give --overwrite to start it again")
    return True


def start(out: Path, study: Mapping[str, Any]) -> None:
    """A fresh study in ``out``: its own files from an earlier one removed, ``study.json`` written."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OWN_FILES:
        (out / name).unlink(missing_ok=True)
    atomic_write_text(out / STUDY, json.dumps({"format": FORMAT, "study": dict(study)}, indent=2) + "\n")


def read_cells(out: Path) -> list[dict[str, Any]]:
    """Every cell line, in the order written (a cell retried after a failure has several). A last
    line cut short by a kill is removed from the file; any other unreadable line is a one-line error."""
    path = out / CELLS
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):  # the tail of a line whose writer was killed
        with open(path, "r+b") as handle:
            handle.truncate(complete)
    records = []
    for number, line in enumerate(data[:complete].splitlines(), start=1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("key"), str):
            raise RunDirError(f"{path}:{number}: not a cell record; give --overwrite to start again")
        records.append(record)
    return records


def append_cell(out: Path, record: Mapping[str, Any]) -> None:
    """One cell's line, written in one call and forced to disk before the next cell starts."""
    line = (json.dumps(dict(record), allow_nan=False) + "\n").encode("utf-8")
    with open(out / CELLS, "ab") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
