"""The Calibri objective's direction follows its reward's: maximised when higher is better, else minimised.

One test per registered reward (those built offline and cheaply; rewards that need model weights
are skipped), a tiny toy run with a lower-is-better reward, and the direction of combinations.
"""
from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

from calibri.core.config import validate
from calibri.core.executor import ObjectiveRecipe
from calibri.core.executors import SerialExecutor
from calibri.core.options import validate_options
from calibri.core.plugins import get_registry
from calibri.core.run import start_run
from calibri.rewards.combine import CombinedReward, build_reward
from calibri.rewards.models import MODEL_REWARDS
from calibri.rewards.offline import Sharpness, TotalVariation

REWARDS = get_registry().names("rewards")

#: Rewards whose factory needs options to build (name → the reward spec used here) and, where it
#: does not follow from the reward's class, the direction that spec must give.
SPECS = {
    "combined": {"name": "combined", "options": {"components": {"total_variation": 1.0}}},
    "remote": None,  # built against an in-process server of total_variation, below
}
EXPECTED = {"total_variation": "minimize", "remote": "minimize", "combined": "minimize"}


@contextlib.contextmanager
def reward_spec(name: str):
    """The spec of the registered reward ``name``, with whatever it needs running meanwhile."""
    if name in MODEL_REWARDS:
        pytest.skip(f"{name!r} needs model weights")
    if name == "remote":
        from calibri.rewards.server import RewardServer

        server = RewardServer([TotalVariation()], "total_variation", port=0).start()
        try:
            yield {"name": "remote", "options": {"url": server.url, "timeout": 30.0}}
        finally:
            server.close(grace=2)
        return
    yield SPECS.get(name, name)


def describe(reward) -> str:
    """The direction of the Calibri objective (toy model) as the run loop sees it."""
    options = validate_options(get_registry().get("objectives", "calibri").factory,
                               {"model": "toy", "reward": reward, "steps": 1, "batch_size": 2},
                               "objective.options", reserved=("device",))
    executor = SerialExecutor(ObjectiveRecipe("calibri", options))
    try:
        return executor.describe().direction
    finally:
        executor.close()


@pytest.mark.parametrize("name", REWARDS)
def test_the_objective_direction_is_the_rewards_declaration(name):
    with reward_spec(name) as spec:
        try:
            reward = build_reward(spec, field="objective.options.reward")
        except Exception as exc:  # a reward of an installed plugin this test knows nothing of
            pytest.skip(f"{name!r} does not build offline without options: {type(exc).__name__}: {exc}")
        declared = "maximize" if reward.higher_is_better else "minimize"
        assert describe(spec) == declared
    factory = get_registry().get("rewards", name).factory
    if isinstance(getattr(factory, "higher_is_better", None), bool):  # a class declaring it
        assert declared == ("maximize" if factory.higher_is_better else "minimize")
    assert declared == EXPECTED.get(name, declared)


@pytest.mark.parametrize(("spec", "direction"), [
    (["total_variation"], "minimize"),
    ({"total_variation": 1.0, "sharpness": 0.001}, "maximize"),
    ({"mode": "standardized", "components": {"total_variation": 1.0},
      "baseline": {"total_variation": {"mean": 0.1, "std": 0.05}}}, "minimize"),
    (["sharpness", "colorfulness"], "maximize"),
])
def test_a_combinations_direction_is_its_components(spec, direction):
    assert describe(spec) == direction


def test_a_combination_of_lower_is_better_rewards_is_lower_is_better_and_scores_the_plain_sum():
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    tv, sharp = TotalVariation()(images), Sharpness()(images)
    only = CombinedReward({"a": TotalVariation(), "b": TotalVariation()}, {"a": 2.0, "b": 0.5})
    assert only.higher_is_better is False
    np.testing.assert_allclose(only(images), 2.5 * tv, rtol=1e-12)
    np.testing.assert_allclose(build_reward(["total_variation"])(images), TotalVariation()(images), rtol=0)
    mixed = CombinedReward({"tv": TotalVariation(), "sharp": Sharpness()}, {"sharp": 0.001})
    assert mixed.higher_is_better is True
    np.testing.assert_allclose(mixed(images), 0.001 * sharp - tv, rtol=1e-12)


def test_a_toy_run_with_a_lower_is_better_reward_minimises_it(tmp_path):
    options = {"model": "toy", "reward": "total_variation", "steps": 1, "bucket_size": 2, "batch_size": 2,
               "validation_prompts": ["a small red circle on the left", "a large blue square at the top"]}
    config = validate({"name": "tv", "seed": 1, "objective": {"name": "calibri", "options": options},
                       "optimizer": {"name": "pycma", "popsize": 3}, "budget": {"rounds": 2},
                       "validation": {"every": 1}, "callbacks": []})
    summary = start_run(config, tmp_path / "run", quiet=True)
    trials = [json.loads(line) for line in (tmp_path / "run" / "trials.jsonl").read_text().splitlines()]
    values = [t["value"] for t in trials if t["status"] == "ok"]
    assert len(values) == 6 and len(set(values)) > 1
    assert summary["direction"] == "minimize"
    assert summary["best"]["value"] == min(values)
    validation = [json.loads(line)["value"] for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert summary["validation"]["selected"]["value"] == min(validation)
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["direction"] == "minimize" and best["best"]["value"] == min(values)
