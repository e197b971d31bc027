"""The ``flowgrpo`` reward: Flow-GRPO's names and scales, its weighted sum, a user's reward module."""
from __future__ import annotations

import io
import json
import sys
import textwrap

import numpy as np
import pytest
import torch

from calibri.core.errors import ConfigError
from calibri.plugins.dit.objective import score_images
from calibri.plugins.flow_grpo.ocr import OCRReward, levenshtein, ocr_score, quoted_text
from calibri.plugins.flow_grpo.rewards import FlowGRPOReward
from calibri.rewards.combine import build_reward

FIELD = "objective.options.reward"


def flowgrpo(**options):
    return build_reward({"name": "flowgrpo", "options": options}, field=FIELD)


def images(n: int = 3, size: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    batch = torch.rand(n, 3, size, size, generator=generator)
    batch[0] = 0.5  # a flat image compresses far better than noise
    return batch


def pil_jpeg_kb(batch: torch.Tensor) -> np.ndarray:
    """PIL's own JPEG size at quality 95, of each image made 8-bit as Flow-GRPO does."""
    from PIL import Image

    sizes = []
    for image in batch:
        pixels = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        sizes.append(len(buffer.getvalue()) / 1000)
    return np.asarray(sizes)


# -- an OCR engine for the tests: reads whatever the test says the image shows -------------------------
READS: list[str] = []


def fake_engine(image: np.ndarray) -> str:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    return READS.pop(0)


@pytest.fixture
def reads():
    READS.clear()
    yield READS
    READS.clear()


# -- scales ------------------------------------------------------------------------------------------------
def test_jpeg_compressibility_is_minus_pil_jpeg_kilobytes_over_500():
    reward = flowgrpo(reward_fn={"jpeg_compressibility": 1.0})
    batch = images()
    total, details = reward.score_with_details(batch, ["a"] * 3)
    expected = -pil_jpeg_kb(batch) / 500
    np.testing.assert_allclose(total, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(details["jpeg_compressibility"], expected, rtol=0, atol=1e-12)
    assert total[0] > total[1]  # the flat image is the more compressible
    assert reward.higher_is_better


def test_ocr_is_one_minus_edit_distance_over_length(reads):
    assert quoted_text('a neon sign that says "Open Late" at night') == "Open Late"
    assert quoted_text('a "first" and a "second"') == "first" and quoted_text("no quotes") is None
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert ocr_score("OPEN LATE", "Open Late") == 1.0          # case and spaces do not count
    assert ocr_score("we are open late today", "Open Late") == 1.0  # the text appears in what is read
    assert ocr_score("OPEN LADE", "Open Late") == pytest.approx(1 - 1 / 8)
    assert ocr_score("", "Open Late") == 0.0 and ocr_score("x" * 40, "Open Late") == 0.0  # capped: never below 0
    reward = OCRReward(ocr_engine=f"{__name__}:fake_engine")
    reads.extend(["HELLO", "HELL0", "help"])
    scores = reward(images(), ['a sign "hello"', 'a sign "hello"', 'a sign "hello"'])
    np.testing.assert_allclose(scores, [1.0, 0.8, 0.6])


def test_ocr_needs_quoted_text_and_an_engine(reads, monkeypatch):
    reward = OCRReward(ocr_engine=lambda image: "x")
    with pytest.raises(ValueError, match="double quotes"):
        reward(images(1), ["a sign with no quotes"])
    monkeypatch.setitem(sys.modules, "paddleocr", None)  # whatever is installed: none here
    with pytest.raises(ConfigError) as caught:
        flowgrpo(reward_fn={"ocr": 1.0})
    assert caught.value.field == f"{FIELD}.options" and "no OCR engine" in caught.value.message
    with pytest.raises(ConfigError, match="ocr_engine: cannot import module 'no_such_ocr_module'"):
        flowgrpo(reward_fn={"ocr": 1.0}, ocr_engine="no_such_ocr_module:read")


def test_the_total_is_the_weighted_sum_and_every_component_is_logged(reads):
    reward = flowgrpo(reward_fn={"jpeg_compressibility": 0.5, "ocr": 2.0}, ocr_engine=f"{__name__}:fake_engine")
    assert isinstance(reward, FlowGRPOReward) and reward.higher_is_better
    batch = images()
    reads.extend(["CAT", "CAR", "DOG"])
    total, details = score_images(reward, batch, ['"cat"'] * 3, [{}] * 3)
    jpeg = -pil_jpeg_kb(batch) / 500
    ocr = np.asarray([1.0, 2 / 3, 0.0])
    np.testing.assert_allclose(details["jpeg_compressibility"], jpeg, atol=1e-12)
    np.testing.assert_allclose(details["ocr"], ocr)
    np.testing.assert_allclose(total, 0.5 * jpeg + 2.0 * ocr, atol=1e-12)  # a SUM, not a mean


def test_a_calibration_logs_each_component_as_a_metric(toy_dir, tmp_path):
    from calibri.core.config import validate
    from calibri.core.run import start_run

    config = validate({
        "name": "flowgrpo-reward", "seed": 0, "callbacks": [],
        "objective": {"name": "calibri", "options": {
            "model": str(toy_dir), "granularity": "block", "steps": 2, "bucket_size": 2, "batch_size": 4,
            "reward": {"name": "flowgrpo", "options": {"reward_fn": {"jpeg_compressibility": 1.0, "clean": 0.0},
                                                        "module": "fake_flowgrpo_metrics"}}}},
        "optimizer": {"name": "random", "popsize": 2}, "budget": {"rounds": 1}})
    (tmp_path / "fake_flowgrpo_metrics.py").write_text(textwrap.dedent('''
        def jpeg_compressibility():
            def fn(images, prompts, metadata):
                return [-(float(image.mean()) + 1.0) for image in images], {}
            return fn

        def clean_score():
            def fn(images, prompts, metadata):
                return [0.25] * len(images), {}
            return fn
    '''), encoding="utf-8")
    sys.path.insert(0, str(tmp_path))
    try:
        summary = start_run(config, tmp_path / "run", quiet=True)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fake_flowgrpo_metrics", None)
    assert summary["direction"] == "maximize"
    trials = [json.loads(line) for line in (tmp_path / "run" / "trials.jsonl").read_text().splitlines()]
    for trial in trials:
        assert trial["metrics"]["reward.clean"] == 0.25
        assert trial["metrics"]["reward.jpeg_compressibility"] == pytest.approx(trial["value"])


# -- a user's own Flow-GRPO reward module -------------------------------------------------------------------
FAKE_MODULE = '''
import numpy as np
import torch

CALLS = []


def jpeg_compressibility():
    """No device: called with no argument, as Flow-GRPO's multi_score does."""
    CALLS.append(("jpeg_compressibility", None))

    def fn(images, prompts, metadata):
        assert isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == 3
        assert images.dtype == torch.float32 and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
        return np.full(len(images), -0.5), {}
    return fn


def pickscore_score(device):
    """Named like Flow-GRPO's function: found as {name}_score; takes the device."""
    CALLS.append(("pickscore", device))

    def fn(images, prompts, metadata):
        return torch.tensor([float(len(p)) for p in prompts]), {}
    return fn


def geneval_score(device):
    CALLS.append(("geneval", device))

    def fn(images, prompts, metadatas, only_strict):
        CALLS.append(("only_strict", only_strict))
        tags = [m["tag"] for m in metadatas]
        scores = [0.5 if tag == "counting" else 1.0 for tag in tags]
        group = {tag: [1.0 if t == tag else -10 for t in tags] for tag in sorted(set(tags))}
        return scores, [1.0] * len(tags), [0.0] * len(tags), group, group
    return fn


def my_aesthetic():
    CALLS.append(("aesthetic", None))

    def fn(images, prompts, metadata):
        return [7.0] * len(images), {}
    return fn


not_callable = 3
'''


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    package = tmp_path / "flow_grpo"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "rewards.py").write_text(FAKE_MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [name for name in sys.modules if name == "flow_grpo" or name.startswith("flow_grpo.")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [name for name in sys.modules if name == "flow_grpo" or name.startswith("flow_grpo.")]:
        del sys.modules[name]


def test_a_users_reward_module_supplies_the_functions(fake_module):
    reward = build_reward({"name": "flowgrpo", "options": {
        "module": "flow_grpo.rewards", "functions": {"aesthetic": "my_aesthetic"},
        "reward_fn": {"jpeg_compressibility": 1.0, "pickscore": 0.1, "geneval": 2.0, "aesthetic": 0.5}}},
        field=FIELD, device="cpu")
    module = sys.modules["flow_grpo.rewards"]
    assert module.CALLS == [("jpeg_compressibility", None), ("pickscore", "cpu"), ("geneval", "cpu"),
                            ("aesthetic", None)]
    prompts = ["a photo of two cats", "a photo of a bench", "a photo of a red car"]
    metadata = [{"tag": "counting", "prompt": prompts[0]}, {"tag": "single_object", "prompt": prompts[1]},
                {"tag": "colors", "prompt": prompts[2]}]
    total, details = reward.score_with_details(images(), prompts, metadata)
    assert module.CALLS[-1] == ("only_strict", True)
    pick = np.asarray([float(len(p)) for p in prompts])
    geneval = np.asarray([0.5, 1.0, 1.0])
    np.testing.assert_allclose(total, -0.5 + 0.1 * pick + 2.0 * geneval + 0.5 * 7.0)
    np.testing.assert_allclose(details["pickscore"], pick)
    np.testing.assert_allclose(details["geneval"], geneval)
    assert details["accuracy"].tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_array_equal(details["counting_accuracy"], [1.0, np.nan, np.nan])  # −10: not applicable
    np.testing.assert_array_equal(details["colors_strict_accuracy"], [np.nan, np.nan, 1.0])
    assert np.nanmean(details["counting_accuracy"]) == 1.0


def test_module_errors_name_the_option(fake_module):
    cases = [
        ({"module": "no_such_package.rewards", "reward_fn": {"pickscore": 1.0}}, f"{FIELD}.options.module",
         "cannot import module 'no_such_package.rewards'"),
        ({"module": "flow_grpo.rewards", "reward_fn": {"hpsv2": 1.0}}, f"{FIELD}.options.reward_fn",
         "has no reward factory for 'hpsv2' (looked for hpsv2, hpsv2_score"),
        ({"module": "flow_grpo.rewards", "reward_fn": {"x": 1.0}, "functions": {"x": "not_callable"}},
         f"{FIELD}.options.reward_fn", "looked for not_callable"),
        ({"module": "flow_grpo.rewards", "reward_fn": {"pickscore": 1.0}, "reward_options": {"pickscore": {}}},
         f"{FIELD}.options.reward_options", "do not apply with module"),
    ]
    for options, field, message in cases:
        with pytest.raises(ConfigError) as caught:
            flowgrpo(**options)
        assert caught.value.field == field and message in caught.value.message, str(caught.value)
        assert "\n" not in str(caught.value)


def test_the_module_is_imported_only_when_asked(fake_module):
    flowgrpo(reward_fn={"jpeg_compressibility": 1.0})
    assert "flow_grpo.rewards" not in sys.modules


@pytest.mark.parametrize(("options", "field", "message"), [
    ({"reward_fn": {"qwenvl": 1.0}}, "reward_fn", "'qwenvl' is not supported (calibri has no model for it; supported: "
                                                  "pickscore, clipscore"),
    ({"reward_fn": {"nonsense": 1.0}}, "reward_fn", "'nonsense' is not supported (unknown"),
    ({"reward_fn": {"pickscore": "high"}}, "reward_fn",
     "the weight of 'pickscore' must be a finite number, got 'high'"),
    ({"reward_fn": {"pickscore": float("nan")}}, "reward_fn", "must be a finite number, got nan"),
    ({"reward_fn": {"pickscore": True}}, "reward_fn", "must be a finite number, got True"),
    ({"reward_fn": {}}, "reward_fn", "needs at least one reward"),
    ({}, "reward_fn", "Field required"),
    ({"reward_fn": {"pickscore": 1.0}, "reward_options": {"ocr": {}}}, "reward_options", "'ocr' is not in reward_fn"),
    ({"reward_fn": {"pickscore": 1.0}, "reward_fn_typo": 1}, "reward_fn_typo", "unknown option"),
])
def test_bad_options_are_one_line_errors_naming_the_option(options, field, message):
    with pytest.raises(ConfigError) as caught:
        flowgrpo(**options)
    assert caught.value.field == f"{FIELD}.options.{field}"
    assert message in caught.value.message and "\n" not in str(caught.value)


def test_component_options_reach_calibris_rewards_and_their_errors_name_them():
    reward = flowgrpo(reward_fn={"jpeg_compressibility": 1.0}, reward_options={"jpeg_compressibility": {"quality": 50}})
    assert reward.rewards["jpeg_compressibility"].quality == 50
    with pytest.raises(ConfigError) as caught:
        flowgrpo(reward_fn={"jpeg_compressibility": 1.0}, reward_options={"jpeg_compressibility": {"qualty": 50}})
    assert "reward_options.jpeg_compressibility.options.qualty: unknown option" in caught.value.message
    with pytest.raises(ConfigError) as caught:
        flowgrpo(reward_fn={"geneval": 1.0})
    assert "allow_pickle" in caught.value.message and "\n" not in str(caught.value)


def test_a_components_mean_leaves_out_images_it_does_not_apply_to():
    """GenEval's −10 (another tag) reaches the objective as NaN and is left out of the component's
    mean, as Flow-GRPO's eval_reward_<name> does; a component that applies to no image is None."""
    from calibri.plugins.dit.objective import mean_applicable

    assert mean_applicable([1.0, float("nan"), 0.0]) == 0.5
    assert mean_applicable([float("nan")] * 3) is None
    assert mean_applicable(np.array([0.25, 0.75])) == 0.5
