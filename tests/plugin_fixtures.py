"""A plugin implementing every calibri hook, for the plugin and hook tests.

Register it with ``add_plugin_modules("plugin_fixtures")`` (or ``plugins: [plugin_fixtures]`` in a
run config). Every name it registers starts with ``fixture.`` (but the command's, and the pipeline
family's, which is a class name); :data:`REGISTERED` lists them by kind. :data:`EVENTS` records what its callback, executor and stream saw, so tests can check the
run loop called them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from calibri.plugins.dit.adapters import Adapter
from calibri.plugins.dit.family import Family
from calibri.plugins.dit.sites import Gate, GateRef
import numpy as np

from calibri.core.executor import Executor, ObjectiveInfo, ObjectiveRecipe, evaluate_batch
from calibri.core.hookspecs import hookimpl
from calibri.core.objective import EvalResult, Objective, RoundContext
from calibri.core.optimizer import Optimizer, OptimizerSettings
from calibri.core.space import Float, Params, Space

PLUGIN_NAME = "plugin_fixtures"

#: What each hook of this plugin registers, by registry kind.
REGISTERED: dict[str, list[str]] = {
    "optimizers": ["fixture.optimizer"],
    "objectives": ["fixture.objective"],
    "spaces": ["fixture.space"],
    "executors": ["fixture.executor"],
    "rewards": ["fixture.reward"],
    "architectures": ["fixture.architecture"],
    "callbacks": ["fixture.callback"],
    "prompt_sources": ["fixture.prompts"],
    "pipeline_families": ["FixturePipeline"],
    "commands": ["fixture-hello"],
}

#: ``(source, what)`` pairs appended by the callback, the executor and the data stream.
EVENTS: list[tuple[str, Any]] = []


def squared_norm(params: Params) -> float:
    """A plain function for the built-in ``python`` objective."""
    return float(sum(float(v) ** 2 for v in params.values()))


# -- spaces ------------------------------------------------------------------------------------
def fixture_space(dim: int = 2, half_width: float = 1.0) -> Space:
    """``dim`` floats ``x[i]`` on ``[-half_width, half_width]``, starting at ``half_width / 2``."""
    return Space(Float(f"x[{i}]", -half_width, half_width, init=half_width / 2) for i in range(dim))


# -- optimisers --------------------------------------------------------------------------------
class FixtureOptimizer(Optimizer):
    """Uniform samples in the search box, x0 first; recommends the best point told."""

    def __init__(self, space: Space, settings: OptimizerSettings, *, shrink: float = 1.0) -> None:
        super().__init__(space, settings)
        self._rng = np.random.Generator(np.random.PCG64(settings.seed))
        lows, highs = space.search_bounds()
        centre = space.search_x0()
        self._lows = centre + shrink * (lows - centre)
        self._highs = centre + shrink * (highs - centre)
        self._x0_pending = True
        self._best: tuple[float, Params] | None = None

    def ask(self, n: int) -> list[Params]:
        out: list[Params] = []
        if self._x0_pending and n > 0:
            out.append(self.space.init_params())
            self._x0_pending = False
        while len(out) < n:
            out.append(self.space.from_search(self._rng.uniform(self._lows, self._highs)))
        return out

    def tell(self, candidates: Sequence[Params], losses: Sequence[float | None]) -> None:
        for params, loss in zip(candidates, losses):
            if loss is not None and (self._best is None or loss < self._best[0]):
                self._best = (float(loss), dict(params))

    def recommend(self) -> Params:
        return dict(self._best[1]) if self._best else self.space.init_params()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state, "x0_pending": self._x0_pending, "best": self._best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._x0_pending = state["x0_pending"]
        self._best = state["best"]


# -- objectives --------------------------------------------------------------------------------
class FixtureObjective(Objective):
    """``sum(x**2) + offset``, where ``offset`` comes from the round's data stream."""

    direction = "minimize"

    def __init__(self, dim: int = 2, half_width: float = 1.0) -> None:
        self.space = fixture_space(dim, half_width)

    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        offset = float(ctx.data.get("offset", 0.0))
        return [EvalResult(value=float(sum(v * v for v in params.values())) + offset,
                           metrics={"round": float(ctx.round)}) for params in candidates]


class FixtureStream:
    """The objective's per-round data: ``{"offset": 0.0, "round": i}``; counts its rounds."""

    def __init__(self, seed: int, dim: int = 2, half_width: float = 1.0) -> None:
        self.seed = seed
        self.served = 0

    def next_round(self, round_index: int) -> dict[str, Any]:
        self.served += 1
        EVENTS.append(("stream", round_index))
        return {"offset": 0.0, "round": round_index}

    def state_dict(self) -> dict[str, Any]:
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.served = state["served"]


def fixture_objective_space(dim: int = 2, half_width: float = 1.0) -> Space:
    return fixture_space(dim, half_width)


def fixture_objective_stream(seed: int, dim: int = 2, half_width: float = 1.0) -> FixtureStream:
    return FixtureStream(seed, dim, half_width)


# -- executors ---------------------------------------------------------------------------------
class FixtureExecutor(Executor):
    """In-process executor that records the size of every round it evaluates."""

    def __init__(self, recipe: ObjectiveRecipe, *, workers: int = 1, devices: list[str] | None = None,
                 tag: str = "fixture") -> None:
        self.tag = tag
        self.objective = recipe.build(devices[0] if devices else None)

    def describe(self) -> ObjectiveInfo:
        return ObjectiveInfo(self.objective.direction, self.objective.space)

    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        EVENTS.append(("executor", (self.tag, len(candidates))))
        return evaluate_batch(self.objective, candidates, ctx)

    def close(self) -> None:
        self.objective.close()


# -- rewards and architectures -----------------------------------------------------------------
class FixtureReward:
    """Scores every image by its mean pixel value in [0, 1]."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def __call__(self, images: Sequence[Any], prompts: Sequence[str]) -> list[float]:
        return [float(np.asarray(image, dtype=np.float64).mean() / 255.0) for image in images]


class FixtureArchitecture(Adapter):
    """An adapter for a fixture model class whose blocks are ``model.blocks``, each with one gate."""

    name = "fixture.architecture"
    model_classes = ("FixtureModel",)

    def gates(self, model: Any) -> list[Gate]:
        return [Gate("block", i, None, None, GateRef(f"blocks.{i}", None, 0, 1, f"blocks.{i}", 0, 1))
                for i, _ in enumerate(model.blocks)]


# -- callbacks ---------------------------------------------------------------------------------
class FixtureCallback:
    """Records every callback event in :data:`EVENTS`."""

    def __init__(self, label: str = "fixture") -> None:
        self.label = label

    def on_run_start(self, info: Any) -> None:
        EVENTS.append(("callback", ("start", self.label, info.start_round)))

    def on_round_end(self, record: Any) -> None:
        EVENTS.append(("callback", ("round", self.label, record.round)))

    def on_run_end(self, summary: dict[str, Any]) -> None:
        EVENTS.append(("callback", ("end", self.label, summary["rounds"])))


# -- prompt sources ----------------------------------------------------------------------------
def fixture_prompt_source(rest: str, field: str) -> Any:
    """``fixture.prompts:N``: N prompts ``fixture prompt i``, each with metadata ``{"index": i}``."""
    from calibri.plugins.dit.prompts import PromptSet

    if not rest.isdigit():
        raise ValueError(f"expected a count, got {rest!r}")
    count = int(rest)
    return PromptSet(tuple(f"fixture prompt {i}" for i in range(count)), tuple({"index": i} for i in range(count)),
                     f"fixture.prompts:{rest}")


# -- pipeline families -------------------------------------------------------------------------
class FixturePipeline:
    """A stand-in pipeline class (its family is found by its name, and its subclasses' by their MRO)."""


def fixture_encode(pipe: Any, prompt: str, device: Any) -> dict[str, Any]:
    """One embedding row per character of the prompt, each holding the prompt's length."""
    import torch

    return {"prompt_embeds": torch.full((1, len(prompt), 2), float(len(prompt)))}


FIXTURE_FAMILY = Family(fixture_encode, "fixture_guidance", {"prompt_embeds": "negative_prompt_embeds"},
                        default_negative="none")


# -- commands ----------------------------------------------------------------------------------
@click.command("fixture-hello")
@click.argument("name", default="world")
def fixture_hello(name: str) -> None:
    """Say hello from the fixture plugin."""
    click.echo(f"hello {name} from {PLUGIN_NAME}")


# -- the hooks ---------------------------------------------------------------------------------
@hookimpl
def calibri_register_optimizers(register):
    register("fixture.optimizer", FixtureOptimizer, kinds=("float", "int"))


@hookimpl
def calibri_register_objectives(register):
    register("fixture.objective", FixtureObjective, space=fixture_objective_space,
             stream=fixture_objective_stream)


@hookimpl
def calibri_register_spaces(register):
    register("fixture.space", fixture_space)


@hookimpl
def calibri_register_executors(register):
    register("fixture.executor", FixtureExecutor)


@hookimpl
def calibri_register_rewards(register):
    register("fixture.reward", FixtureReward)


@hookimpl
def calibri_register_architectures(register):
    register("fixture.architecture", FixtureArchitecture, description="toy adapter")


@hookimpl
def calibri_register_callbacks(register):
    register("fixture.callback", FixtureCallback)


@hookimpl
def calibri_register_prompt_sources(register):
    register("fixture.prompts", fixture_prompt_source)


@hookimpl
def calibri_register_pipeline_families(register):
    register("FixturePipeline", FIXTURE_FAMILY, description="fixture family")


@hookimpl
def calibri_register_commands(register):
    register(fixture_hello)
