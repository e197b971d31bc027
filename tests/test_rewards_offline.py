"""The weight-free rewards of ``calibri.rewards.offline``: known answers on synthetic images, every
accepted input form, batch-size invariance, determinism, bad inputs and a few properties."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("PIL")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402
from PIL import Image  # noqa: E402

from calibri.core.plugins import get_registry, reset_registry  # noqa: E402
from calibri.rewards.base import Reward  # noqa: E402
from calibri.rewards.offline import (  # noqa: E402
    COLOR_PROTOTYPES, OFFLINE_REWARDS, Brightness, ColorMatch, Colorfulness, Contrast, Entropy, JpegCompressibility,
    Sharpness, TotalVariation, colors_in,
)

NAMES = list(OFFLINE_REWARDS)
PROMPT = "a red apple on a blue plate"


# -- synthetic images (uint8, H×W×3) -------------------------------------------------------------------
def flat(value: int = 128, size: int = 16) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def checkerboard(size: int = 32, cell: int = 1) -> np.ndarray:
    yy, xx = np.indices((size, size))
    board = ((yy // cell + xx // cell) % 2 * 255).astype(np.uint8)
    return np.repeat(board[..., None], 3, axis=-1)


def box_blur(image: np.ndarray, radius: int = 2) -> np.ndarray:
    padded = np.pad(image.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    k = 2 * radius + 1
    out = sum(padded[dy:dy + image.shape[0], dx:dx + image.shape[1]] for dy in range(k) for dx in range(k)) / k ** 2
    return np.rint(out).astype(np.uint8)


def noise(size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def natural_batch(n: int = 5, size: int = 24, seed: int = 1) -> np.ndarray:
    """Smooth colour gradients plus mild noise: varied, non-trivial scores."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        channels = [np.sin(2 * np.pi * (rng.uniform(0.2, 2) * xx + rng.uniform(0.2, 2) * yy + rng.uniform()))
                    for _ in range(3)]
        image = 127.5 + 100 * np.stack(channels, -1) + rng.normal(0, 10, (size, size, 3))
        images.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return np.stack(images)


def solid(rgb: tuple[int, int, int], size: int = 8) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (size, size, 3)).copy()


def score(name: str, images, prompts=None, **options) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if prompts is None:
        prompts = [PROMPT] * len(images)
    return OFFLINE_REWARDS[name](**options)(images, prompts)


# -- registration --------------------------------------------------------------------------------------
def test_every_offline_reward_is_registered_and_builds(monkeypatch):
    monkeypatch.setenv("CALIBRI_PLUGINS", "")
    reset_registry()
    try:
        registry = get_registry()
        for name, cls in OFFLINE_REWARDS.items():
            registration = registry.get("rewards", name)
            assert registration.factory is cls and registration.plugin == "calibri.rewards.offline"
            assert registration.description, name
            reward = registration.factory()
            assert isinstance(reward, Reward) and reward.needs == "cpu"
        assert registry.get("rewards", "combined").plugin == "calibri.rewards.offline"
    finally:
        reset_registry()


def test_directions_and_prompt_use():
    assert TotalVariation.higher_is_better is False
    assert all(cls.higher_is_better for name, cls in OFFLINE_REWARDS.items() if name != "total_variation")
    assert [name for name, cls in OFFLINE_REWARDS.items() if cls.uses_prompt] == ["color_match"]


# -- known answers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, 1, 77, 128, 254, 255])
@pytest.mark.parametrize("name", ["sharpness", "contrast", "entropy", "total_variation", "colorfulness"])
def test_a_flat_image_scores_exactly_zero(name, value):
    assert score(name, flat(value)).tolist() == [0.0]


def test_a_flat_float_image_scores_zero_too():
    image = np.full((1, 3, 9, 7), 0.3719, dtype=np.float32)
    for name in ("sharpness", "contrast", "entropy", "total_variation", "colorfulness"):
        assert OFFLINE_REWARDS[name]()(torch.from_numpy(image)).tolist() == [0.0], name


@pytest.mark.parametrize("cell", [1, 2, 4])
def test_a_checkerboard_is_sharper_and_less_smooth_than_its_blur(cell):
    board = checkerboard(32, cell)
    blurred = box_blur(board)
    sharp, soft = score("sharpness", np.stack([board, blurred]))
    assert sharp > 4 * soft > 0
    tv_board, tv_blur = score("total_variation", np.stack([board, blurred]))
    assert tv_board > tv_blur > 0  # lower is smoother


def test_one_pixel_checkerboard_known_values():
    board = checkerboard(32, 1)
    assert score("sharpness", board).tolist() == [1020.0 ** 2]  # the Laplacian is ±4·255 everywhere
    assert score("total_variation", board).tolist() == [2.0]
    assert score("contrast", board).tolist() == [0.5]
    assert score("entropy", board).tolist() == [1.0]
    assert score("brightness", board) == pytest.approx([0.5])


def test_contrast_and_entropy_known_values():
    levels = np.repeat(np.array([0, 85, 170, 255], dtype=np.uint8), 16).reshape(8, 8)
    image = np.repeat(levels[..., None], 3, axis=-1)
    assert score("entropy", image) == pytest.approx([2.0], abs=1e-12)  # four equally frequent levels
    expected = np.std(np.array([0, 85, 170, 255]) / 255)
    assert score("contrast", image) == pytest.approx([expected], rel=1e-6)  # canonical images are float32


def test_sharpness_matches_the_laplacian_variance_recipe():
    image = natural_batch(1, 20)[0]
    luma = (image.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
    padded = np.pad(luma, 1, mode="reflect")  # numpy's "reflect" mirrors without the edge: BORDER_REFLECT_101
    laplacian = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:] - 4 * luma)
    assert score("sharpness", image) == pytest.approx([laplacian.var()], rel=1e-9)


def test_colorfulness_matches_the_hasler_susstrunk_formula():
    image = natural_batch(1, 20, seed=4)[0]
    r, g, b = (image.astype(np.float64)[..., c] for c in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    expected = math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())
    assert score("colorfulness", image) == pytest.approx([expected], rel=1e-6)  # canonical images are float32


def test_a_saturated_colourful_image_beats_a_grey_one():
    colourful = np.concatenate([solid(c, 8) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]], 1)
    grey = np.full_like(colourful, 128)
    washed_out = ((colourful.astype(np.uint16) + 3 * 128) // 4).astype(np.uint8)  # a quarter of the saturation
    values = score("colorfulness", np.stack([colourful, washed_out, grey]))
    assert values[0] > 109 > values[1] > values[2] == 0.0  # 109: "extremely colourful" in the paper


def test_noise_is_less_jpeg_compressible_than_a_flat_image():
    values = score("jpeg_compressibility", np.stack([flat(128, 64), noise(64)]))
    assert values[1] < values[0] < 0


def test_jpeg_compressibility_is_minus_the_pil_jpeg_size_in_kb_over_500():
    image = natural_batch(1, 40)[0]
    for quality in (95, 50):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        expected = -(len(buffer.getvalue()) / 1000) / 500
        assert score("jpeg_compressibility", image, quality=quality).tolist() == [expected]
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=0)


def test_jpeg_rounds_float_images_like_flow_grpo():
    image = natural_batch(1, 16)[0]
    as_float = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    nudged = (as_float + 0.4 / 255).clamp(0, 1)  # rounds back to the same 8-bit image (almost everywhere)
    rounded = (nudged * 255).round().clamp(0, 255).to(torch.uint8)
    reward = JpegCompressibility()
    assert reward(nudged).tolist() == reward(rounded).tolist()


def test_brightness_known_values():
    assert score("brightness", np.stack([flat(255), flat(0)])).tolist() == [1.0, 0.0]


# -- colour match ---------------------------------------------------------------------------------------
def test_colors_in_parses_whole_colour_words():
    assert colors_in("A Red apple and a GRAY cat, red again") == ["red", "grey"]
    assert colors_in("redundant bluebird, a credit card") == []
    assert colors_in("violet and magenta and purple") == ["purple"]
    assert colors_in("") == []


@pytest.mark.parametrize("family", sorted(COLOR_PROTOTYPES))
def test_every_prototype_is_classified_into_its_own_family(family):
    reward = ColorMatch()
    images = np.stack([solid(rgb, 4) for rgb in COLOR_PROTOTYPES[family]])
    assert reward(images, [f"something {family}"] * len(images)).tolist() == [1.0] * len(images)


def test_color_match_prefers_the_right_colour():
    red, blue, green = solid((230, 20, 25), 16), solid((20, 40, 230), 16), solid((20, 200, 40), 16)
    half = np.concatenate([red[:, :8], blue[:, 8:]], axis=1)
    reward = ColorMatch()
    images = np.stack([red, blue, green, half, half, half])
    prompts = ["a red car", "a red car", "a red car", "a red car", "red and blue", "a green car"]
    assert reward(images, prompts).tolist() == [1.0, 0.0, 0.0, 0.5, 1.0, 0.0]
    assert reward(np.stack([blue, red]), ["a blue sky", "a blue sky"]).tolist() == [1.0, 0.0]


def test_color_match_without_a_colour_word_scores_the_fallback():
    images = np.stack([solid((255, 0, 0)), solid((255, 0, 0))])
    assert ColorMatch()(images, ["a cat", "a red cat"]).tolist() == [0.0, 1.0]
    assert ColorMatch(no_color_score=0.25)(images, ["a cat", "a red cat"]).tolist() == [0.25, 1.0]
    with pytest.raises(ValueError, match="size"):
        ColorMatch(size=-1)


def test_color_match_downsamples_large_images_and_size_zero_keeps_them():
    rng = np.random.default_rng(3)
    image = np.where(rng.random((100, 70, 1)) < 0.3, np.uint8([255, 0, 0]), np.uint8([0, 0, 255])).astype(np.uint8)
    full = ColorMatch(size=0)(image[None], ["red"])[0]
    assert full == pytest.approx((image[..., 2] == 0).mean())
    assert ColorMatch(size=16).families(torch.from_numpy(image).permute(2, 0, 1)[None] / 255).shape == (1, 16, 11)
    assert 0.0 <= ColorMatch(size=16)(image[None], ["red"])[0] <= 1.0


# -- input forms ----------------------------------------------------------------------------------------
def _forms(batch: np.ndarray) -> dict[str, object]:
    tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
    return {
        "pil": [Image.fromarray(image) for image in batch],
        "uint8 array": batch,
        "list of arrays": list(batch),
        "float32 array": batch.astype(np.float32) / 255,
        "float64 array": batch.astype(np.float32).astype(np.float64) / 255,
        "uint8 tensor": tensor,
        "uint8 tensor NHWC": torch.from_numpy(batch),
        "float tensor": tensor.float() / 255,
        "float64 tensor": tensor.double() / 255,
        "float tensor requiring grad": (tensor.float() / 255).requires_grad_(),
    }


@pytest.mark.parametrize("name", NAMES)
def test_every_input_form_gives_identical_scores(name):
    batch = natural_batch(3, 20)
    batch[0, :6, :6] = [255, 10, 10]
    reward = OFFLINE_REWARDS[name]()
    prompts = ["a red thing", "a blue thing", "a grey thing"]
    expected = reward(batch, prompts)
    for form, images in _forms(batch).items():
        np.testing.assert_array_equal(reward(images, prompts), expected, err_msg=form)
    single = reward(batch[1], prompts[1:2])  # one H×W×3 image
    np.testing.assert_array_equal(single, expected[1:2])


@pytest.mark.parametrize("name", NAMES)
def test_grayscale_inputs_score_as_their_rgb_version(name):
    grey = natural_batch(2, 18)[..., 1]
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    reward = OFFLINE_REWARDS[name]()
    prompts = ["a grey wall", "a black cat"]
    expected = reward(rgb, prompts)
    forms = {
        "PIL L": [Image.fromarray(image, mode="L") for image in grey],
        "N×H×W×1 array": grey[..., None],
        "list of H×W arrays": list(grey),
        "N×1×H×W tensor": torch.from_numpy(grey)[:, None],
        "N×1×H×W float tensor": torch.from_numpy(grey)[:, None].float() / 255,
    }
    for form, images in forms.items():
        np.testing.assert_array_equal(reward(images, prompts), expected, err_msg=form)


# -- batching and determinism ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_scores_do_not_depend_on_batch_size_or_batch_mates(name):
    batch = np.concatenate([natural_batch(5, 24), checkerboard(24, 3)[None], noise(24)[None], flat(9, 24)[None]])
    prompts = ["red", "blue sky", "a green field", "white", "black cat", "grey", "pink", "orange"]
    reference = OFFLINE_REWARDS[name](batch_size=len(batch))(batch, prompts)
    for batch_size in (1, 2, 3, 5, 16):
        np.testing.assert_array_equal(OFFLINE_REWARDS[name](batch_size=batch_size)(batch, prompts), reference)
    alone = np.concatenate([OFFLINE_REWARDS[name]()(batch[i:i + 1], prompts[i:i + 1]) for i in range(len(batch))])
    np.testing.assert_array_equal(alone, reference)
    reversed_scores = OFFLINE_REWARDS[name]()(batch[::-1].copy(), prompts[::-1])
    np.testing.assert_array_equal(reversed_scores[::-1], reference)


def test_batch_independence_holds_at_a_realistic_resolution():
    batch = natural_batch(3, 160, seed=11)
    prompts = ["red", "a blue bird", "green"]
    for name in NAMES:
        reference = OFFLINE_REWARDS[name](batch_size=3)(batch, prompts)
        np.testing.assert_array_equal(OFFLINE_REWARDS[name](batch_size=1)(batch, prompts), reference, err_msg=name)


def test_color_match_downsampling_is_batch_independent():
    rng = np.random.default_rng(5)
    batch = rng.integers(0, 256, (5, 90, 77, 3), dtype=np.uint8)
    prompts = ["red", "blue", "green", "grey", "brown"]
    reference = ColorMatch(batch_size=5)(batch, prompts)
    np.testing.assert_array_equal(ColorMatch(batch_size=1)(batch, prompts), reference)
    np.testing.assert_array_equal(ColorMatch(batch_size=2)(batch[::-1].copy(), prompts[::-1])[::-1], reference)


@pytest.mark.parametrize("name", NAMES)
def test_scores_are_deterministic_float64(name):
    batch = natural_batch(3, 20, seed=9)
    first = OFFLINE_REWARDS[name]()(batch, ["red"] * 3)
    second = OFFLINE_REWARDS[name]()(batch.copy(), ["red"] * 3)
    assert first.dtype == np.float64 and first.shape == (3,)
    np.testing.assert_array_equal(first, second)
    assert np.isfinite(first).all()


# -- bad input ------------------------------------------------------------------------------------------
BAD_INPUTS = {
    "NaN": lambda: np.full((1, 4, 4, 3), np.nan, dtype=np.float32),
    "infinity": lambda: torch.full((1, 3, 4, 4), float("inf")),
    "float above 1": lambda: np.full((1, 4, 4, 3), 1.5, dtype=np.float32),
    "float below 0": lambda: torch.full((1, 3, 4, 4), -0.1),
    "uint8-range floats": lambda: np.full((1, 4, 4, 3), 200.0),
    "2-D array": lambda: np.zeros((4, 4), dtype=np.uint8),
    "two channels": lambda: np.zeros((2, 4, 4, 2), dtype=np.uint8),
    "4 channels": lambda: np.zeros((1, 4, 4, 4), dtype=np.uint8),
    "5-D tensor": lambda: torch.zeros((1, 1, 3, 4, 4)),
    "two-channel tensor": lambda: torch.zeros((2, 2, 8, 8)),
    "int64 array": lambda: np.zeros((1, 4, 4, 3), dtype=np.int64),
    "empty list": lambda: [],
    "empty batch": lambda: torch.zeros((0, 3, 4, 4)),
    "a string": lambda: "image.png",
    "mismatched sizes": lambda: [np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)],
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_images_raise_value_error(name, case):
    with pytest.raises(ValueError):
        OFFLINE_REWARDS[name]()(BAD_INPUTS[case](), None)


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_prompts_or_metadata_raise_value_error(name):
    batch = natural_batch(3, 8)
    reward = OFFLINE_REWARDS[name]()
    with pytest.raises(ValueError, match="3 images"):
        reward(batch, ["a", "b"])
    with pytest.raises(ValueError, match="3 images"):
        reward(batch, ["a", "b", "c"], [{}])
    with pytest.raises(ValueError):
        OFFLINE_REWARDS[name](batch_size=0)


def test_score_rejects_a_non_canonical_batch():
    with pytest.raises(ValueError, match="N×3×H×W"):
        Sharpness().score(torch.zeros(2, 4, 4, 3), ["", ""], [{}, {}])


# -- properties -----------------------------------------------------------------------------------------
batches = hnp.arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9), st.just(3)))
colour_prompts = st.sampled_from(["a red cat", "blue and green", "no colour here", "a gray dog", "white"])
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(batch=batches, data=st.data())
def test_property_scores_are_finite_and_within_their_documented_range(batch, data):
    n, h, w, _ = batch.shape
    prompts = data.draw(st.lists(colour_prompts, min_size=n, max_size=n))
    values = {name: OFFLINE_REWARDS[name]()(batch, prompts) for name in NAMES}
    for name, scores in values.items():
        assert scores.shape == (n,) and np.isfinite(scores).all(), name
    assert (values["sharpness"] >= 0).all() and (values["sharpness"] <= 1020.0 ** 2 * (1 + 1e-12)).all()
    assert (values["colorfulness"] >= 0).all()
    assert (values["contrast"] >= 0).all() and (values["contrast"] <= 0.5 + 1e-12).all()
    assert (values["entropy"] >= 0).all() and (values["entropy"] <= min(8.0, math.log2(h * w)) + 1e-9).all()
    assert (values["jpeg_compressibility"] < 0).all()
    assert (values["total_variation"] >= 0).all() and (values["total_variation"] <= 2 + 1e-12).all()
    for name in ("brightness", "color_match"):
        assert ((values[name] >= 0) & (values[name] <= 1)).all(), name


@PROPERTY_SETTINGS
@given(batch=batches, batch_size=st.integers(1, 5))
def test_property_batch_size_never_changes_a_score(batch, batch_size):
    prompts = ["a red and white thing"] * len(batch)
    for name in NAMES:
        whole = OFFLINE_REWARDS[name](batch_size=16)(batch, prompts)
        np.testing.assert_array_equal(OFFLINE_REWARDS[name](batch_size=batch_size)(batch, prompts), whole)


@PROPERTY_SETTINGS
@given(batch=batches)
def test_property_geometric_symmetries(batch):
    """Flips and transposition keep every global statistic; shuffling pixels keeps the entropy."""
    transformed = {
        "flip up-down": batch[:, ::-1], "flip left-right": batch[:, :, ::-1], "transpose": batch.transpose(0, 2, 1, 3),
    }
    for name in ("sharpness", "colorfulness", "contrast", "entropy", "total_variation", "brightness"):
        reference = OFFLINE_REWARDS[name]()(batch)
        for what, images in transformed.items():
            np.testing.assert_allclose(OFFLINE_REWARDS[name]()(np.ascontiguousarray(images)), reference,
                                       rtol=1e-9, atol=1e-9, err_msg=f"{name}, {what}")
    shuffled = np.stack([np.random.default_rng(0).permutation(image.reshape(-1, 3)).reshape(image.shape)
                         for image in batch])
    np.testing.assert_array_equal(Entropy()(shuffled), Entropy()(batch))


@PROPERTY_SETTINGS
@given(batch=batches, offset=st.integers(0, 40))
def test_property_brightening_keeps_contrast_sharpness_and_tv_when_nothing_clips(batch, offset):
    batch = (batch // 2).astype(np.uint8)  # values ≤ 127: adding ≤ 40 never clips
    brighter = batch + np.uint8(offset)
    for name in ("contrast", "sharpness", "total_variation"):
        # The rewards compute in float32 (canonical images): an offset changes the rounding of the
        # sums they reduce over, so equal means equal to float32 precision (seen: 1.01e-6 relative).
        np.testing.assert_allclose(OFFLINE_REWARDS[name]()(brighter), OFFLINE_REWARDS[name]()(batch),
                                   rtol=1e-5, atol=1e-9, err_msg=name)
    assert (Brightness()(brighter) >= Brightness()(batch) - 1e-12).all()


@PROPERTY_SETTINGS
@given(batch=batches)
def test_property_grey_images_have_zero_colourfulness(batch):
    grey = np.repeat(batch[..., :1], 3, axis=-1)
    assert Colorfulness()(grey).tolist() == [0.0] * len(batch)


def test_contrast_scales_linearly_with_the_signal():
    base = np.random.default_rng(2).random((2, 3, 10, 10)).astype(np.float32) * 0.5
    np.testing.assert_allclose(Contrast()(torch.from_numpy(base * 2)), 2 * Contrast()(torch.from_numpy(base)),
                               rtol=1e-6)
