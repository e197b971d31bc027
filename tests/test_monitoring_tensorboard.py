"""The ``tensorboard`` callback: what a run writes, read back with TensorBoard's own reader, on
an analytic objective (scalars, histogram, text, resume) and a tiny calibration (validation and
the before/after image grid)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from calibri.core.config import validate
from calibri.core.errors import ConfigError
from calibri.core.run import plan, resume_run, start_run

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(log_dir: Path):
    accumulator = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(events, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def analytic_config(rounds: int = 3, **callback_options) -> dict:
    return {"name": "tb", "seed": 3, "objective": {"name": "rosenbrock", "options": {"dim": 3}},
            "optimizer": {"name": "random", "popsize": 4}, "budget": {"rounds": rounds},
            "callbacks": [{"name": "tensorboard", "options": callback_options}]}


def per_round(run_dir: Path) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for line in (run_dir / "trials.jsonl").read_text().splitlines():
        trial = json.loads(line)
        out.setdefault(trial["round"], []).append(trial)
    return out


@pytest.fixture(scope="module")
def analytic_run(tmp_path_factory):
    """A 3-round run, then resumed to 5 rounds: one log directory, two sessions."""
    run_dir = tmp_path_factory.mktemp("tb") / "run"
    start_run(validate(analytic_config()), run_dir, quiet=True)
    first = read_events(run_dir / "tensorboard")
    first_steps = [step for step, _ in scalars(first, "train/best")]
    resume_run(run_dir, {"rounds": 5}, quiet=True)
    return run_dir, first_steps


def test_scalars_match_the_trials_and_best_json(analytic_run):
    run_dir, first_steps = analytic_run
    assert first_steps == [1, 2, 3]
    events = read_events(run_dir / "tensorboard")
    rounds = per_round(run_dir)
    assert sorted(rounds) == [0, 1, 2, 3, 4]
    means = [sum(t["value"] for t in rounds[r]) / len(rounds[r]) for r in range(5)]
    assert scalars(events, "train/round_mean") == [(r + 1, pytest.approx(means[r], rel=1e-6)) for r in range(5)]
    round_best = [min(t["value"] for t in rounds[r]) for r in range(5)]
    assert scalars(events, "train/round_best") == [(r + 1, pytest.approx(round_best[r], rel=1e-6)) for r in range(5)]
    assert scalars(events, "train/evaluations") == [(r + 1, 4.0 * (r + 1)) for r in range(5)]
    assert scalars(events, "train/failures") == [(r + 1, 0.0) for r in range(5)]
    best = json.loads((run_dir / "best.json").read_text())
    assert scalars(events, "train/best")[-1] == (5, pytest.approx(best["best"]["value"], rel=1e-6))
    assert [step for step, _ in scalars(events, "train/elapsed_seconds")] == [1, 2, 3, 4, 5]


def test_resume_continues_the_log_without_duplicate_steps(analytic_run):
    run_dir, _ = analytic_run
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per session
    # every step once, also in the raw events (TensorBoard's purge would hide duplicates)
    steps = []
    from tensorboard.backend.event_processing import event_file_loader

    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for event in event_file_loader.EventFileLoader(str(path)).Load():
            steps += [event.step for value in event.summary.value if value.tag == "train/best"]
    assert steps == [1, 2, 3, 4, 5]
    assert json.loads((run_dir / "monitoring" / "tensorboard.json").read_text())["last_step"] == 5


def test_histogram_of_the_best_point_and_the_config_text(analytic_run):
    run_dir, _ = analytic_run
    events = read_events(run_dir / "tensorboard")
    histograms = events.Histograms("params/best")
    assert [h.step for h in histograms] == [1, 2, 3, 4, 5]
    best = json.loads((run_dir / "best.json").read_text())["best"]["params"]
    last = histograms[-1].histogram_value
    assert last.num == 3 and last.min == pytest.approx(min(best.values())) and last.max == pytest.approx(max(best.values()))
    (config_text,) = events.Tensors("run/config/text_summary")
    assert config_text.step == 0 and b"name: rosenbrock" in config_text.tensor_proto.string_val[0]


def test_a_calibration_run_logs_validation_and_before_after_images(toy_dir, prompt_files, tmp_path, one_torch_thread):
    train, val = prompt_files
    config = {"name": "tbcal", "seed": 1,
              "objective": {"name": "calibri", "options": {
                  "model": str(toy_dir), "granularity": "block", "steps": 1, "guidance_scale": 3.0, "bucket_size": 1,
                  "reward": "colorfulness", "prompts": str(train), "validation_prompts": str(val)}},
              "optimizer": {"name": "random", "popsize": 2}, "budget": {"rounds": 2}, "validation": {"every": 1},
              "callbacks": [{"name": "tensorboard", "options": {"log_dir": str(tmp_path / "tb"), "image_prompts": 1}}]}
    start_run(validate(config), tmp_path / "run", quiet=True)
    events = read_events(tmp_path / "tb")
    records = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    baseline = next(r for r in records if r["source"] == "baseline")
    assert scalars(events, "validation/baseline") == [(0, pytest.approx(baseline["value"], rel=1e-6))]
    recommended = [(r["after_round"], pytest.approx(r["value"], rel=1e-6)) for r in records if r["source"] == "recommendation"]
    assert scalars(events, "validation/recommendation") == recommended and len(recommended) == 2
    selected = json.loads((tmp_path / "run" / "best.json").read_text())["validation"]["selected"]
    assert scalars(events, "validation/selected")[-1] == (2, pytest.approx(selected["value"], rel=1e-6))
    images = events.Images("images/baseline_vs_selected")
    assert [image.step for image in images] == [1, 2]
    assert images[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and images[0].width > 50
    table = events.Tensors("validation/table/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert table.count("| recommendation |") == 2 and "| 0 | baseline |" in table
    assert [h.step for h in events.Histograms("params/selected")] == [0, 1, 2]
    omega = [tag for tag in events.Tags()["scalars"] if tag.startswith("omega_best/")]
    assert omega, "a CFG-form calibration's ω are logged as scalars, apart from the scales' histogram"


def test_bad_options_are_config_errors_before_the_run():
    with pytest.raises(ConfigError, match=r"callbacks\.tensorboard\.options\.image_prompts: must be at least 1"):
        plan(validate(analytic_config(image_prompts=0)))


def test_a_missing_extra_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(analytic_config()))
    code = ("import sys; sys.modules['tensorboardX'] = None\n"
            "from calibri.core.cli import main\n"
            f"main(['run', {str(config)!r}, '-o', {str(tmp_path / 'out')!r}])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CALIBRI_PLUGINS": ""})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "calibri: error: callbacks.tensorboard: needs the tensorboardX package, which is not installed "
        "(pip install 'calibri[tensorboard]')"]
    assert not (tmp_path / "out").exists()
