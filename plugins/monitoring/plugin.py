"""Registers the monitoring callbacks with calibri (their packages are optional extras: a
missing one is reported when the config is validated, through the ``check`` extra)."""
from __future__ import annotations

from calibri.core.hookspecs import hookimpl


@hookimpl
def calibri_register_callbacks(register):
    from .mlflow_callback import MlflowLogger
    from .mlflow_callback import check_options as check_mlflow
    from .tensorboard_callback import TensorBoardLogger
    from .tensorboard_callback import check_options as check_tensorboard

    register("tensorboard", TensorBoardLogger, check=check_tensorboard,
             description="TensorBoard curves, validation, histograms and image grids (extra: tensorboard)")
    register("mlflow", MlflowLogger, check=check_mlflow,
             description="MLflow params, per-round metrics and result artefacts (extra: mlflow)")
