"""How many training prompts each round scores: a fixed bucket, or a schedule that grows it.

``bucket_size: 16`` scores every round's candidates on 16 prompts (the paper's set-up).
``bucket_size: [[0, 4], [10, 8], [20, 16]]`` is a schedule: 4 prompts from round 0, 8 from
round 10, 16 from round 20 on. Early rounds, where candidates differ a lot, are judged cheaply;
later ones, where the differences shrink below the reward's noise, on more prompts. The rounds'
buckets are still consecutive slices of the prompt stream, so a schedule keeps the stream
stateless (a resumed run continues it exactly) and no prompt repeats before every one was used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: ``bucket_size`` as a YAML value: a count, or ``[[first_round, size], ...]``.
BucketSizeValue = int | list[tuple[int, int]]


@dataclass(frozen=True)
class BucketSchedule:
    """``(first_round, size)`` steps, the first at round 0, rounds increasing."""

    steps: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, value: BucketSizeValue | "BucketSchedule") -> "BucketSchedule":
        """The schedule of a checked ``bucket_size`` option (a count is one step from round 0)."""
        if isinstance(value, BucketSchedule):
            return value
        if isinstance(value, int):
            return cls(((0, int(value)),))
        return cls(tuple((int(first), int(size)) for first, size in value))

    @property
    def fixed(self) -> bool:
        return len(self.steps) == 1

    @property
    def largest(self) -> int:
        return max(size for _, size in self.steps)

    def size(self, round_index: int) -> int:
        """Prompts in round ``round_index``'s bucket."""
        current = self.steps[0][1]
        for first, size in self.steps:
            if round_index < first:
                break
            current = size
        return current

    def start(self, round_index: int) -> int:
        """Position in the prompt stream of round ``round_index``'s first prompt: the prompts
        every earlier round used."""
        total = 0
        for i, (first, size) in enumerate(self.steps):
            if round_index <= first:
                break
            end = self.steps[i + 1][0] if i + 1 < len(self.steps) else None
            total += size * ((min(round_index, end) if end is not None else round_index) - first)
        return total

    def label(self) -> str:
        """``16``, or ``4→8@10→16@20`` for a schedule."""
        if self.fixed:
            return str(self.steps[0][1])
        return "→".join(str(size) if first == 0 else f"{size}@{first}" for first, size in self.steps)


def check_bucket_size(value: Any, most: int) -> BucketSizeValue:
    """A checked ``bucket_size`` (raises ``ValueError`` saying what is wrong, for pydantic)."""
    def count(item: Any, what: str) -> int:
        if isinstance(item, float) and item.is_integer():  # YAML's 1e6, as pydantic takes it for an int
            return int(item)
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(f"{what} must be a whole number, got {item!r}")
        return item

    def size(item: Any, what: str = "") -> int:
        n = count(item, what or "the size")
        prefix = f"{what} " if what else ""
        if n < 1:
            raise ValueError(f"{prefix}must be at least 1, got {n}")
        if n > most:
            raise ValueError(f"{prefix}must be at most {most}, got {n}")
        return n

    if not isinstance(value, (list, tuple)):
        return size(value)
    if not value:
        raise ValueError("a schedule lists at least one [first_round, size] step")
    steps: list[tuple[int, int]] = []
    for i, step in enumerate(value):
        if not isinstance(step, (list, tuple)) or len(step) != 2:
            raise ValueError(f"step {i} must be [first_round, size], got {step!r}")
        first = count(step[0], f"step {i}'s first round")
        if i == 0 and first != 0:
            raise ValueError(f"the first step starts at round 0, got {first}")
        if steps and first <= steps[-1][0]:
            raise ValueError(f"step {i}'s first round {first} is not after step {i - 1}'s ({steps[-1][0]})")
        steps.append((first, size(step[1], f"step {i}'s size")))
    return steps[0][1] if len(steps) == 1 else steps


def evaluations_for_images(schedule: BucketSchedule, popsize: int, images: int) -> int:
    """The fewest evaluations whose images reach ``images``, for rounds of ``popsize`` candidates
    and ``schedule`` giving each round's images per candidate (the last one may pass the budget)."""
    evaluations, spent, round_index = 0, 0, 0
    while spent < images:
        per_candidate = schedule.size(round_index)
        take = min(popsize, -(-(images - spent) // per_candidate))
        evaluations += take
        spent += take * per_candidate
        round_index += 1
    return max(evaluations, 1)
