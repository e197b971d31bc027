"""Calibrations that know their sampling steps: several NFEs in one objective, the settings a
calibration file records and the warnings when it is used off them, the ω-sum guard, and the
report's NFE sweep marking the NFEs a calibration was made for."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from calibri.core.config import validate
from calibri.core.errors import ConfigError
from calibri.core.objective import RoundContext
from calibri.core.run import plan, resume_run, start_run
from calibri.plugins.dit.calibration_file import (
    apply_calibration,
    describe_settings,
    load_calibration,
    off_settings,
    save_calibration,
)
from calibri.plugins.dit.evaluation import Row, markdown_table, off_nfe_note
from calibri.plugins.dit.objective import CalibriObjective, CalibriOptions, project_omega

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # bit-exact comparisons (see conftest.py)

PROMPTS = ["a small red circle on the left", "a large blue square at the top", "a small green cross in the center"]


def run_config(toy_dir: Path, prompt_files, **options) -> dict:
    train, val = prompt_files
    opts = {"model": str(toy_dir), "granularity": "block", "copies": 2, "form": "cfg", "guidance_scale": 3.0,
            "time_buckets": 2, "steps": [1, 2], "bucket_size": 2, "reward": "colorfulness", "prompts": str(train),
            "validation_prompts": str(val), "batch_size": 4}
    opts.update(options)
    return {"name": "nfe", "seed": 5, "objective": {"name": "calibri", "options": opts},
            "optimizer": {"name": "pycma", "popsize": 3}, "budget": {"rounds": 2}, "validation": {"every": 1},
            "callbacks": []}


def objective_for(toy_dir: Path, **options) -> CalibriObjective:
    base = {"model": str(toy_dir), "granularity": "block", "copies": 2, "form": "cfg", "guidance_scale": 3.0,
            "time_buckets": 2, "reward": "colorfulness", "batch_size": 4, "device": "cpu"}
    return CalibriObjective(CalibriOptions(**{**base, **options}))


def trials(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]


# -- the option ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("steps", "expected"), [(4, (4,)), ([4, 2], (2, 4)), ("2..4", (2, 3, 4)), ("3", (3,))])
def test_steps_take_a_count_a_list_or_a_range(steps, expected):
    assert CalibriOptions(steps=steps).step_counts == expected


@pytest.mark.parametrize(("options", "message"), [
    ({"steps": [2, 2]}, "lists 2 more than once"),
    ({"steps": []}, "give at least one step count"),
    ({"steps": "4..2"}, "is empty"),
    ({"steps": [2, 0]}, "must be at least 1, got 0"),
    ({"steps": [2, 5000]}, "must be at most 1000"),
    ({"steps": list(range(1, 20))}, "at most 16 step counts"),
    ({"steps": "many"}, "a list of them or a range FIRST..LAST"),
    ({"steps_combine": "median"}, "'mean' or 'worst'"),
    ({"omega_sum": [2, 3]}, "must contain 1"),
    ({"omega_sum": [1.5, 0.5]}, "LOW <= HIGH"),
    ({"omega_sum": [0.5, 2], "with_omega": False}, "needs with_omega: true"),
])
def test_bad_step_and_guard_options_are_one_line_errors_naming_the_option(toy_dir, prompt_files, options, message):
    with pytest.raises(ConfigError) as info:
        plan(validate(run_config(toy_dir, prompt_files, **options)))
    assert info.value.field == f"objective.options.{next(iter(options))}" and message in info.value.message
    assert "\n" not in str(info.value)


# -- several NFEs: the value is the mean of one-NFE values ------------------------------------------
def test_a_multi_nfe_runs_values_equal_the_mean_of_single_nfe_evaluations(toy_dir, prompt_files, tmp_path):
    """Exact equality: each NFE's images are the same bit for bit whichever objective makes them
    (same pipeline, prompts, per-image seeds and thread count), each per-NFE mean is computed as a
    one-NFE value is (``float(scores.mean())``), and both sides combine them with ``math.fsum``."""
    from calibri.plugins.dit.objective import calibri_stream

    config = validate(run_config(toy_dir, prompt_files))
    start_run(config, tmp_path / "run", quiet=True)
    records = trials(tmp_path / "run")
    stream = calibri_stream(config.seed, **plan(config).recipe.options)
    singles = {n: objective_for(toy_dir, steps=n) for n in (1, 2)}
    try:
        for record in records:
            data = stream.next_round(record["round"])
            ctx = RoundContext(record["round"], record["seed"], data)
            one = {n: objective.evaluate([record["params"]], ctx)[0].value for n, objective in singles.items()}
            assert record["metrics"]["reward@1"] == one[1] and record["metrics"]["reward@2"] == one[2]
            assert record["value"] == math.fsum([one[1], one[2]]) / 2
        # validation scores with the same combination
        seed, data = stream.validation_data()
        baseline = json.loads((tmp_path / "run" / "validation.jsonl").read_text().splitlines()[0])
        ctx = RoundContext(-1, seed, data)
        one = {n: objective.evaluate([baseline["params"]], ctx)[0].value for n, objective in singles.items()}
        assert baseline["value"] == math.fsum([one[1], one[2]]) / 2
    finally:
        for objective in singles.values():
            objective.close()
    assert len({r["seed"] for r in records if r["round"] == 0}) == 1  # common random numbers

    # resumed after its first round, the run continues exactly
    start_run(validate(run_config(toy_dir, prompt_files) | {"budget": {"rounds": 1}}), tmp_path / "part", quiet=True)
    resume_run(tmp_path / "part", {"rounds": 2}, quiet=True)
    strip = [{k: v for k, v in r.items() if k != "wall_time"} for r in trials(tmp_path / "part")]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time"} for r in records]


@pytest.mark.parametrize(("reward", "pick"), [("colorfulness", min), ("total_variation", max)])
def test_worst_case_follows_the_rewards_direction(toy_dir, reward, pick):
    objective = objective_for(toy_dir, steps=[1, 2], steps_combine="worst", reward=reward)
    try:
        result = objective.evaluate([objective.space.init_params()], RoundContext(0, 1, {"prompts": PROMPTS}))[0]
    finally:
        objective.close()
    assert result.metrics["reward@1"] != result.metrics["reward@2"]
    assert result.value == pick(result.metrics["reward@1"], result.metrics["reward@2"])


# -- the ω-sum guard ---------------------------------------------------------------------------------
def test_omega_is_projected_per_bucket_onto_the_sum_bounds():
    params = {"s": 1.3, "t0.omega.0": 2.0, "t0.omega.1": -1.0, "t1.omega.0": 0.93, "t1.omega.1": -2.46}
    buckets = [["t0.omega.0", "t0.omega.1"], ["t1.omega.0", "t1.omega.1"]]
    out = project_omega(params, buckets, (0.5, 2.0))
    assert out["s"] == 1.3 and (out["t0.omega.0"], out["t0.omega.1"]) == (2.0, -1.0)  # inside: untouched
    assert out["t1.omega.0"] + out["t1.omega.1"] == pytest.approx(0.5)
    assert out["t1.omega.0"] - out["t1.omega.1"] == pytest.approx(0.93 + 2.46)  # shifted equally: the nearest point
    assert project_omega(params, buckets, (1.0, 1.0))["t1.omega.0"] == pytest.approx(0.93 + (1 + 1.53) / 2)


def test_the_guard_scores_the_projected_point_and_says_so(toy_dir):
    objective = objective_for(toy_dir, steps=1, omega_sum=[1.0, 1.0])
    try:
        degenerate = {**objective.space.init_params(), "t0.omega.0": 0.93, "t0.omega.1": -2.46}  # NFE 1: bucket 0 only
        ctx = RoundContext(0, 1, {"prompts": PROMPTS})
        guarded = objective.evaluate([degenerate], ctx)[0]
        projected, moved = objective.feasible(degenerate)
        assert moved and guarded.metrics["omega_projected"] == 1.0
        objective.options = objective.options.model_copy(update={"omega_sum": None})
        assert objective.evaluate([projected], ctx)[0].value == guarded.value
        assert objective.evaluate([degenerate], ctx)[0].value != guarded.value
    finally:
        objective.close()


# -- recorded settings and the warnings ----------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_pipe(toy_dir):
    from calibri.plugins.dit.models import load_pipeline

    return load_pipeline(str(toy_dir))


@pytest.fixture(scope="module")
def recorded(toy_dir, tmp_path_factory):
    """A calibration file of the toy pipeline made for NFE 2 at guidance 3, as a run writes it."""
    objective = objective_for(toy_dir, steps=2, time_buckets=1)
    try:
        objective.calibrator.set_values({"omega.0": 3.2, "omega.1": -2.2})
        path = save_calibration(objective.calibrator, tmp_path_factory.mktemp("cal") / "nfe2.json",
                                objective.calibrated_for())
    finally:
        objective.close()
    return path


def test_the_recorded_settings_round_trip(recorded):
    settings = load_calibration(recorded)["calibrated_for"]
    assert settings == {"steps": [2], "steps_combine": "mean",
                        "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "shift": 1.0,
                                      "use_dynamic_shifting": False},
                        "guidance_scale": 3.0, "height": 32, "width": 32}
    assert describe_settings(settings) == "NFE 2, guidance 3, FlowMatchEulerDiscreteScheduler shift 1, 32×32"
    assert off_settings(settings, steps=[2], guidance_scale=3.0, height=32, width=32,
                        scheduler=settings["scheduler"]) == []


def _sample(pipe, steps: int, guidance: float = 3.0) -> None:
    pipe(prompt=PROMPTS[0], num_inference_steps=steps, guidance_scale=guidance,
         generator=torch.Generator().manual_seed(0), output_type="pt")


def test_the_warning_fires_off_nfe_once_per_setting_and_not_on_it(toy_pipe, recorded):
    calibrator = apply_calibration(toy_pipe, recorded)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _sample(toy_pipe, 2)
            assert caught == []  # its own settings: silent
            _sample(toy_pipe, 4)  # 4 transformer calls, one warning
            _sample(toy_pipe, 2, guidance=5.0)
        messages = [str(w.message) for w in caught]
        assert len(messages) == 2 and all(w.category is RuntimeWarning for w in caught)
        assert all(m.startswith("calibri: ") and "\n" not in m and str(recorded) in m for m in messages)
        assert "NFE 4 (made for 2)" in messages[0] and "guidance 5 (made for 3)" in messages[1]
    finally:
        calibrator.detach()


def test_another_scheduler_shift_warns_when_applied(toy_dir, recorded):
    from calibri.plugins.dit.models import load_pipeline

    pipe = load_pipeline(str(toy_dir))
    pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, "shift": 3.0})
    with pytest.warns(RuntimeWarning, match=r"scheduler shift 3 \(made for 1\)"):
        apply_calibration(pipe, recorded).detach()


def test_a_file_without_recorded_settings_loads_and_warns_nothing(toy_pipe, recorded, tmp_path):
    document = json.loads(recorded.read_text())
    del document["calibrated_for"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(document))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrator = apply_calibration(toy_pipe, old)
        try:
            _sample(toy_pipe, 4)
        finally:
            calibrator.detach()
    assert describe_settings(load_calibration(old).get("calibrated_for")) == "unknown"


@pytest.mark.parametrize(("settings", "message"), [
    ([2], "calibrated_for must be a mapping"),
    ({"steps": [0]}, "calibrated_for.steps must be a list of step counts"),
    ({"steps_combine": "max"}, "calibrated_for.steps_combine must be mean or worst"),
    ({"scheduler": {"shift": "big"}}, "calibrated_for.scheduler.shift must be a number"),
    ({"height": -3}, "calibrated_for.height must be a positive number of pixels"),
])
def test_damaged_recorded_settings_are_one_line_errors(recorded, tmp_path, settings, message):
    from calibri.core.errors import UserError

    document = json.loads(recorded.read_text())
    document["calibrated_for"] = settings
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(UserError, match=message) as info:
        load_calibration(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_bake_warns_for_another_scheduler_and_says_the_settings(tmp_path, toy_dir, recorded):
    """A one-copy calibration of a pipeline folder whose scheduler has another shift."""
    from click.testing import CliRunner
    from diffusers import FlowMatchEulerDiscreteScheduler

    from calibri.core import plugins
    from calibri.core.cli import build_cli
    from calibri.plugins.dit.calibration import Calibrator
    from calibri.plugins.dit.models import load_pipeline

    pipe = load_pipeline(str(toy_dir))
    single = tmp_path / "single.json"
    calibrator = Calibrator(pipe.transformer, "block").attach()
    save_calibration(calibrator, single, load_calibration(recorded)["calibrated_for"])
    calibrator.detach()
    model_dir = tmp_path / "pipe"
    pipe.save_pretrained(model_dir)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(model_dir / "scheduler")
    plugins.reset_registry()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = CliRunner().invoke(build_cli(), ["bake", str(model_dir), str(single), "-o",
                                                      str(tmp_path / "baked")])
    finally:
        plugins.reset_registry()
    assert result.exit_code == 0, result.output
    assert "sample it as it was calibrated: NFE 2, guidance 3" in result.stdout
    shifts = [str(w.message) for w in caught if "scheduler shift 3 (made for 1)" in str(w.message)]
    assert len(shifts) == 1


# -- the report's NFE sweep -------------------------------------------------------------------------------
def _rows(calibrated: dict[int, tuple[float, float]]) -> list[Row]:
    rows = []
    for n, (mean, diff) in calibrated.items():
        rows.append(Row("baseline", n, mean - diff, 0.01, 80))
        rows.append(Row("calibrated", n, mean, 0.01, 80, diff=diff, diff_sem=0.01))
    return rows


def test_the_sweep_marks_its_nfes_and_says_when_it_collapses_off_them():
    rows = _rows({2: (0.668, 0.2), 4: (0.0, -0.93), 8: (0.0, -0.95)})
    table = markdown_table(rows, made_for=[2])
    assert "| calibrated | 2 | 0.6680 ± 0.0100 | +0.2000 ± 0.0100 | 20.0 | ✓ |" in table
    assert "| calibrated | 4 |" in table and table.count(" off |") == 2
    note = off_nfe_note(rows, [2], maximize=True)
    assert note.startswith("Off the NFEs it was made for (2), the calibration collapses")
    assert "(NFE 4: 0.000 vs 0.930, -0.930 ± 0.010; NFE 8: 0.000 vs 0.950, -0.950 ± 0.010)" in note
    assert "\n" not in note
    holding = off_nfe_note(_rows({2: (0.6, 0.2), 4: (0.9, 0.0)}), [2], maximize=True)
    assert "holds" in holding
    assert off_nfe_note(_rows({2: (0.6, 0.2)}), [2]) is None and off_nfe_note(rows, None) is None
    # for a lower-is-better reward, higher is worse
    assert "collapses" in off_nfe_note(_rows({2: (0.4, -0.2), 4: (0.9, 0.5)}), [2], maximize=False)


def test_the_nfe_range_example_validates():
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "examples" / "toy-nfe-2-4.yaml").read_text())
    resolved = plan(validate(data))
    assert resolved.recipe.options["steps"] == [2, 4] and resolved.recipe.options["steps_combine"] == "mean"
    assert resolved.recipe.options["omega_sum"] == (1.0, 1.0)
