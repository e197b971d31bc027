"""calibri's core: spaces, the objective/optimiser/executor contracts, plugins, config, the run loop.

Import the public names from here::

    from calibri.core import Space, Float, Objective, RoundContext, Optimizer, hookimpl
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .errors import CalibriError, ConfigError, PluginError, RunDirError, RunFailed, UserError
from .hookspecs import hookimpl
from .objective import EvalResult, FunctionObjective, Objective, RoundContext
from .optimizer import Optimizer, OptimizerSettings, default_popsize
from .space import Categorical, Float, Int, Space

try:
    __version__ = version("calibri")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "CalibriError", "Categorical", "ConfigError", "EvalResult", "Float", "FunctionObjective", "Int",
    "Objective", "Optimizer", "OptimizerSettings", "PluginError", "RoundContext", "RunDirError", "RunFailed",
    "Space", "UserError", "__version__", "default_popsize", "hookimpl",
]
