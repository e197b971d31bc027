"""Flow-GRPO prompt datasets as a calibri prompt source: ``flowgrpo:DIR[:SPLIT][:FORMAT]``.

A Flow-GRPO dataset is a folder holding, per split, either ``{split}.txt`` (one prompt per line:
the PickScore and OCR sets) or ``{split}_metadata.jsonl`` (one JSON object per line with a
``prompt``: the GenEval sets). Both are read as Flow-GRPO's own loaders read them, so a set has
exactly the prompts (and the count) a Flow-GRPO run sees:

* text: every line of the file, ``line.strip()``-ed — a blank line inside the file is kept, as an
  empty prompt (the metadata of every prompt is ``{}``);
* jsonl: every line is one row; the row *as a whole*, ``prompt`` included, is the prompt's
  metadata (what GenEval's server reads). Lines holding only whitespace are skipped (Flow-GRPO's
  loader would stop on them).

``SPLIT`` defaults to ``train`` (``flowgrpo:DIR:test`` for ``validation_prompts``). ``FORMAT`` is
``text`` (alias ``general_ocr``, Flow-GRPO's ``prompt_fn`` name) or ``geneval`` (alias
``jsonl``); without it, the one file that exists is read, and when both do, the jsonl one — it
carries the metadata a text file cannot. A folder whose own name holds a colon still works: the
whole spec is tried as a folder first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from calibri.core.errors import ConfigError
from calibri.plugins.dit.prompts import PromptSet

SCHEME = "flowgrpo"
#: FORMAT suffix → the file kind it selects.
FORMATS = {"text": "text", "general_ocr": "text", "txt": "text", "geneval": "jsonl", "jsonl": "jsonl"}
DEFAULT_SPLIT = "train"


def parse_spec(rest: str) -> tuple[Path, str, str | None]:
    """``DIR[:SPLIT][:FORMAT]`` → ``(folder, split, format or None)``.

    The longest prefix naming an existing folder is the folder, so a ``:`` inside a folder's name
    is fine; when no prefix exists, trailing parts shaped like SPLIT and FORMAT are taken as such
    (so the error names the folder that is missing)."""
    parts = rest.split(":")
    for cut in range(len(parts), 0, -1):
        folder, tail = ":".join(parts[:cut]), parts[cut:]
        parsed = _tail(tail)
        if parsed is not None and Path(folder).expanduser().is_dir():
            return Path(folder).expanduser(), *parsed
    for cut in (len(parts) - 2, len(parts) - 1):
        parsed = _tail(parts[cut:]) if cut >= 1 else None
        if parsed is not None:
            return Path(":".join(parts[:cut])).expanduser(), *parsed
    return Path(rest).expanduser(), DEFAULT_SPLIT, None


def _tail(tail: list[str]) -> tuple[str, str | None] | None:
    """``[]``, ``[SPLIT]``, ``[FORMAT]`` or ``[SPLIT, FORMAT]`` → ``(split, format)``; None if not."""
    if not tail:
        return DEFAULT_SPLIT, None
    if len(tail) == 1:
        if tail[0] in FORMATS:
            return DEFAULT_SPLIT, FORMATS[tail[0]]
        return (tail[0], None) if _is_split(tail[0]) else None
    if len(tail) == 2 and _is_split(tail[0]) and tail[1] in FORMATS:
        return tail[0], FORMATS[tail[1]]
    return None


def _is_split(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "_-." for c in name) and name not in (".", "..")


def load_flowgrpo(rest: str, field: str) -> PromptSet:
    """The prompt set of ``flowgrpo:REST`` (see the module docstring); errors name ``field``."""
    spec = f"{SCHEME}:{rest}"
    if not rest.strip():
        raise ConfigError(field, f"{spec}: give the dataset folder, e.g. flowgrpo:dataset/pickscore[:test]")
    folder, split, fmt = parse_spec(rest)
    if not folder.is_dir():
        raise ConfigError(field, f"{spec}: no such dataset folder {str(folder)!r}")
    text_file, jsonl_file = folder / f"{split}.txt", folder / f"{split}_metadata.jsonl"
    if fmt is None:
        fmt = "jsonl" if jsonl_file.is_file() else "text" if text_file.is_file() else None
    path = {"jsonl": jsonl_file, "text": text_file}.get(fmt or "")
    if path is None or not path.is_file():
        wanted = str(path) if path is not None else f"{text_file} or {jsonl_file}"
        raise ConfigError(field, f"{spec}: no split {split!r} in {folder}: {wanted} does not exist")
    prompts, metadata = (read_jsonl if fmt == "jsonl" else read_text)(path, field)
    if not any(prompt.strip() for prompt in prompts):
        raise ConfigError(field, f"{spec}: {path} holds no prompts")
    return PromptSet(tuple(prompts), tuple(metadata), str(path))


def _open_lines(path: Path, field: str) -> list[str]:
    """The file's lines as Python's text mode splits them (``\\n``, ``\\r\\n``, ``\\r``), as
    Flow-GRPO reads it; a bad encoding or an unreadable file is one line naming it."""
    try:
        with path.open("r", encoding="utf-8") as handle:
            return handle.readlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(field, f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(field, f"{path}: cannot read: {exc.strerror or exc}") from None


def read_text(path: Path, field: str) -> tuple[list[str], list[dict[str, Any]]]:
    """``{split}.txt``: one prompt per line, stripped, blank lines kept (Flow-GRPO's count)."""
    prompts = [line.strip() for line in _open_lines(path, field)]
    return prompts, [{} for _ in prompts]


def read_jsonl(path: Path, field: str) -> tuple[list[str], list[dict[str, Any]]]:
    """``{split}_metadata.jsonl``: one object per line; the whole row is the metadata."""
    from calibri.plugins.dit.prompts import jsonl_rows

    rows = jsonl_rows(path, _open_lines(path, field), field, non_empty=False)
    return [row["prompt"] for row in rows], rows


__all__ = ["DEFAULT_SPLIT", "FORMATS", "SCHEME", "load_flowgrpo", "parse_spec", "read_jsonl", "read_text"]
