"""The monitoring backends are optional extras: a missing one is a config error, said before the run."""
from __future__ import annotations

import importlib.util

from calibri.core.errors import ConfigError


def require(module: str, extra: str, field: str) -> None:
    """Raise a one-line :class:`ConfigError` on ``field`` when ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(field, f"needs the {module} package, which is not installed "
                                 f"(pip install 'calibri[{extra}]')")
