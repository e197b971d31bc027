"""optuna's CMA-ES sampler on a search space fixed up front.

optuna infers the relative search space from completed trials, so the whole first generation of
its CMA-ES is sampled independently (uniformly), ignoring x0 and σ. A run knows its space from the
start; this subclass states it. (A module of its own so pickled samplers load by import path.)
"""
from __future__ import annotations

from typing import Any

from optuna.samplers import CmaEsSampler


class FixedSpaceCmaEsSampler(CmaEsSampler):
    def __init__(self, search_space: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fixed_search_space = {name: dist for name, dist in search_space.items() if not dist.single()}

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return dict(self._fixed_search_space)
