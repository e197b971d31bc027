"""The ``mlflow`` callback: a run's config as MLflow params, its per-round values as metrics
(the same as TensorBoard's, see :mod:`.follow`) and its result files as artefacts.

By default it tracks into a SQLite store inside the run directory (``RUN_DIR/mlflow/mlflow.db``,
artefacts under ``RUN_DIR/mlflow/artifacts``), which works offline and without a server; browse
it with ``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow/mlflow.db``. The MLflow run's id
is kept in ``RUN_DIR/monitoring/mlflow.json``: a resumed run continues the same MLflow run, from
the step after the last one logged (a tag, ``calibri.last_step``, written with each step's metrics).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from calibri.core.callbacks import RoundRecord, RunInfo
from calibri.core.errors import ConfigError

from .extras import require
from .follow import RunFollower, split_params
from .state import read_state, write_state

FIELD = "callbacks.mlflow.options"
STATE = "mlflow"
LAST_STEP_TAG = "calibri.last_step"
#: The run's result files, logged as artefacts when they exist at the end of the run.
ARTIFACTS = ("config.yaml", "best.json", "calibration.json", "report.md", "evaluation.md", "evaluation.csv",
             "reward_vs_nfe.png", "reward_curve.png", "grid.png", "convergence.png")
BATCH = 100  # MLflow's limit of params/tags per log_batch call


def check_options(tracking_uri: str | None = None, experiment: str | None = None,
                  run_name: str | None = None) -> None:
    require("mlflow", "mlflow", "callbacks.mlflow")
    for name, value in (("tracking_uri", tracking_uri), ("experiment", experiment), ("run_name", run_name)):
        if value is not None and not value.strip():
            raise ConfigError(f"{FIELD}.{name}", "must not be empty (leave it out for the default)")


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config values as ``{"a.b.c": "value"}`` (lists as JSON), for MLflow params."""
    if isinstance(data, dict) and data:
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    text = data if isinstance(data, str) else json.dumps(data)
    return {re.sub(r"[^A-Za-z0-9_\-. :/]", "_", prefix) or "config": text}  # MLflow's allowed name characters


@contextlib.contextmanager
def _hushed() -> Iterator[None]:
    """MLflow's and its database migrations' start-up chatter off (creating a store prints
    INFO lines and, with SQLAlchemy 2.1, a deprecation warning the user can do nothing about)."""
    import mlflow  # noqa: F401 - it sets its loggers' levels when imported: first, so ours win

    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class MlflowLogger:
    """Run callback: tracks the run in MLflow (see the module docstring). List it after
    ``calibration_report`` and ``plot``: callbacks end in the order listed, and the artefacts it
    logs are the files that exist when it ends."""

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None,
                 run_name: str | None = None) -> None:
        check_options(tracking_uri, experiment, run_name)
        self.tracking_uri_option, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self._client: Any = None
        self._run_id = ""
        self._run_dir = Path()
        self._follower: RunFollower | None = None
        self._last = -1

    # -- the callback contract ------------------------------------------------------------------
    def on_run_start(self, info: RunInfo) -> None:
        from calibri.core.config import read_yaml

        self._run_dir = Path(info.run_dir)
        config = read_yaml(self._run_dir / "config.yaml")
        uri = self.tracking_uri_option or os.environ.get("MLFLOW_TRACKING_URI") or self._local_uri()
        with _hushed():
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=uri)
            state = read_state(self._run_dir, STATE) if info.resumed else {}
            run = self._continued(state, uri)
            if run is None:
                run = self._new_run(config)
                write_state(self._run_dir, STATE, {"tracking_uri": uri, "experiment_id": run.info.experiment_id,
                                                   "run_id": run.info.run_id})
            else:
                self._client.update_run(run.info.run_id, status="RUNNING")
            self._run_id = run.info.run_id
            self._last = min(int(run.data.tags.get(LAST_STEP_TAG, -1)), info.start_round)
            self._log_params(config, run.data.params)
        self._follower = RunFollower(info.run_dir, info.direction)
        self._log_steps(info.start_round if info.start_round > 0 else -1, None)  # see the tensorboard callback

    def on_round_end(self, record: RoundRecord) -> None:
        if self._client is not None:
            self._log_steps(record.round + 1, record.elapsed)

    def on_run_end(self, summary: Any) -> None:
        self._finish("FINISHED")

    def on_run_interrupted(self, summary: Any) -> None:
        self._finish("KILLED")

    def on_run_failed(self, error: BaseException) -> None:
        self._finish("FAILED")

    # -- the MLflow run ---------------------------------------------------------------------------
    def _local_uri(self) -> str:
        folder = (self._run_dir / "mlflow").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'mlflow.db'}"

    def _continued(self, state: dict[str, Any], uri: str) -> Any:
        """The MLflow run a resumed run continues, or None (none recorded, another store, deleted)."""
        if state.get("tracking_uri") != uri or not state.get("run_id"):
            return None
        try:
            run = self._client.get_run(state["run_id"])
        except Exception:  # noqa: BLE001 - deleted or not in this store: start another
            return None
        return None if run.info.lifecycle_stage == "deleted" else run

    def _new_run(self, config: dict[str, Any]) -> Any:
        name = self.experiment or config.get("name") or "calibri"
        found = self._client.get_experiment_by_name(name)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            # artefacts next to a local store, not in the working directory (MLflow's default)
            location = ((self._run_dir / "mlflow" / "artifacts").resolve().as_uri()
                        if self.tracking_uri_option is None and "MLFLOW_TRACKING_URI" not in os.environ else None)
            experiment_id = self._client.create_experiment(name, artifact_location=location)
        return self._client.create_run(experiment_id, run_name=self.run_name or self._run_dir.name,
                                       tags={"calibri.run_dir": str(self._run_dir.resolve())})

    def _log_params(self, config: dict[str, Any], logged: dict[str, str]) -> None:
        """The flattened config; on resume only new keys (MLflow params cannot change): a changed
        value (a raised budget) is recorded as a ``changed.<key>`` tag."""
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        params, tags = [], []
        for key, value in flatten(config).items():
            value = value[:MAX_PARAM_VAL_LENGTH]
            if key not in logged:
                params.append(Param(key, value))
            elif logged[key] != value:
                tags.append(RunTag(f"changed.{key}", value))
        for start in range(0, max(len(params), len(tags)), BATCH):
            self._client.log_batch(self._run_id, params=params[start:start + BATCH], tags=tags[start:start + BATCH])

    def _log_steps(self, upto: int, elapsed: float | None) -> None:
        from mlflow.entities import Metric, RunTag

        assert self._follower is not None
        now = int(time.time() * 1000)
        for step in self._follower.steps(upto):
            if step.step <= self._last:
                continue
            metrics = [Metric(key, value, now, step.step) for key, value in step.scalars.items()]
            if step.best_params:
                _, omegas = split_params(step.best_params)
                metrics += [Metric(f"omega_best/{name}", value, now, step.step) for name, value in omegas.items()]
            if elapsed is not None and step.step == upto:
                metrics.append(Metric("train/elapsed_seconds", elapsed, now, step.step))
            self._client.log_batch(self._run_id, metrics=metrics, tags=[RunTag(LAST_STEP_TAG, str(step.step))])
            self._last = step.step

    def _finish(self, status: str) -> None:
        if self._client is None:
            return
        try:
            with _hushed():
                for name in ARTIFACTS:
                    path = self._run_dir / name
                    if path.is_file():
                        self._client.log_artifact(self._run_id, str(path))
                self._client.set_terminated(self._run_id, status=status)
        finally:
            self._client = None
