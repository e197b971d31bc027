"""``calibri.rewards.combine``: the weighted sum, standardisation against a baseline, its state,
per-reward details, and building rewards from config specs."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("PIL")
import yaml  # noqa: E402

from calibri.core import hookimpl  # noqa: E402
from calibri.core.errors import ConfigError, PluginError  # noqa: E402
from calibri.core.plugins import Registry, build_manager, get_registry, reset_registry  # noqa: E402
from calibri.rewards.base import Reward  # noqa: E402
from calibri.rewards.combine import CombinedReward, build_reward, combined  # noqa: E402
from calibri.rewards.offline import Brightness, Contrast, Sharpness, TotalVariation  # noqa: E402


# -- test rewards -----------------------------------------------------------------------------------------
class Pixel(Reward):
    """``scale`` × (the image's top-left red value) + ``offset``: any distribution we like."""

    def __init__(self, scale: float = 1.0, offset: float = 0.0, batch_size: int = 16, device: str = "cpu",
                 lower_is_better: bool = False) -> None:
        super().__init__(batch_size=batch_size, device=device)
        self.scale, self.offset = scale, offset
        if lower_is_better:
            self.higher_is_better = False

    def score(self, images, prompts, metadata):
        return self.scale * images[:, 0, 0, 0].double().numpy() + self.offset


class Channel(Reward):
    """``scale`` × the image's top-left value in one channel."""

    def __init__(self, channel: int = 0, scale: float = 1.0) -> None:
        super().__init__()
        self.channel, self.scale = channel, scale

    def score(self, images, prompts, metadata):
        return self.scale * images[:, self.channel, 0, 0].double().numpy()


class PromptLength(Reward):
    uses_prompt = True
    needs = "cuda"

    def score(self, images, prompts, metadata):
        return [float(len(p)) for p in prompts]


def pixels(values) -> torch.Tensor:
    """A batch of 2×2 images whose red channel is ``values`` (in [0, 1]), green and blue 0.5."""
    values = torch.as_tensor(values, dtype=torch.float32)
    images = torch.full((len(values), 3, 2, 2), 0.5)
    images[:, 0] = values[:, None, None]
    return images


def natural(n: int = 6, size: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        image = 127.5 + 100 * np.stack([np.sin(2 * np.pi * (rng.uniform(0.2, 3) * xx + rng.uniform(0.2, 3) * yy))
                                        for _ in range(3)], -1) + rng.normal(0, rng.uniform(1, 30), (size, size, 3))
        out.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return np.stack(out)


# -- sum mode ------------------------------------------------------------------------------------------------
def test_sum_mode_is_the_hand_computed_weighted_sum_with_lower_is_better_negated():
    images = natural()
    parts = {"sharpness": Sharpness(), "contrast": Contrast(), "total_variation": TotalVariation()}
    weights = {"sharpness": 0.001, "contrast": 2.0, "total_variation": 3.0}
    reward = CombinedReward(parts, weights)
    total, details = reward.score_with_details(images)
    raw = {label: part(images) for label, part in parts.items()}
    expected = 0.001 * raw["sharpness"] + 2.0 * raw["contrast"] - 3.0 * raw["total_variation"]
    np.testing.assert_allclose(total, expected, rtol=1e-12)
    assert list(details) == list(parts)
    for label in parts:
        np.testing.assert_array_equal(details[label], raw[label])  # raw: not negated, not standardised
    np.testing.assert_array_equal(reward(images), total)
    assert reward.higher_is_better is True and total.dtype == np.float64


def test_sum_mode_with_higher_is_better_parts_matches_flow_grpo_multi_score():
    images = pixels([0.1, 0.4, 0.9])
    reward = CombinedReward({"a": Pixel(scale=2.0), "b": Pixel(scale=-1.0, offset=3.0)}, {"a": 1.0, "b": 0.2})
    r = np.array([0.1, 0.4, 0.9], dtype=np.float32).astype(np.float64)
    avg = 1.0 * (2.0 * r) + 0.2 * (-1.0 * r + 3.0)
    np.testing.assert_allclose(reward(images), avg, rtol=1e-12)


def test_missing_weights_default_to_one_and_zero_weight_only_reports():
    images = pixels([0.2, 0.7])
    reward = CombinedReward({"a": Pixel(), "b": Pixel(scale=100.0)}, {"b": 0.0})
    total, details = reward.score_with_details(images)
    np.testing.assert_array_equal(total, details["a"])
    np.testing.assert_allclose(details["b"], 100 * details["a"])
    assert reward.weights == {"a": 1.0, "b": 0.0}


def test_components_batch_independently_of_each_other():
    images = natural(7)
    small = CombinedReward({"s": Sharpness(batch_size=1), "c": Contrast(batch_size=3)})
    large = CombinedReward({"s": Sharpness(batch_size=16), "c": Contrast(batch_size=16)})
    np.testing.assert_array_equal(small(images), large(images))


def test_prompt_use_needs_and_prompt_checks_propagate():
    reward = CombinedReward({"b": Brightness(), "p": PromptLength()})
    assert reward.uses_prompt is True and reward.needs == "cuda"
    assert CombinedReward({"b": Brightness()}).uses_prompt is False
    total, details = reward.score_with_details(pixels([0.0, 1.0]), ["ab", "abcd"])
    assert details["p"].tolist() == [2.0, 4.0]
    with pytest.raises(ValueError, match="2 images"):
        reward(pixels([0.0, 1.0]), ["only one"])
    with pytest.raises(ValueError, match="single string"):
        reward(pixels([0.0, 1.0]), "ab")
    with pytest.raises(ValueError):
        reward(np.full((1, 4, 4, 3), np.nan, dtype=np.float32))


def test_constructor_errors():
    with pytest.raises(ValueError):
        CombinedReward({})
    with pytest.raises(TypeError, match="not a calibri Reward"):
        CombinedReward({"x": lambda images, prompts: [0.0]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="unknown components"):
        CombinedReward({"a": Pixel()}, {"b": 1.0})
    with pytest.raises(ValueError, match="finite"):
        CombinedReward({"a": Pixel()}, {"a": float("nan")})
    with pytest.raises(ValueError, match="number"):
        CombinedReward({"a": Pixel()}, {"a": True})
    with pytest.raises(ValueError, match="mode"):
        CombinedReward({"a": Pixel()}, mode="mean")
    assert CombinedReward({"a": Pixel()}, mode="standardised").mode == "standardized"


# -- standardized mode ------------------------------------------------------------------------------------
def test_standardized_mode_makes_scales_10_and_1_contribute_equally():
    rng = np.random.default_rng(0)
    baseline = torch.from_numpy(rng.random((400, 3, 1, 1)).astype(np.float32))
    fresh = torch.from_numpy(rng.random((400, 3, 1, 1)).astype(np.float32))
    parts = {"big": Channel(0, scale=10.0), "small": Channel(1, scale=1.0)}

    raw_sum = CombinedReward(parts)
    terms = raw_sum.contributions(raw_sum.score_with_details(fresh)[1])
    assert np.var(terms["big"]) / np.var(terms["small"]) > 50  # the raw sum: the big scale dominates

    reward = CombinedReward(parts, mode="standardized")
    stats = reward.calibrate(baseline)
    assert stats["big"]["std"] == pytest.approx(10 * stats["small"]["std"], rel=0.15)
    terms = reward.contributions(reward.score_with_details(baseline)[1])
    for term in terms.values():  # on the baseline itself: exactly mean 0, std 1
        assert np.mean(term) == pytest.approx(0.0, abs=1e-9) and np.std(term) == pytest.approx(1.0, rel=1e-9)
    terms = reward.contributions(reward.score_with_details(fresh)[1])
    ratio = np.var(terms["big"]) / np.var(terms["small"])
    assert 0.7 < ratio < 1.4  # comparable on new images from the same distribution
    assert abs(np.mean(terms["big"])) < 0.2 and abs(np.mean(terms["small"])) < 0.2


def test_standardized_total_is_the_weighted_sum_of_z_scores():
    images = pixels([0.1, 0.3, 0.5, 0.9])
    reward = CombinedReward({"up": Pixel(scale=4.0), "down": Pixel(scale=2.0, lower_is_better=True)},
                            {"up": 2.0, "down": 0.5}, mode="standardized",
                            baseline={"up": {"mean": 1.0, "std": 0.5}, "down": (0.2, 4.0)})
    total, details = reward.score_with_details(images)
    expected = 2.0 * (details["up"] - 1.0) / 0.5 - 0.5 * (details["down"] - 0.2) / 4.0
    np.testing.assert_allclose(total, expected, rtol=1e-12)
    assert reward.baseline_source == "explicit"
    assert reward.baseline == {"up": {"mean": 1.0, "std": 0.5}, "down": {"mean": 0.2, "std": 4.0}}


def test_the_first_call_calibrates_and_then_the_baseline_is_frozen():
    reward = CombinedReward({"a": Pixel(scale=10.0), "b": Pixel()}, mode="standardized")
    assert reward.baseline is None
    first = pixels([0.0, 0.5, 1.0])
    total = reward(first)
    assert reward.baseline_source == "first call"
    frozen = reward.baseline
    assert frozen["a"]["mean"] == pytest.approx(5.0) and frozen["b"]["std"] == pytest.approx(np.std([0, 0.5, 1]))
    np.testing.assert_allclose(total, 2 * (np.array([0.0, 0.5, 1.0]) - 0.5) / np.std([0, 0.5, 1]), rtol=1e-6)
    reward(pixels([0.9, 0.95]))
    assert reward.baseline == frozen  # not re-estimated
    np.testing.assert_array_equal(reward(first), total)


def test_without_auto_calibration_a_baseline_is_required():
    reward = CombinedReward({"a": Pixel()}, mode="standardized", auto_calibrate=False)
    with pytest.raises(RuntimeError, match="baseline"):
        reward(pixels([0.1, 0.2]))
    reward.calibrate(pixels([0.1, 0.2, 0.3]))
    assert reward.baseline_source == "calibrate"
    assert reward(pixels([0.2])).tolist() == pytest.approx([0.0], abs=1e-6)


def test_calibration_edge_cases():
    reward = CombinedReward({"a": Pixel(), "flat": Pixel(scale=0.0, offset=3.0)}, mode="standardized")
    with pytest.raises(ValueError, match="at least 2"):
        reward.calibrate(pixels([0.5]))
    with pytest.warns(RuntimeWarning, match="constant"):
        stats = reward.calibrate(pixels([0.2, 0.4]))
    assert stats["flat"] == {"mean": 3.0, "std": 1.0}  # only centred
    for bad in ({"a": (0.0, 1.0)}, {"a": (0.0, 1.0), "flat": (0.0, 0.0)}, {"a": (0.0, 1.0), "flat": {"mean": 1}},
                {"a": (0.0, 1.0), "flat": (0.0, 1.0), "other": (0.0, 1.0)}, {"a": "x", "flat": (0, 1)}):
        with pytest.raises(ValueError):
            reward.set_baseline(bad)


def test_sum_mode_ignores_a_baseline():
    images = pixels([0.1, 0.8])
    reward = CombinedReward({"a": Pixel()}, baseline={"a": (5.0, 2.0)})
    np.testing.assert_allclose(reward(images), reward.score_with_details(images)[1]["a"])


# -- state -----------------------------------------------------------------------------------------------------
def test_state_round_trip_through_json_scores_identically():
    baseline, later = natural(5, seed=1), natural(4, seed=2)
    parts = lambda: {"sharp": Sharpness(), "tv": TotalVariation(), "contrast": Contrast()}  # noqa: E731
    weights = {"sharp": 1.0, "tv": 0.5, "contrast": 2.0}
    original = CombinedReward(parts(), weights, mode="standardized")
    original(baseline)  # first call: calibrates
    state = json.loads(json.dumps(original.state_dict()))
    assert state["baseline_source"] == "first call" and set(state["baseline"]) == set(weights)
    assert state["higher_is_better"] == {"sharp": True, "tv": False, "contrast": True}

    resumed = CombinedReward(parts(), weights, mode="standardized")
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(resumed(later), original(later))
    assert resumed.baseline == original.baseline and resumed.baseline_source == "first call"
    # without the state, the resumed reward would calibrate on `later` and score differently
    assert not np.array_equal(CombinedReward(parts(), weights, mode="standardized")(later), original(later))


def test_load_state_refuses_a_different_combination():
    reward = CombinedReward({"a": Pixel(), "b": Pixel()}, mode="standardized", baseline={"a": (0, 1), "b": (0, 1)})
    state = reward.state_dict()
    for other in (CombinedReward({"a": Pixel(), "b": Pixel()}, {"a": 2.0}, mode="standardized"),
                  CombinedReward({"a": Pixel(), "b": Pixel()}, mode="sum"),
                  CombinedReward({"a": Pixel(), "c": Pixel()}, mode="standardized"),
                  CombinedReward({"a": Pixel(), "b": Pixel(lower_is_better=True)}, mode="standardized")):
        with pytest.raises(ValueError, match="differs"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="state"):
        reward.load_state_dict({"format": "something else"})


def test_an_unset_baseline_round_trips_as_unset():
    reward = CombinedReward({"a": Pixel()}, mode="standardized")
    other = CombinedReward({"a": Pixel()}, mode="standardized", baseline={"a": (1.0, 2.0)})
    other.load_state_dict(reward.state_dict())
    assert other.baseline is None and other.baseline_source is None


def test_nested_combinations_keep_their_inner_baselines():
    def build():
        inner = CombinedReward({"x": Pixel(scale=10.0), "y": Pixel()}, mode="standardized")
        return CombinedReward({"inner": inner, "c": Pixel(scale=3.0)}, mode="standardized")

    outer = build()
    outer(pixels([0.1, 0.5, 0.6]))
    state = json.loads(json.dumps(outer.state_dict()))
    assert state["components"]["inner"]["baseline_source"] == "first call"
    resumed = build()
    resumed.load_state_dict(state)
    later = pixels([0.3, 0.99])
    np.testing.assert_array_equal(resumed(later), outer(later))


# -- build_reward -------------------------------------------------------------------------------------------
@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setenv("CALIBRI_PLUGINS", "")
    reset_registry()
    yield get_registry()
    reset_registry()


def test_build_single_rewards(registry):
    assert isinstance(build_reward("sharpness", registry), Sharpness)
    built = build_reward({"name": "jpeg_compressibility", "options": {"quality": 80, "batch_size": 4}}, registry)
    assert built.quality == 80 and built.batch_size == 4
    assert isinstance(build_reward({"name": "contrast"}), Contrast)  # the default registry


def test_build_combinations_from_yaml(registry):
    images = natural(3)
    specs = yaml.safe_load("""
flow_grpo_style: {sharpness: 0.001, contrast: 2.0}
listed:
  - {name: sharpness, weight: 0.001}
  - {name: contrast, weight: 2.0, options: {batch_size: 1}}
full:
  mode: sum
  components: {sharpness: 0.001, contrast: {weight: 2.0}}
""")
    expected = 0.001 * Sharpness()(images) + 2.0 * Contrast()(images)
    for key, spec in specs.items():
        reward = build_reward(spec, registry, field=f"rewards.{key}")
        assert isinstance(reward, CombinedReward) and reward.mode == "sum", key
        np.testing.assert_allclose(reward(images), expected, rtol=1e-12, err_msg=key)


def test_build_standardized_with_labels_and_baseline(registry):
    spec = yaml.safe_load("""
mode: standardized
components:
  - {name: jpeg_compressibility, label: jpeg95, weight: 1.0}
  - {name: jpeg_compressibility, label: jpeg50, weight: 0.5, options: {quality: 50}}
  - total_variation
baseline:
  jpeg95: {mean: -0.01, std: 0.002}
  jpeg50: [-0.005, 0.001]
  total_variation: {mean: 0.1, std: 0.05}
""")
    reward = build_reward(spec, registry)
    assert list(reward.rewards) == ["jpeg95", "jpeg50", "total_variation"]
    assert reward.rewards["jpeg50"].quality == 50 and reward.baseline_source == "explicit"
    total, details = reward.score_with_details(natural(2))
    assert set(details) == {"jpeg95", "jpeg50", "total_variation"} and np.isfinite(total).all()


def test_combined_is_registered_and_builds_from_its_options(registry):
    registration = registry.get("rewards", "combined")
    assert registration.factory is combined
    reward = registration.factory(components={"sharpness": 1.0, "colorfulness": 1.0}, mode="standardized")
    assert isinstance(reward, CombinedReward) and reward.mode == "standardized"
    via_name = build_reward({"name": "combined", "options": {"components": ["contrast", "entropy"]}}, registry)
    assert list(via_name.rewards) == ["contrast", "entropy"]
    nested = build_reward({"outer": {"name": "combined", "options": {"components": ["contrast"]}}, "entropy": 0.5},
                          registry)
    assert isinstance(nested.rewards["outer"], CombinedReward)


@pytest.mark.parametrize(("spec", "field", "message"), [
    ("nope", "reward", "unknown reward 'nope' (available: "),
    ("nope", "reward", "color_match, colorfulness, combined, contrast, entropy, "),
    ({"name": "nope"}, "reward.name", "unknown reward 'nope'"),
    ({"sharpness": 1.0, "nope": 2.0}, "reward.nope", "unknown reward 'nope'"),
    (["sharpness", {"name": "nope"}], "reward[1].name", "unknown reward 'nope'"),
    (["sharpness", "nope"], "reward[1]", "unknown reward 'nope'"),
    ({"components": {"x": {"name": "nope"}}}, "reward.components.x.name", "unknown reward 'nope'"),
    ({"name": "combined", "options": {"components": ["nope"]}}, "reward.options.components[0]", "unknown reward"),
    ({"name": "sharpness", "options": {"sigma": 1}}, "reward.options.sigma", "unknown option (known: batch_size, device)"),
    ({"name": "jpeg_compressibility", "options": {"quality": "high"}}, "reward.options.quality", "integer"),
    ({"name": "jpeg_compressibility", "options": {"quality": 500}}, "reward.options", "quality must lie in [1, 100]"),
    ({"name": "sharpness", "weight": 2}, "reward.weight", "unknown key"),
    ({"sharpness": "lots"}, "reward.sharpness", "weight"),
    ([{"name": "sharpness", "weight": None}], "reward[0].weight", "weight"),
    ({"sharpness": {"weight": 1, "sigma": 2}}, "reward.sharpness.sigma", "unknown key"),
    ([{"weight": 1.0}], "reward[0].name", "field required"),
    (["sharpness", "sharpness"], "reward[1]", "appears twice"),
    ([], "reward", "at least one"),
    ({"components": []}, "reward.components", "at least one"),
    ({"components": ["sharpness"], "mode": "average"}, "reward.mode", "sum, standardized"),
    ({"components": ["sharpness"], "auto_calibrate": "yes"}, "reward.auto_calibrate", "true or false"),
    ({"components": ["sharpness"], "baseline": {"sharpness": {"mean": 1.0, "std": -1}}}, "reward.baseline",
     "positive"),
    ({"components": ["sharpness"], "baseline": {"other": [0, 1]}}, "reward.baseline", "missing ['sharpness']"),
    ({"name": "combined", "options": {"mode": "sum"}}, "reward.options.components", "field required"),
    (3, "reward", "expected a reward name"),
    ({"name": ["sharpness"]}, "reward.name", "expected a reward name"),
])
def test_build_reward_errors_name_the_field(registry, spec, field, message):
    with pytest.raises(ConfigError) as info:
        build_reward(spec, registry)
    assert info.value.field == field
    assert message in info.value.message


def test_a_factory_that_is_not_a_reward_is_a_plugin_error():
    class Plugin:
        @staticmethod
        @hookimpl
        def calibri_register_rewards(register):
            register("mine.callable", lambda device="cpu": (lambda images, prompts: [0.0] * len(images)))

    manager = build_manager(load_entry_points=False)
    manager.register(Plugin, name="mine")
    with pytest.raises(PluginError, match="mine.callable.*not a calibri.rewards.base.Reward"):
        build_reward("mine.callable", Registry(manager))


def test_device_goes_to_factories_that_take_it():
    seen = []

    class Recording(Reward):
        def __init__(self, batch_size: int = 16, device: str = "cpu") -> None:
            super().__init__(batch_size=batch_size, device=device)
            seen.append(device)

        def score(self, images, prompts, metadata):
            return np.zeros(len(images))

    class NoDevice(Reward):
        def __init__(self) -> None:
            super().__init__()

        def score(self, images, prompts, metadata):
            return np.ones(len(images))

    class Plugin:
        @staticmethod
        @hookimpl
        def calibri_register_rewards(register):
            register("rec", Recording)
            register("plain", NoDevice)

    manager = build_manager(load_entry_points=False)
    manager.register(Plugin, name="devices")
    registry = Registry(manager)
    reward = build_reward(["rec", "plain", {"name": "rec", "label": "pinned", "options": {"device": "cpu"}}], registry,
                          device="cuda:1")
    assert seen == ["cuda:1", "cpu"]
    assert reward(pixels([0.5])).tolist() == [1.0]


def test_importing_the_reward_modules_imports_neither_torch_nor_pil():
    """They load with every plugin registry (CLI start-up included), so they must stay light."""
    code = ("import sys, calibri.rewards.offline, calibri.rewards.combine; "
            "print(sorted(m for m in ('torch', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
