"""The shipped prompt files of the toy world (``toy/calibration``, ``toy/validation``).

    python -m calibri.plugins.toy.data_files plugins/toy/data

writes them from :func:`~calibri.plugins.toy.world.split_scenes`: 240 calibration prompts and 80
held-out ones, each line ``{"prompt": ..., "size": ..., "colour": ..., "shape": ..., "position": ...}``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .world import Scene, prompt_of, split_scenes


def lines(scenes: list[Scene]) -> str:
    return "".join(json.dumps({"prompt": prompt_of(s), **s.as_metadata()}) + "\n" for s in scenes)


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    calibration, validation = split_scenes()
    (folder / "calibration.jsonl").write_text(lines(calibration), encoding="utf-8")
    (folder / "validation.jsonl").write_text(lines(validation), encoding="utf-8")


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "data"))
