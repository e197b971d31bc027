"""The ``tensorboard`` callback: a run's curves, validation, parameter histograms and
before/after images as TensorBoard event files (written with tensorboardX; view them with
``tensorboard --logdir RUN_DIR/tensorboard``).

Steps are finished rounds (see :mod:`.follow`). A resumed run appends a new event file to the
same log directory, starting after the last step logged (``RUN_DIR/monitoring/tensorboard.json``),
and tells TensorBoard to drop anything an interrupted session wrote past it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from calibri.core.callbacks import RoundRecord, RunInfo
from calibri.core.errors import ConfigError

from .extras import require
from .follow import RunFollower, Step, split_params, validation_table
from .state import read_state, write_state

FIELD = "callbacks.tensorboard.options"
STATE = "tensorboard"


def check_options(log_dir: str | None = None, images: bool = True, image_prompts: int = 4,
                  image_device: str | None = None) -> None:
    """Cheap checks when the config is validated, so a mistake does not cost the run."""
    require("tensorboardX", "tensorboard", "callbacks.tensorboard")
    if log_dir is not None and Path(log_dir).exists() and not Path(log_dir).is_dir():
        raise ConfigError(f"{FIELD}.log_dir", f"{log_dir} exists and is not a folder")
    if image_prompts < 1:
        raise ConfigError(f"{FIELD}.image_prompts", f"must be at least 1, got {image_prompts}")
    if images and image_device is not None:
        from calibri.plugins.dit.models import check_device

        check_device(image_device, f"{FIELD}.image_device")


class TensorBoardLogger:
    """Run callback: logs each round to TensorBoard as it finishes (see the module docstring)."""

    def __init__(self, log_dir: str | None = None, images: bool = True, image_prompts: int = 4,
                 image_device: str | None = None) -> None:
        check_options(log_dir, images, image_prompts, image_device)
        self.log_dir_option, self.images, self.image_prompts = log_dir, images, image_prompts
        self.image_device = image_device
        self._writer: Any = None
        self._follower: RunFollower | None = None
        self._pictures: Any = None
        self._run_dir = ""
        self._log_dir = ""
        self._last = -1  # the last step logged
        self._last_picture = -1

    # -- the callback contract ------------------------------------------------------------------
    def on_run_start(self, info: RunInfo) -> None:
        from tensorboardX import SummaryWriter

        self._run_dir = info.run_dir
        self._log_dir = str(Path(self.log_dir_option or Path(info.run_dir) / "tensorboard").resolve())
        state = read_state(info.run_dir, STATE) if info.resumed else {}
        self._last = state.get("last_step", -1) if state.get("log_dir") == self._log_dir else -1
        self._last = min(self._last, info.start_round)  # a resume from an older checkpoint redoes rounds
        self._last_picture = state.get("last_picture", -1) if self._last >= 0 else -1
        # purge_step: TensorBoard hides whatever an earlier session logged at or after it
        self._writer = SummaryWriter(self._log_dir, purge_step=self._last + 1,
                                     filename_suffix=f".{time.time_ns()}")
        self._follower = RunFollower(info.run_dir, info.direction)
        if self.images:
            from .images import BeforeAfter, is_calibration_run

            if is_calibration_run(info.run_dir):
                self._pictures = BeforeAfter(info.run_dir, self.image_prompts, self.image_device)
        if self._last < 0:
            config = (Path(info.run_dir) / "config.yaml").read_text(encoding="utf-8")
            self._writer.add_text("run/config", "```yaml\n" + config + "\n```", 0)
        # rounds a resume has not logged yet; a fresh run's step 0 waits for the baseline's validation
        self._log_steps(info.start_round if info.start_round > 0 else -1, elapsed=None)

    def on_round_end(self, record: RoundRecord) -> None:
        if self._writer is not None:
            self._log_steps(record.round + 1, elapsed=record.elapsed)

    def on_run_end(self, summary: Any) -> None:
        if self._writer is None:
            return
        try:
            final = int(summary.get("rounds", self._last)) if isinstance(summary, dict) else self._last
            if self._pictures is not None and self._last_picture < final and final > 0:
                from calibri.plugins.dit.report import selected_values

                params, _ = selected_values(summary)  # no validation: the optimiser's recommendation
                self._picture(final, params)
                self._save_state()
        finally:
            self._close()

    def on_run_interrupted(self, summary: Any) -> None:
        self._close()

    def on_run_failed(self, error: BaseException) -> None:
        self._close()

    # -- logging ----------------------------------------------------------------------------------
    def _log_steps(self, upto: int, elapsed: float | None) -> None:
        assert self._follower is not None
        for step in self._follower.steps(upto):
            if step.step <= self._last:
                continue
            self._log(step)
            self._last = step.step
        if elapsed is not None and upto == self._last:
            self._writer.add_scalar("train/elapsed_seconds", elapsed, upto)
        self._writer.flush()
        self._save_state()

    def _log(self, step: Step) -> None:
        writer, n = self._writer, step.step
        for tag, value in step.scalars.items():
            writer.add_scalar(tag, value, n)
        if step.best_params:
            self._histograms("best", step.best_params, n)
        if step.validation:
            assert self._follower is not None
            writer.add_text("validation/table", validation_table(self._follower.validation_records), n)
            if step.selected is not None:
                self._histograms("selected", step.selected["params"], n)
                if n > 0:
                    self._picture(n, step.selected["params"])

    def _histograms(self, which: str, params: dict[str, Any], n: int) -> None:
        import numpy as np

        scales, omegas = split_params(params)
        if scales:
            self._writer.add_histogram(f"params/{which}", np.array(list(scales.values())), n)
        for name, value in omegas.items():
            self._writer.add_scalar(f"omega_{which}/{name}", value, n)

    def _picture(self, n: int, params: dict[str, Any]) -> None:
        if self._pictures is None:
            return
        figure = self._pictures.figure(params)
        if figure is not None:
            self._writer.add_figure("images/baseline_vs_selected", figure, n, close=True)
            self._last_picture = n

    def _save_state(self) -> None:
        write_state(self._run_dir, STATE, {"log_dir": self._log_dir, "last_step": self._last,
                                           "last_picture": self._last_picture})

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._pictures is not None:
            self._pictures.close()
            self._pictures = None
