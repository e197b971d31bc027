"""Small functions used by the example YAML runs (``python:`` objectives)."""
from __future__ import annotations

import math
from typing import Any


def mixed_objective(params: dict[str, Any]) -> float:
    """A toy loss over a mixed space; its minimum is at x=0.5, lr=1e-2, layers=3, activation=gelu."""
    penalty = {"relu": 0.3, "tanh": 0.6, "gelu": 0.0}[params["activation"]]
    return ((params["x"] - 0.5) ** 2 + (math.log10(params["lr"]) + 2.0) ** 2
            + 0.1 * (params["layers"] - 3) ** 2 + penalty)
