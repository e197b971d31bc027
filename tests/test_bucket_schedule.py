"""Bucket-size schedules (``bucket_size: [[0, 4], [10, 8], [20, 16]]``): each round scores its
scheduled number of prompts, the prompt stream stays a pure function of the round (resume
continues it exactly), the report and the bench count the images each round really made, and a
bad schedule is one line naming the option."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibri.core.config import validate
from calibri.core.errors import ConfigError
from calibri.core.run import resume_run, start_run
from calibri.plugins.dit.buckets import BucketSchedule, check_bucket_size, evaluations_for_images
from calibri.plugins.dit.prompts import PromptSet, PromptStream

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "examples" / "toy.yaml")
SCHEDULE = [[0, 1], [2, 2]]  # 1 prompt in rounds 0 and 1, then 2


def test_schedule_sizes_and_starts():
    schedule = BucketSchedule.of(check_bucket_size([[0, 4], [10, 8], [20, 16]], 1024))
    assert [schedule.size(r) for r in (0, 9, 10, 19, 20, 500)] == [4, 4, 8, 8, 16, 16]
    # each round starts where the previous ones' prompts end
    assert [schedule.start(r) for r in range(25)] == [sum(schedule.size(q) for q in range(r)) for r in range(25)]
    assert schedule.label() == "4→8@10→16@20" and BucketSchedule.of(16).label() == "16"
    assert not schedule.fixed and BucketSchedule.of(16).fixed and schedule.largest == 16
    assert check_bucket_size([[0, 8]], 1024) == 8  # a one-step schedule is a plain count


def test_evaluations_for_an_image_budget_follow_the_schedule():
    schedule = BucketSchedule(((0, 1), (2, 2)))
    # rounds of 3: 3 + 3 images, then 6 a round → 24 images after 5 rounds
    assert evaluations_for_images(schedule, 3, 24) == 15
    assert evaluations_for_images(schedule, 3, 25) == 16  # the last candidate may pass the budget
    assert evaluations_for_images(BucketSchedule(((0, 16),)), 15, 9600) == 600


@pytest.mark.parametrize(("value", "message"), [
    ([[1, 4]], "the first step starts at round 0, got 1"),
    ([[0, 4], [0, 8]], "step 1's first round 0 is not after step 0's (0)"),
    ([[0, 4], [5, 0]], "step 1's size must be at least 1, got 0"),
    ([[0, 4], [5, 2000]], "step 1's size must be at most 1024, got 2000"),
    ([[0, 4], [5, "8"]], "step 1's size must be a whole number, got '8'"),
    ([[0, 4, 1]], "step 0 must be [first_round, size], got [0, 4, 1]"),
    ([], "a schedule lists at least one [first_round, size] step"),
    (0, "must be at least 1, got 0"),
    (1e6, "must be at most 1024, got 1000000"),
    (2.5, "the size must be a whole number, got 2.5"),
])
def test_a_bad_schedule_is_one_line_naming_the_option(value, message):
    from calibri.core.options import validate_options
    from calibri.plugins.dit.objective import calibri_objective

    with pytest.raises(ConfigError) as info:
        validate_options(calibri_objective, {"bucket_size": value}, "objective.options", reserved=("device",))
    assert info.value.field == "objective.options.bucket_size"
    assert message in info.value.message and "\n" not in info.value.message


def test_the_stream_slices_consecutive_prompts_by_the_schedule():
    prompts = PromptSet(tuple(f"p{i}" for i in range(7)), ({},) * 7, "inline")
    scheduled = PromptStream(prompts, BucketSchedule(((0, 2), (3, 3))), seed=5)
    one_by_one = PromptStream(prompts, 1, seed=5)  # the same stream, one prompt a round
    buckets = [scheduled.indices(r) for r in range(6)]
    assert [len(b) for b in buckets] == [2, 2, 2, 3, 3, 3]
    assert [i for b in buckets for i in b] == [one_by_one.indices(p)[0] for p in range(15)]
    assert PromptStream(prompts, BucketSchedule(((0, 2), (3, 3))), seed=5).indices(4) == buckets[4]  # stateless


def run_config(toy_dir, prompt_files, rounds):
    train, val = prompt_files
    return validate({"name": "sched", "seed": 3,
                     "objective": {"name": "calibri", "options": {
                         "model": str(toy_dir), "granularity": "block", "steps": 1, "bucket_size": SCHEDULE,
                         "reward": "colorfulness", "prompts": str(train), "validation_prompts": str(val)}},
                     "optimizer": {"name": "pycma", "popsize": 2}, "budget": {"rounds": rounds},
                     "validation": {"every": 2}, "callbacks": []})


def trials(run_dir):
    return [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]


def test_a_run_scores_each_round_on_its_scheduled_bucket_and_resumes_exactly(toy_dir, prompt_files, tmp_path,
                                                                               one_torch_thread):
    from calibri.plugins.dit.report import run_cost

    start_run(run_config(toy_dir, prompt_files, 4), tmp_path / "whole", quiet=True)
    records = trials(tmp_path / "whole")
    assert [(r["round"], r["artifacts"]["n_images"]) for r in records] == \
        [(0, 1), (0, 1), (1, 1), (1, 1), (2, 2), (2, 2), (3, 2), (3, 2)]
    validations = len((tmp_path / "whole" / "validation.jsonl").read_text().splitlines())
    held_out = len([line for line in prompt_files[1].read_text().splitlines() if line.strip()])
    # 2 + 2 + 4 + 4 training prompts and every validation record's held-out prompts, 1 step each
    assert run_cost(tmp_path / "whole", BucketSchedule.of(SCHEDULE), [1], held_out) == 12 + validations * held_out

    start_run(run_config(toy_dir, prompt_files, 1), tmp_path / "part", quiet=True)
    resume_run(tmp_path / "part", {"rounds": 4}, quiet=True)
    strip = [{k: v for k, v in r.items() if k != "wall_time"} for r in trials(tmp_path / "part")]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time"} for r in records]


def test_the_bench_budgets_and_counts_a_schedules_images(tmp_path):
    pytest.importorskip("matplotlib")
    from calibri.plugins.bench import analysis
    from calibri.plugins.bench.bench import run_bench
    from calibri.plugins.bench.cells import build_cells
    from calibri.plugins.bench.config import validate_bench

    held_out = ["a small red circle on the left", "a large blue square on the right"]
    config = validate_bench({
        "name": "schedule", "seeds": 1, "popsize": 3, "workers": 1, "budgets": [{"images": 24}],
        "problems": [{"calibration": {"config": TOY, "overrides": {
            "objective.options.bucket_size": 2, "objective.options.steps": 1,
            "objective.options.validation_prompts": held_out, "validation.every": 2}}}],
        "optimizers": [{"name": "pycma", "label": "fixed"},
                       {"name": "pycma", "label": "grow", "objective_options": {"bucket_size": SCHEDULE}}]})
    cells = build_cells(config)
    assert [c.evaluations for c in cells] == [12, 15]  # 24 images: 12 × 2, or 3 + 3 + 6 + 6 + 6
    assert cells[1].problem.images_label == "1→2@2" and cells[0].problem.images_label == "2"
    out = run_bench(config, tmp_path, progress=False)
    assert out["ran"] == 2 and not out["failed"]
    grow = analysis.load_calibration_run(cells[1], tmp_path)
    assert grow.training_images == 24 == len(grow.best)
    assert [r["artifacts"]["n_images"] for r in trials(tmp_path / cells[1].relpath)] == [1] * 6 + [2] * 9
    report = (tmp_path / "report.md").read_text()
    assert "| grow | " in report and "| 1→2@2 |" in report and "b images from round r on" in report
