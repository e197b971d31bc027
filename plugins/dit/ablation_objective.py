"""The ``calibri`` objective with every image's reward kept, for paired comparisons.

``calibri ablate`` compares each cell with the identity image by image (same prompt, same seed),
so it needs the per-image rewards the ``calibri`` objective averages away. This module registers
``calibri_per_image``: the same objective built from the same options, whose result also carries
``artifacts["rewards"]`` (one reward per image, in prompt order; with several step counts, each
image's mean over them). Images and scores come from the objective's own building blocks
(:meth:`CalibriObjective.images`, :func:`score_images`), as the report's evaluation does.

Executors build objectives from a recipe (name + options + plugin modules), so a study reaches
this objective in every worker, local or remote, through :func:`per_image_recipe`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from calibri.core.executor import ObjectiveRecipe
from calibri.core.hookspecs import hookimpl
from calibri.core.objective import EvalResult, Objective, RoundContext
from calibri.core.space import Params

NAME = "calibri_per_image"
MODULE = __name__


class PerImageObjective(Objective):
    """Wraps a built ``calibri`` objective: its value, plus each image's reward."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.direction = inner.direction
        self.space = inner.space

    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        prompts = list(ctx.data.get("prompts") or [])
        if not prompts:
            raise ValueError("the round carries no prompts (ctx.data['prompts'])")
        metadata = list(ctx.data.get("metadata") or [{} for _ in prompts])
        return [self.score(params, prompts, metadata, ctx.seed) for params in candidates]

    def score(self, params: Params | None, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]],
              seed: int) -> EvalResult:
        """Image ``j`` of ``prompts`` at every configured step count; its reward averaged over them."""
        from .objective import score_images

        per_nfe = []
        for steps in self.inner.step_counts:
            images = self.inner.images(params, prompts, seed, steps)
            per_nfe.append(score_images(self.inner.reward, images, prompts, metadata)[0])
        rewards = per_nfe[0] if len(per_nfe) == 1 else np.mean(per_nfe, axis=0)
        return EvalResult(value=float(rewards.mean()), artifacts={"rewards": [float(r) for r in rewards]})

    def close(self) -> None:
        self.inner.close()


def per_image_objective(device: str | None = None, **options: Any) -> PerImageObjective:
    """The ``calibri`` objective of these (validated) options, keeping per-image rewards."""
    from .objective import calibri_objective

    return PerImageObjective(calibri_objective(device=device, **options))


def per_image_recipe(recipe: ObjectiveRecipe) -> ObjectiveRecipe:
    """The recipe of a ``calibri`` run turned into one that builds :class:`PerImageObjective`."""
    return ObjectiveRecipe(NAME, dict(recipe.options), tuple(dict.fromkeys((*recipe.plugin_modules, MODULE))))


@hookimpl
def calibri_register_objectives(register):
    register(NAME, per_image_objective)
