"""Timestep-dependent calibration: one scale set (and ω) per interval of the noise level."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from calibri.plugins.dit import tiny
from calibri.plugins.dit.calibration import Calibrator
from calibri.plugins.dit.calibration_file import apply_calibration, save_calibration

G = 4.0


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny.tiny_sd3_pipeline(0)


def _images(pipe, steps=4):
    return pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                height=32, width=32, guidance_scale=G, output_type="np").images


def _random_values(calibrator, seed):
    rng = np.random.default_rng(seed)
    names = calibrator.parameter_names(with_omega=False)
    return dict(zip(names, rng.uniform(0.5, 1.5, len(names)).tolist()))


def test_names_count_space_and_identity(sd3_pipe):
    cal = Calibrator(sd3_pipe.transformer, "layer", copies=2, form="cfg", guidance_scale=G, time_buckets=3)
    n = len(cal.sites)
    names = cal.parameter_names()
    assert len(names) == 3 * 2 * n + 3 * 2 and cal.count() == len(names)
    assert names[0] == f"t0.c0.{cal.site_names[0]}" and names[-1] == "t2.omega.1"
    space = cal.space()
    assert [d.init for d in space if d.group == "omega"] == [G, 1 - G] * 3
    stock = _images(sd3_pipe)
    cal.attach()
    try:
        np.testing.assert_allclose(_images(sd3_pipe), stock, atol=1e-6)
    finally:
        cal.detach()


def test_equal_buckets_equal_a_constant_calibration(sd3_pipe):
    single = Calibrator(sd3_pipe.transformer, "layer", time_buckets=1).attach()
    values = _random_values(single, 1)
    single.set_values(values)
    constant = _images(sd3_pipe)
    single.detach()
    split = Calibrator(sd3_pipe.transformer, "layer", time_buckets=2).attach()
    try:
        split.set_values({f"t{b}.{k}": v for b in range(2) for k, v in values.items()})
        np.testing.assert_allclose(_images(sd3_pipe), constant, atol=1e-6)
        split.set_values({f"t1.{k}": 1.0 for k in values})  # late steps back to identity: a different image
        assert np.abs(_images(sd3_pipe) - constant).max() > 1e-4
    finally:
        split.detach()


def test_only_the_buckets_steps_see_its_values(sd3_pipe):
    """Scales set in the last bucket change nothing when sampling never reaches low noise."""
    cal = Calibrator(sd3_pipe.transformer, "layer", time_buckets=4).attach()
    try:
        one_step = _images(sd3_pipe, steps=1)  # the only step is at pure noise: bucket 0
        cal.set_values({f"t3.{k}": 0.3 for k in cal.site_names})
        np.testing.assert_array_equal(_images(sd3_pipe, steps=1), one_step)
        cal.set_values({f"t0.{k}": 0.3 for k in cal.site_names})
        assert np.abs(_images(sd3_pipe, steps=1) - one_step).max() > 1e-4
    finally:
        cal.detach()


@pytest.mark.parametrize("builder, noise, expected", [
    (tiny.tiny_sd3_transformer, 1000.0, 0), (tiny.tiny_sd3_transformer, 749.0, 1), (tiny.tiny_sd3_transformer, 0.0, 3),
    (tiny.tiny_flux_transformer, 1.0, 0), (tiny.tiny_flux_transformer, 0.26, 2), (tiny.tiny_qwen_transformer, 0.1, 3),
])
def test_time_bucket_reads_each_familys_timestep_scale(builder, noise, expected):
    cal = Calibrator(builder(), "block", time_buckets=4)
    assert cal.time_bucket(torch.tensor([noise, noise])) == expected
    assert Calibrator(builder(), "block").time_bucket(torch.tensor([noise])) == 0


def test_cannot_bake_and_file_round_trip(sd3_pipe, tmp_path):
    cal = Calibrator(sd3_pipe.transformer, "block", time_buckets=2).attach()
    try:
        with pytest.raises(RuntimeError, match="timestep-dependent"):
            cal.bake()
        cal.set_values(_random_values(cal, 2))
        path = save_calibration(cal, tmp_path / "c.json")
        expected = cal.values()
    finally:
        cal.detach()
    again = apply_calibration(sd3_pipe, path)
    try:
        assert again.time_buckets == 2 and again.values() == pytest.approx(expected)
    finally:
        again.detach()
    with pytest.raises(ValueError, match="time_buckets"):
        Calibrator(sd3_pipe.transformer, "block", time_buckets=0)
