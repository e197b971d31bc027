"""Prompt sets and the prompt stream of a calibration run.

Sources: a ``.txt`` file (one prompt per line; blank lines and ``#`` comments skipped), a
``.jsonl`` file (one object per line with a ``prompt`` field; every other field is metadata handed
to the rewards), a list given inline in the YAML, a shipped set by name (``toy/calibration``,
``toy/validation``: the toy world's split), or ``SCHEME:REST`` for a source a plugin registers
through ``calibri_register_prompt_sources`` (``flowgrpo:DIR`` reads a Flow-GRPO dataset folder).
An existing file always wins over a scheme, so a file whose name holds a colon still loads.

Seed policy (one rule for training rounds, validation and evaluation): image ``j`` of a batch
whose context seed is ``s`` is sampled from ``torch.Generator().manual_seed(image_seed(s, j))``.
In a training round every candidate sees the same prompts with the same seeds (common random
numbers); validation uses a fixed seed, so its images do not depend on the round, the batch
size or the worker.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibri.core.errors import ConfigError

if TYPE_CHECKING:
    from .buckets import BucketSchedule

#: Prompt sets shipped with calibri, by name → file inside the installed package.
SHIPPED: dict[str, tuple[str, str]] = {
    "toy/calibration": ("calibri.plugins.toy", "data/calibration.jsonl"),
    "toy/validation": ("calibri.plugins.toy", "data/validation.jsonl"),
}


@dataclass(frozen=True)
class PromptSet:
    prompts: tuple[str, ...]
    metadata: tuple[Mapping[str, Any], ...]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int]) -> tuple[list[str], list[Mapping[str, Any]]]:
        return [self.prompts[i] for i in indices], [self.metadata[i] for i in indices]


def shipped_path(name: str) -> Path:
    from importlib.resources import files

    package, relative = SHIPPED[name]
    return Path(str(files(package).joinpath(relative)))


def load_prompts(spec: str | Path | Sequence[str], field: str) -> PromptSet:
    """A prompt set from a file, a shipped name or an inline list; errors name ``field``."""
    if isinstance(spec, (list, tuple)):
        prompts = [p for p in spec]
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError(field, "an inline prompt list must hold non-empty strings")
        return PromptSet(tuple(prompts), tuple({} for _ in prompts), "inline")
    text = str(spec)
    path = shipped_path(text) if text in SHIPPED else Path(text).expanduser()
    if not path.is_file():
        source = _registered_source(text, field)
        if source is not None:
            return source
        known = ", ".join(SHIPPED)
        schemes = _schemes()
        also = f"; prompt sources: {', '.join(f'{s}:...' for s in schemes)}" if schemes else ""
        raise ConfigError(field, f"{text}: no such prompt file (or shipped set: {known}{also})")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(field, f"{path}: cannot read: {exc}") from None
    if path.suffix == ".jsonl":
        prompts, metadata = _jsonl(path, content, field)
    else:
        prompts = [line.strip() for line in content.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        metadata = [{} for _ in prompts]
    if not prompts:
        raise ConfigError(field, f"{path}: holds no prompts")
    return PromptSet(tuple(prompts), tuple(metadata), str(path))


#: ``SCHEME:REST``: a scheme is a letter then letters, digits, ``_``, ``.``, ``+`` or ``-``.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9_.+-]*):(.*)", re.DOTALL)


def _schemes() -> list[str]:
    from calibri.core.plugins import get_registry

    return get_registry().names("prompt_sources")


def _registered_source(text: str, field: str) -> PromptSet | None:
    """The prompt set of a ``SCHEME:REST`` spec whose scheme a plugin registered, else None.

    The loader's own ``ConfigError`` passes through; any other error it raises becomes one naming
    ``field``, and so does a result that is not a non-empty :class:`PromptSet`."""
    from calibri.core.plugins import build_from, get_registry

    match = _SCHEME.fullmatch(text)
    if match is None or match.group(1) not in _schemes():
        return None
    registration = get_registry().get("prompt_sources", match.group(1), field)
    try:
        result = build_from(registration, registration.factory, match.group(2), field)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(field, f"{text}: {type(exc).__name__}: {exc}") from None
    if not isinstance(result, PromptSet):
        raise ConfigError(field, f"{text}: the {match.group(1)!r} prompt source returned a "
                                 f"{type(result).__name__}, not a PromptSet")
    if not len(result) or len(result.metadata) != len(result.prompts):
        raise ConfigError(field, f"{text}: holds no prompts" if not len(result)
                          else f"{text}: {len(result.prompts)} prompts but {len(result.metadata)} metadata rows")
    return result


def jsonl_rows(path: Path, lines: Iterable[str], field: str, *, non_empty: bool = True) -> list[dict[str, Any]]:
    """The objects of a prompt ``.jsonl`` file, each with a string ``prompt`` (non-empty unless
    ``non_empty`` is off); blank lines skipped; a bad line is one error naming it."""
    rows = []
    wanted = "a non-empty string" if non_empty else "a string"
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(field, f"{path}:{number}: not valid JSON: {exc.msg}") from None
        if (not isinstance(row, dict) or not isinstance(row.get("prompt"), str)
                or (non_empty and not row["prompt"].strip())):
            raise ConfigError(field, f"{path}:{number}: expected an object with {wanted} 'prompt'")
        rows.append(row)
    return rows


def _jsonl(path: Path, content: str, field: str) -> tuple[list[str], list[dict[str, Any]]]:
    rows = jsonl_rows(path, content.splitlines(), field)
    return [row["prompt"] for row in rows], [{k: v for k, v in row.items() if k != "prompt"} for row in rows]


def image_seed(seed: int, index: int) -> int:
    """The noise seed of image ``index`` under context seed ``seed`` (see the module docstring)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


class PromptStream:
    """Each round's bucket of training prompts, and the fixed validation set.

    Stateless: the bucket of round ``r`` is a pure function of (seed, r) — consecutive slices of
    a sequence of per-epoch permutations — so a resumed run, whose checkpoint holds the round
    counter, continues the stream exactly and no prompt repeats before every one was used.
    """

    def __init__(self, train: PromptSet, bucket_size: "int | BucketSchedule", seed: int,
                 validation: PromptSet | None = None, validation_seed: int = 0) -> None:
        from .buckets import BucketSchedule

        self.train, self.schedule, self.seed = train, BucketSchedule.of(bucket_size), seed
        self.validation, self.validation_seed = validation, validation_seed
        self._cache: tuple[int, np.ndarray] | None = None  # the current epoch's permutation

    def indices(self, round_index: int) -> list[int]:
        n = len(self.train)
        start = self.schedule.start(round_index)
        out = []
        for position in range(start, start + self.schedule.size(round_index)):
            epoch, offset = divmod(position, n)
            out.append(int(self._permutation(epoch)[offset]))
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        cache = self._cache
        if cache is None or cache[0] != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 7919, epoch]))
            cache = (epoch, rng.permutation(len(self.train)))
            self._cache = cache
        return cache[1]

    def next_round(self, round_index: int) -> dict[str, Any]:
        indices = self.indices(round_index)
        prompts, metadata = self.train.subset(indices)
        return {"split": "train", "prompts": prompts, "metadata": metadata, "indices": indices}

    @property
    def has_validation(self) -> bool:
        return self.validation is not None

    def validation_data(self) -> tuple[int, dict[str, Any]]:
        if self.validation is None:
            raise RuntimeError("no validation prompts")
        indices = list(range(len(self.validation)))
        prompts, metadata = self.validation.subset(indices)
        return self.validation_seed, {"split": "validation", "prompts": prompts, "metadata": metadata,
                                      "indices": indices}

    def state_dict(self) -> dict[str, Any]:
        return {"stateless": True}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore: buckets are a function of the round index."""
