"""The end of a calibration run: calibration file, evaluation across NFE, curves, grids, report;
and ``calibri evaluate`` on run directories and calibration files."""
from __future__ import annotations

import csv
import json

import pytest
import yaml

from calibri.core.config import validate
from calibri.core.run import start_run


def config(toy_dir, prompt_files, **changes):
    train, val = prompt_files
    data = {"name": "rep", "seed": 1,
            "objective": {"name": "calibri", "options": {
                "model": str(toy_dir), "granularity": "block", "steps": 2, "guidance_scale": 3.0, "bucket_size": 2,
                "reward": "colorfulness", "prompts": str(train), "validation_prompts": str(val)}},
            "optimizer": {"name": "pycma", "popsize": 3}, "budget": {"rounds": 2}, "validation": {"every": 1},
            "callbacks": [{"name": "calibration_report", "options": {"nfe": [1, 2], "guidance": [2.0], "grid_prompts": 2}}]}
    data.update(changes)
    return data


@pytest.fixture(scope="module")
def run_dir(toy_dir, prompt_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "rep"
    start_run(validate(config(toy_dir, prompt_files)), out, quiet=True)
    return out


def test_report_files_are_written_and_consistent(run_dir):
    for name in ("calibration.json", "evaluation.csv", "evaluation.md", "reward_vs_nfe.png", "reward_curve.png",
                 "grid.png", "report.md"):
        assert (run_dir / name).is_file(), name
    for png in ("reward_vs_nfe.png", "reward_curve.png", "grid.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((run_dir / "evaluation.csv").open()))
    assert {(r["variant"], r["steps"]) for r in rows} == {(v, s) for v in ("baseline", "calibrated", "guidance=2")
                                                         for s in ("1", "2")}
    assert {(r["steps"], r["calibrated_for"]) for r in rows if r["variant"] == "calibrated"} == {("1", "no"), ("2", "yes")}
    assert all(r["diff_vs_baseline"] == "" for r in rows if r["variant"] == "baseline")
    best = json.loads((run_dir / "best.json").read_text())
    selected = best["validation"]["selected"]
    document = json.loads((run_dir / "calibration.json").read_text())
    assert document["values"] == pytest.approx(selected["params"])
    validation_at_2 = next(r for r in rows if r["variant"] == "calibrated" and r["steps"] == "2")
    assert float(validation_at_2["mean"]) == pytest.approx(selected["value"], abs=1e-5)  # same prompts and seeds (CSV keeps 6 decimals)
    report = (run_dir / "report.md").read_text()
    assert "calibration.json" in report and "grid.png" in report and "| baseline |" in report
    assert "- calibrated for: NFE 2, guidance 3, FlowMatchEulerDiscreteScheduler shift 1, 32×32" in report
    assert "| made for this NFE |" in report and "| calibrated | 2 |" in report
    assert document["calibrated_for"]["steps"] == [2] and document["calibrated_for"]["guidance_scale"] == 3.0


def test_the_calibration_file_applies_to_a_fresh_pipeline(run_dir, toy_dir):
    from calibri.plugins.dit.calibration_file import apply_calibration
    from calibri.plugins.dit.models import load_pipeline

    pipe = load_pipeline(str(toy_dir))
    calibrator = apply_calibration(pipe, run_dir / "calibration.json")
    document = json.loads((run_dir / "calibration.json").read_text())
    assert calibrator.values() == pytest.approx(document["values"])


def test_evaluate_command_on_a_run_directory(run_dir, cli, tmp_path):
    result = cli("evaluate", run_dir, "--steps", "1,2", "--guidance", "2.5", "-o", tmp_path / "ev", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| calibrated | 2 |" in result.stdout and "| guidance=2.5 | 1 |" in result.stdout
    assert " ✓ |" in result.stdout and " off |" in result.stdout  # the NFE it was made for, and one it was not
    warned = [line for line in result.stderr.splitlines() if "off the settings" in line]
    assert len(warned) == 1 and warned[0].startswith("calibri: ") and "NFE 1 (made for 2)" in warned[0]
    assert (tmp_path / "ev" / "evaluation.csv").is_file() and (tmp_path / "ev" / "reward_vs_nfe.png").is_file()


def test_evaluate_command_on_a_calibration_file(run_dir, toy_dir, prompt_files, cli, tmp_path):
    train, _ = prompt_files
    result = cli("evaluate", run_dir / "calibration.json", "--model", toy_dir, "--reward", "colorfulness",
                 "--prompts", train, "--steps", "2", "-o", tmp_path / "ev2", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "off the settings" not in result.stderr  # evaluated at its NFE, guidance and size
    rows = list(csv.DictReader((tmp_path / "ev2" / "evaluation.csv").open()))
    assert [r["variant"] for r in rows] == ["baseline", "calibrated"] and rows[0]["n"] == "5"


def test_evaluate_max_prompts_is_a_prefix_of_the_held_out_set_and_quiet_is_silent(run_dir, prompt_files, cli, tmp_path):
    """--max-prompts 2 scores exactly what the first two held-out prompts give on their own (each
    keeps its seed); --quiet prints no progress lines."""
    _, val = prompt_files
    first_two = tmp_path / "first-two.jsonl"
    first_two.write_text("".join(val.read_text(encoding="utf-8").splitlines(keepends=True)[:2]), encoding="utf-8")
    quick = cli("evaluate", run_dir, "--steps", "2", "--max-prompts", "2", "--quiet", "-o", tmp_path / "quick", timeout=300)
    assert quick.returncode == 0, quick.stderr
    assert "[1/" not in quick.stderr and "steps" not in quick.stderr  # no "[1/2] baseline at 2 steps"
    alone = cli("evaluate", run_dir, "--steps", "2", "--prompts", first_two, "-o", tmp_path / "alone", timeout=300)
    assert alone.returncode == 0 and "[1/2] baseline at 2 steps" in alone.stderr
    rows = [list(csv.DictReader((tmp_path / name / "evaluation.csv").open())) for name in ("quick", "alone")]
    assert [r["n"] for r in rows[0]] == ["2", "2"] and rows[0] == rows[1]


@pytest.mark.parametrize("args, message", [
    (["--max-prompts", "1"], "--max-prompts"),
    (["--steps", "two"], "--steps: expected comma-separated numbers"),
    (["--steps", "0"], "--steps: step counts must be at least 1"),
])
def test_evaluate_command_bad_input_is_one_line(run_dir, cli, args, message):
    result = cli("evaluate", run_dir, *args)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_reward_option_replaces_a_runs_reward(run_dir):
    """``calibri evaluate RUN --reward R`` judges with R: the option is not ignored on a run directory."""
    from calibri.plugins.dit.report import load_run_objective

    objective, _, _ = load_run_objective(run_dir, reward="brightness")
    try:
        assert objective.options.reward == "brightness" and type(objective.reward).__name__ != "Colorfulness"
    finally:
        objective.close()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["objective"]["options"]["reward"] == "colorfulness"


def test_evaluate_command_on_missing_or_foreign_targets(cli, tmp_path):
    result = cli("evaluate", tmp_path / "nothing.json")
    assert result.returncode == 2 and "no such calibration file" in result.stderr
    (tmp_path / "plain").mkdir()
    result = cli("evaluate", tmp_path / "plain")
    assert result.returncode == 2 and "not a calibri run directory" in result.stderr


def test_the_toy_demo_config_validates():
    from pathlib import Path

    from calibri.core.run import plan

    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "examples" / "toy.yaml").read_text())
    p = plan(validate(data))
    assert p.recipe.options["model"] == "toy" and p.space is not None


def test_the_main_job_runs_end_to_end_on_the_shipped_model(cli, tmp_path):
    """`make demo`'s command on a budget of seconds: the shipped toy model, its calibration prompts
    and oracle, one round, validation on every 10th held-out prompt. (The full demo's time is a
    benchmark's business, not a test's: tests must pass on a busy machine.)"""
    import re
    from importlib import resources
    from pathlib import Path

    rows = resources.files("calibri.plugins.toy").joinpath("data/validation.jsonl").read_text().splitlines()
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text("\n".join(rows[::10]) + "\n")
    config = Path(__file__).resolve().parent.parent / "examples" / "toy.yaml"
    result = cli("run", config, "-o", tmp_path / "demo", "--quiet", "budget.rounds=1", "optimizer.popsize=4",
                 "objective.options.bucket_size=4", f"objective.options.validation_prompts={held_out}",
                 "validation.every=1", "callbacks=[plot, {name: calibration_report, options: {nfe: [4], grid_prompts: 2}}]",
                 timeout=600)
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "demo" / "trials.jsonl").read_text().splitlines()) == 4
    report = (tmp_path / "demo" / "report.md").read_text()
    baseline = float(re.search(r"reward at NFE 4 \(held-out prompts, fixed seeds\): baseline ([0-9.]+)", report).group(1))
    # The shipped model is the trained one: an untrained toy DiT scores ~0 on the oracle, the trained
    # one ~0.75 on the whole held-out set at NFE 4 (README table); 8 prompts are noisier than 80.
    assert 0.5 < baseline <= 1.0
    assert (tmp_path / "demo" / "grid.png").is_file() and (tmp_path / "demo" / "convergence.png").is_file()


def test_evaluate_refuses_a_calibration_for_another_model(run_dir, tmp_path, cli, prompt_files):
    from calibri.plugins.toy.pipeline import build_pipeline

    other = tmp_path / "other"
    build_pipeline(seed=1, layers=3).save_pretrained(other)  # one more block: other sites
    train, _ = prompt_files
    result = cli("evaluate", run_dir / "calibration.json", "--model", other, "--reward", "colorfulness",
                 "--prompts", train, "--steps", "1", timeout=300)
    assert result.returncode == 2 and "sites do not match" in result.stderr
    assert "Traceback" not in result.stderr


def test_default_guidance_and_guidance_variants_work_without_a_guidance_option(toy_dir, prompt_files):
    """guidance_scale unset: the pipeline's own default applies; guidance=G variants still work."""
    from calibri.plugins.dit.evaluation import evaluate
    from calibri.plugins.dit.objective import calibri_objective

    train, _ = prompt_files
    objective = calibri_objective(model=str(toy_dir), steps=1, reward="colorfulness", prompts=str(train),
                                  validation_prompts=None)
    try:
        rows = evaluate(objective, ["baseline", "guidance=1", "guidance=6"], [1], ["a small red circle on the left"] * 2,
                        [{}, {}], seed=0)
    finally:
        objective.close()
    assert len(rows) == 3 and rows[1].mean != rows[2].mean


def test_the_report_says_what_it_evaluated_and_its_cost(run_dir):
    report = (run_dir / "report.md").read_text()
    line = next(line for line in report.splitlines() if line.startswith("- this report: "))
    assert "NFE 1, 2 on 3 of 3 held-out prompts, 3 variants" in line and "budget_fraction 0.25" in line


def test_the_report_plan_scales_with_the_run():
    from calibri.plugins.dit.report import MIN_PROMPTS, plan_report, report_cost

    # a 3-round run of examples/toy.yaml: 15 candidates × 16 prompts × 4 steps per round, 3 validations of 80
    run = (3 * 15 * 16 + 3 * 80) * 4
    short = plan_report([4], 80, run, variants=3)
    assert short.cost <= 0.25 * run and short.nfe == (4,) and short.prompts == 74
    assert short.cost == report_cost([4], 74, 3, 8, 4)
    # a 40-round run affords the default NFE ladder too, cheapest first
    long = plan_report([4], 80, (40 * 15 * 16 + 6 * 80) * 4, variants=3)
    assert long.nfe == (2, 4, 8, 16) and long.prompts == 80 and long.cost <= 0.25 * long.run_cost
    # given NFEs are kept, and the prompts shrink to fit, down to the minimum
    given = plan_report([4], 80, run, variants=3, nfe=[2, 4, 8, 16, 32])
    assert given.nfe == (2, 4, 8, 16, 32) and given.prompts == MIN_PROMPTS
    assert "exceeded by what is always evaluated" in given.describe()
    # given prompts are kept; null budget_fraction: everything, as before
    assert plan_report([4], 80, run, variants=3, prompts=20).prompts == 20
    unlimited = plan_report([4], 80, run, variants=3, budget_fraction=None)
    assert unlimited.nfe == (2, 4, 8, 16) and unlimited.prompts == 80
    assert plan_report([2, 4], 5, 10, variants=2).prompts == 5  # fewer held-out prompts than the minimum: all


@pytest.mark.parametrize("options, message", [
    ({"prompts": 0}, "callbacks.calibration_report.options.prompts: must be at least 1"),
    ({"budget_fraction": 0}, "callbacks.calibration_report.options.budget_fraction: must be a positive number"),
    ({"nfe": []}, "callbacks.calibration_report.options.nfe: step counts must be between"),
])
def test_report_options_are_checked_when_the_run_starts(options, message):
    from calibri.core.errors import ConfigError
    from calibri.plugins.dit.report import CalibrationReport

    with pytest.raises(ConfigError) as caught:
        CalibrationReport(**options)
    assert str(caught.value).startswith(message)
