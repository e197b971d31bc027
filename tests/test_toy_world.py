"""The toy world: scenes and prompts, the oracle reward, the shipped prompt files."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from calibri.plugins.toy import data_files
from calibri.plugins.toy.oracle import TERMS, ToyOracle, score_terms
from calibri.plugins.toy.world import (
    BACKGROUND, all_scenes, parse_prompt, prompt_of, render, shape_mask, split_scenes,
)

SCENES = all_scenes()


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return np.stack([gaussian_filter(image[..., c], sigma) for c in range(3)], axis=-1)


def test_every_scene_has_a_prompt_that_parses_back():
    assert len(SCENES) == 320 and len(set(SCENES)) == 320
    for scene in SCENES:
        assert parse_prompt(prompt_of(scene)) == scene
    assert parse_prompt("A Large BLUE cross at the top.") == parse_prompt("a large blue cross at the top")


@pytest.mark.parametrize("prompt", ["a red circle on the left", "a small pink circle on the left",
                                    "a small red circle somewhere", "", "a small red hexagon in the center"])
def test_prompts_outside_the_world_are_rejected_by_name(prompt):
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        parse_prompt(prompt)


def test_shapes_cover_similar_areas_and_differ():
    areas = {s: shape_mask(s, 16, 16, 6).sum() for s in ("circle", "square", "triangle", "cross")}
    assert max(areas.values()) / min(areas.values()) < 1.5
    circle, square = shape_mask("circle", 16, 16, 6), shape_mask("square", 16, 16, 6)
    assert np.abs(circle - square).sum() > 10
    with pytest.raises(ValueError, match="unknown shape"):
        shape_mask("star", 16, 16, 6)


def test_ground_truth_renders_score_near_one():
    rng = np.random.default_rng(1)
    scores = [score_terms(render(scene, rng), scene)["reward"] for scene in SCENES for _ in range(2)]
    assert min(scores) > 0.97


@pytest.mark.parametrize("field, other, term", [("colour", "orange", "colour"), ("shape", "square", "shape"),
                                                ("position", "right", "position"), ("size", "large", "size")])
def test_each_wrong_property_is_caught_by_its_term(field, other, term):
    scene = parse_prompt("a small red circle on the left")
    image = render(scene, np.random.default_rng(0))
    wrong = dataclasses.replace(scene, **{field: other})
    terms = score_terms(image, wrong)
    assert terms[term] < 0.1
    assert terms["reward"] < 0.65
    assert score_terms(image, scene)["reward"] > 0.97


def test_noise_empty_and_blur_score_low_and_in_order():
    scene = parse_prompt("a large green triangle in the center")
    image = render(scene, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    assert score_terms(rng.uniform(0, 1, image.shape), scene)["reward"] < 0.05
    assert score_terms(np.broadcast_to(np.asarray(BACKGROUND), image.shape).copy(), scene)["reward"] == 0.0
    blurred = [score_terms(blur(image, s), scene)["reward"] for s in (0.0, 1.0, 1.5, 2.5)]
    assert blurred == sorted(blurred, reverse=True) and blurred[-1] < 0.8


def test_stray_paint_cannot_be_traded_for_shape():
    """The reward is a geometric mean: a perfect shape with dirt around it still loses."""
    scene = parse_prompt("a large cyan square at the top")
    image = render(scene, np.random.default_rng(0))
    dirty = image.copy()
    dirty[26:30, 2:6] = (0.9, 0.9, 0.9)
    terms = score_terms(dirty, scene)
    assert terms["clean"] < 0.6
    assert terms["reward"] < score_terms(image, scene)["reward"] - 0.1


def test_oracle_reward_reads_metadata_or_prompt_and_exposes_terms():
    from calibri.rewards.combine import build_reward

    reward = build_reward("toy_oracle")
    scenes = SCENES[:6]
    images = np.stack([render(s, np.random.default_rng(i)) for i, s in enumerate(scenes)])
    prompts = [prompt_of(s) for s in scenes]
    by_prompt = reward(images, prompts)
    by_meta = reward(images, [""] * 6, [s.as_metadata() for s in scenes])
    np.testing.assert_allclose(by_prompt, by_meta)
    assert by_prompt.min() > 0.97
    total, details = reward.score_with_details(images, prompts)
    np.testing.assert_allclose(total, by_prompt)
    assert set(details) == set(TERMS)
    clean_only = ToyOracle(term="clean")(images, prompts)
    np.testing.assert_allclose(clean_only, details["clean"])
    with pytest.raises(ValueError, match="unknown term"):
        ToyOracle(term="beauty")
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        reward(images[:1], ["a photo of a cat"])


def test_split_is_fixed_disjoint_and_matches_the_shipped_files():
    from calibri.plugins.dit.prompts import shipped_path

    calibration, validation = split_scenes()
    assert len(calibration) == 240 and len(validation) == 80
    assert not set(calibration) & set(validation)
    assert shipped_path("toy/calibration").read_text() == data_files.lines(calibration)
    assert shipped_path("toy/validation").read_text() == data_files.lines(validation)
    first = json.loads(shipped_path("toy/validation").read_text().splitlines()[0])
    assert parse_prompt(first["prompt"]).as_metadata() == {k: v for k, v in first.items() if k != "prompt"}
