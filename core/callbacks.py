"""Run callbacks: what a run reports as it goes. ``progress`` (a progress bar) is built in."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from .hookspecs import hookimpl


@dataclass(frozen=True)
class RunInfo:
    """Given to ``on_run_start``."""

    run_dir: str
    direction: str
    start_round: int
    total_rounds: int | None
    total_evaluations: int | None
    resumed: bool
    quiet: bool = False  # ``--quiet``: callbacks show no progress of their own (an end-of-run report's)


@dataclass(frozen=True)
class RoundRecord:
    """Given to ``on_round_end`` after the round's trials and checkpoint are on disk."""

    round: int
    evaluations: int
    failures: int
    round_best: float | None
    best: float | None
    elapsed: float
    validation: float | None = None  # the selected point's held-out value, in runs with validation


class ProgressBar:
    """A tqdm progress bar over rounds (or evaluations), showing the best value so far."""

    def __init__(self, leave: bool = True) -> None:
        self.leave = leave
        self._bar: Any = None
        self._by_evals = False

    def on_run_start(self, info: RunInfo) -> None:
        from tqdm.auto import tqdm

        self._by_evals = info.total_rounds is None and info.total_evaluations is not None
        total = info.total_evaluations if self._by_evals else info.total_rounds
        self._bar = tqdm(total=total, unit="eval" if self._by_evals else "round", leave=self.leave,
                         file=sys.stderr, dynamic_ncols=True, desc="calibri")
        self._position = 0

    def on_round_end(self, record: RoundRecord) -> None:
        if self._bar is None:
            return
        position = record.evaluations if self._by_evals else record.round + 1
        if self._position == 0:
            self._bar.n = position  # a resumed run starts part-way
            self._bar.refresh()
        else:
            self._bar.update(position - self._position)
        self._position = position
        if record.best is not None:
            extra = {"val": f"{record.validation:.4g}"} if record.validation is not None else {}
            self._bar.set_postfix(best=f"{record.best:.6g}", **extra, failed=record.failures, refresh=False)

    def on_run_end(self, summary: Any) -> None:
        if self._bar is not None:
            self._bar.close()

    on_run_interrupted = on_run_end

    def on_run_failed(self, error: BaseException) -> None:
        self.on_run_end(None)


@hookimpl
def calibri_register_callbacks(register):
    from .report import ConvergencePlot

    register("progress", ProgressBar)
    register("plot", ConvergencePlot)
