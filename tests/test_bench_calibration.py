"""A calibration as a bench problem: cells are calibri runs of the toy calibration, cost is counted
in training images (candidates × bucket size × step counts, validation apart), the score is the
held-out validation reward, and the report compares images to the reference's final reward.
Also the optimiser set-ups the calibration bench uses (TBPSA, pycma with IPOP / BIPOP restarts)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from calibri.core.errors import ConfigError
from calibri.plugins.bench import analysis
from calibri.plugins.bench.bench import run_bench
from calibri.plugins.bench.cells import build_cells
from calibri.plugins.bench.config import load_bench, validate_bench

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "examples" / "toy.yaml")
HELD_OUT = ["a small red circle on the left", "a large blue square on the right", "a small green triangle at the top"]
#: toy.yaml made tiny: 2 prompts per round scored at 1 and 2 steps (4 images a candidate), 3 held-out prompts
TINY_OVERRIDES = {"objective.options.bucket_size": 2, "objective.options.steps": [1, 2],
                  "objective.options.validation_prompts": HELD_OUT, "validation.every": 2}


def tiny_bench(**changes):
    data = {"name": "tiny-calibration",
            "problems": [{"calibration": {"config": TOY, "overrides": dict(TINY_OVERRIDES)}}],
            # a set-up is an optimiser entry, objective options included: sep-CMA on a bucket of 1 prompt
            "optimizers": [{"name": "pycma", "label": "paper"},
                           {"name": "pycma", "label": "sep-cma", "options": {"cma_options": {"CMA_diagonal": True}},
                            "objective_options": {"bucket_size": 1}}],
            "budgets": [{"images": 36}], "seeds": 2, "popsize": 3, "workers": 1}
    data.update(changes)
    return validate_bench(data)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    config = tiny_bench()
    bench_dir = tmp_path_factory.mktemp("bench-calibration")
    out = run_bench(config, bench_dir, progress=False)
    return config, bench_dir, out


def test_cells_are_calibri_runs_of_the_calibration(bench):
    config, bench_dir, out = bench
    assert out["cells"] == 4 and out["ran"] == 4 and not out["failed"]
    cells = build_cells(config)
    problem = cells[0].problem
    assert problem.is_calibration and problem.label == "toy"
    assert problem.images_per_evaluation == 2 * 2 and problem.images_per_validation == 3 * 2
    run = cells[1].run_config()
    assert run["objective"]["options"]["bucket_size"] == 2 and run["validation"] == {"every": 2}
    assert run["optimizer"] == {"name": "pycma", "options": {}, "sigma": 0.25, "popsize": 3}  # toy.yaml's σ
    # 36 images: 9 candidates of 2 prompts × 2 step counts, 18 candidates of 1 prompt × 2 for sep-cma
    assert run["budget"] == {"evaluations": 9} and run["callbacks"] == [] and run["seed"] == 1
    sep = cells[2].run_config()
    assert sep["objective"]["options"]["bucket_size"] == 1 and sep["budget"] == {"evaluations": 18}
    assert cells[2].problem.images_per_evaluation == 2 and cells[2].problem.images_per_validation == 6
    stored = yaml.safe_load((bench_dir / cells[1].relpath / "config.yaml").read_text())
    assert stored["objective"]["options"]["validation_prompts"] == HELD_OUT


def test_cost_is_candidates_times_bucket_times_nfes(bench):
    config, bench_dir, _ = bench
    for cell in build_cells(config):
        trials = [json.loads(line) for line in (bench_dir / cell.relpath / "trials.jsonl").read_text().splitlines()]
        validations = (bench_dir / cell.relpath / "validation.jsonl").read_text().splitlines()
        run = analysis.load_calibration_run(cell, bench_dir)
        bucket = 1 if cell.optimizer == "sep-cma" else 2
        assert len(trials) == 36 // (bucket * 2) and all(t["artifacts"]["n_images"] == bucket * 2 for t in trials)
        assert run.training_images == len(trials) * bucket * 2 == 36 == len(run.best)
        # baseline, then every 2 rounds of 3 and at the end: the recommendation and, when it differs, the
        # incumbent; 3 held-out prompts at 2 step counts each
        assert run.validation_images == len(validations) * 3 * 2
        rounds_done = sorted({json.loads(v)["after_round"] for v in validations})
        assert rounds_done == ([0, 2, 3] if bucket == 2 else [0, 2, 4, 6])
        assert sorted({at for at, _, _ in run.validations}) == [r * 3 * bucket * 2 for r in rounds_done]
        best = json.loads((bench_dir / cell.relpath / "best.json").read_text())
        assert run.final == pytest.approx(best["validation"]["selected"]["value"])
        # the curve is the selected validation reward so far: non-decreasing, and the baseline from the start
        rewards = [run.reward(v) for v in run.best]
        assert all(b >= a for a, b in zip(rewards, rewards[1:]))
        assert rewards[0] == pytest.approx(best["validation"]["baseline"])


def test_report_has_images_to_target_and_the_curve(bench):
    config, bench_dir, out = bench
    report = (bench_dir / "report.md").read_text()
    assert "## Calibration: toy" in report and "### Images to target" in report
    assert (bench_dir / "calibration-toy.png").stat().st_size > 5000
    assert "![validation reward against training images](calibration-toy.png)" in report
    summary = json.loads((bench_dir / "summary.json").read_text())["calibration"]["toy"]
    runs = [analysis.load_calibration_run(c, bench_dir) for c in build_cells(config)]
    finals = [r.final for r in runs if r.optimizer == "paper"]
    assert summary["target"]["value"] == pytest.approx(float(np.median(finals)))
    rows = {row["optimizer"]: row for row in summary["rows"]}
    for run in runs:  # images to target: the first validated point at or above the target, in training images
        hit = next((at for at, _, selected in run.validations
                    if selected is not None and selected >= summary["target"]["value"]), None)
        expected = math.inf if hit is None else max(hit, 1)
        assert rows[run.optimizer]["images_to_target"][str(run.seed)] == expected
    assert rows["paper"]["reference"] and rows["sep-cma"]["paired_seeds"] == 2
    # two seeds cannot make a sign test significant: the report says so instead of printing p-values
    assert "Too few blocks for a test: with 2 blocks" in report and summary["note"]
    assert "| paper (ref.) |" in report and "| sep-cma |" in report


def test_rerun_skips_finished_cells_and_a_changed_calibration_is_refused(bench, tmp_path):
    config, bench_dir, _ = bench
    again = run_bench(config, bench_dir, progress=False, report=False, export=False)
    assert again["ran"] == 0 and again["skipped"] == 4
    changed = tiny_bench(problems=[{"calibration": {"config": TOY, "overrides": {**TINY_OVERRIDES,
                                                                                 "validation.every": 1}}}])
    from calibri.core.errors import UserError

    with pytest.raises(UserError, match="another validation"):
        run_bench(changed, bench_dir, progress=False, report=False, export=False)


def test_targets_and_comparison_on_hand_made_runs():
    from calibri.plugins.bench.cells import Problem

    problem = Problem("toy", "calibri", {}, 4, run={"validation": {"every": 1}})

    def run(optimizer, seed, points, total=100):
        curve = np.full(total, np.inf)
        for at, value in points:
            curve[max(at - 1, 0):] = np.minimum(curve[max(at - 1, 0):], -value)
        return analysis.CalibrationRun(problem, optimizer, seed, curve, False, 1.0, 1.0, 10, training_images=total)

    runs = [run("ref", 0, [(0, 0.5), (60, 0.7)]), run("ref", 1, [(0, 0.5), (100, 0.8)]),
            run("fast", 0, [(0, 0.5), (20, 0.9)]), run("fast", 1, [(0, 0.5), (40, 0.75)])]
    target = analysis.calibration_target(runs, "ref", "median")
    assert target["value"] == pytest.approx(0.75)
    assert analysis.calibration_target(runs, "ref", "worst")["value"] == pytest.approx(0.7)
    rows = {r["optimizer"]: r for r in analysis.calibration_comparison(runs, ["ref", "fast"], "ref", 0.75)}
    assert rows["ref"]["images_to_target"] == {"0": math.inf, "1": 100}
    assert rows["fast"]["images_to_target"] == {"0": 20, "1": 40}
    assert rows["ref"]["ert_images"] == pytest.approx(200) and rows["fast"]["ert_images"] == pytest.approx(30)
    assert rows["fast"]["ert_ratio"] == pytest.approx(0.15) and rows["fast"]["median_ratio"] == pytest.approx(0.4)
    assert rows["fast"]["wins_fewer"] == 2 and rows["fast"]["wins_half"] == 2 and rows["fast"]["untied_fewer"] == 2
    assert rows["fast"]["p_fewer"] == pytest.approx(0.5)  # 2 of 2 seeds: the sign test's floor 2 · 2^-2


# -- one-line option errors ----------------------------------------------------------------------
@pytest.mark.parametrize("problem, field, message", [
    ({"calibration": {"config": "no/such.yaml"}}, "problems.0.calibration.config", "no such file"),
    ({"calibration": {"config": TOY, "overrides": {"objective.options.bucket_size": 0}}},
     "problems.0.calibration.config", "objective.options.bucket_size: must be at least 1"),
    ({"calibration": {"config": TOY, "overrides": {"validation.every": None}}},
     "problems.0.calibration.config", "has no validation.every"),
    ({"calibration": {"config": TOY, "overrides": {"objective.options.validation_prompts": None}}},
     "problems.0.calibration.config", "validation_prompts is null"),
    ({"calibration": {"config": TOY, "overrides": {"objective.options": 3}}},
     "problems.0.calibration.config", "objective.options"),
    ({"calibration": {"config": str(ROOT / "examples" / "rosenbrock.yaml"), "overrides": {"validation.every": 1}}},
     "problems.0.calibration.config", "needs the calibri objective"),
])
def test_calibration_problem_errors_are_one_line(problem, field, message):
    with pytest.raises(ConfigError) as info:
        build_cells(tiny_bench(problems=[problem]))
    assert info.value.field == field and message in info.value.message and "\n" not in str(info.value)


def test_bench_level_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^reference: 'papr' is not an optimiser label"):
        tiny_bench(reference="papr")
    with pytest.raises(ConfigError, match=r"^problems\.0: .*calibration: \{config: RUN.yaml\}"):
        tiny_bench(problems=[{"calibration": {"config": TOY}, "name": "sphere"}])
    with pytest.raises(ConfigError, match=r"^problems\.0\.calibration\.overrides: "):
        tiny_bench(problems=[{"calibration": {"config": TOY, "overrides": ["validation.every=1"]}}])
    with pytest.raises(ConfigError, match=r"^target"):
        tiny_bench(target="mean")
    with pytest.raises(ConfigError, match=r"^budgets\.0\.images: only calibration problems count images"):
        build_cells(tiny_bench(problems=[{"name": "sphere", "options": {"dim": 3}}]))
    with pytest.raises(ConfigError, match=r"^optimizers\.1\.objective_options: only calibration problems"):
        build_cells(tiny_bench(problems=[{"name": "sphere", "options": {"dim": 3}}], budgets=[{"rounds": 2}]))
    with pytest.raises(ConfigError, match=r"^optimizers\.0\.objective_options\.bucket_size: must be at least 1"):
        build_cells(tiny_bench(optimizers=[{"name": "pycma", "objective_options": {"bucket_size": 0}}]))
    with pytest.raises(ConfigError, match=r"^optimizers\.0\.objective_options: every set-up .* same held-out"):
        build_cells(tiny_bench(optimizers=[{"name": "pycma", "objective_options": {"validation_seed": 3}}]))


def test_the_example_validates():
    config = load_bench(ROOT / "examples" / "bench-calibration.yaml")
    cells = build_cells(config)
    labels = [spec.key for spec in config.optimizers]
    assert config.reference_key == "paper" == labels[0] and len(set(labels)) == len(labels)
    # enough seeds for the Holm-corrected sign tests against the paper set-up to reach α at all
    assert len(config.seeds) >= analysis.blocks_needed(len(labels) - 1)
    assert len(cells) == len(labels) * 9 and cells[0].evaluations == 40 * 15  # d = 44: λ = 4 + ⌊3 ln 44⌋ = 15
    from calibri.core.config import validate
    from calibri.core.run import plan

    for cell in cells[::len(config.seeds)]:  # every set-up's optimiser builds on the calibration's space
        assert plan(validate(cell.run_config())).space is not None


# -- the set-ups' optimisers ---------------------------------------------------------------------
SPREAD_CHECKS = ("test_first_generation_spread_is_sigma", "test_first_generation_spread_is_per_dimension_sigma",
                 "test_first_generation_spread_on_log_dims_is_in_log_units")


def test_tbpsa_and_restart_backends_follow_the_optimizer_contract():
    from calibri.core.testing.optimizer_contract import check_optimizer_contract

    pytest.importorskip("nevergrad")
    # TBPSA draws each candidate's step size log-normally around σ (self-adaptation), so its first
    # generation spreads wider than σ by design: σ·exp(1/d) in root mean square, +28 % at d = 4.
    for options in ({}, {"initial_popsize": 2}):
        check_optimizer_contract("nevergrad.tbpsa", options=options, skip=SPREAD_CHECKS)
    for regime in ("ipop", "bipop"):
        check_optimizer_contract("pycma", options={"restarts": {"regime": regime}, "cma_options": {"tolstagnation": 3}})


def test_ipop_restarts_grow_the_population_and_bipop_alternates():
    from calibri.core import Float, OptimizerSettings, Space
    from calibri.optimizers.pycma_backend import PycmaCMA

    space = Space([Float(f"x{i}", -5.0, 5.0, init=3.0) for i in range(4)])

    def drive(options, rounds):
        opt = PycmaCMA(space, OptimizerSettings(seed=1, sigma=1.0), **options)
        sizes = []
        for _ in range(rounds):
            asked = opt.ask(opt.popsize)
            sizes.append(len(asked))
            opt.tell(asked, [float(sum(v * v for v in p.values())) for p in asked])
        return opt, sizes

    opt, sizes = drive({"restarts": {"regime": "ipop", "max": 2}, "cma_options": {"tolstagnation": 3, "maxiter": 5}},
                       40)
    assert sizes[0] == 8 and 16 in sizes and 32 in sizes and max(sizes) == 32  # λ0 = 4 + ⌊3 ln 4⌋, doubled twice
    assert opt.state_dict()["restart"]["runs"] == 2
    _, sizes = drive({"restarts": {"regime": "bipop", "max": 3}, "cma_options": {"maxiter": 4}}, 60)
    assert max(sizes) > 8 and min(sizes[4:]) <= 8  # large runs, and small-regime runs between them
    _, plain = drive({}, 30)
    assert set(plain) == {8}  # no restarts: pycma's stopping rules are off, the population stays


@pytest.mark.parametrize("options, field", [
    ({"restarts": {"regime": "lpop"}}, "optimizer.options.restarts.regime"),
    ({"restarts": {"max": -1}}, "optimizer.options.restarts.max"),
    ({"restarts": {"incpopsize": 1}}, "optimizer.options.restarts.incpopsize"),
    ({"restarts": {"regim": "ipop"}}, "optimizer.options.restarts.regim"),
    ({"cma_options": {"popsize": 30}}, "optimizer.options.cma_options.popsize"),
])
def test_restart_option_errors_are_one_line(options, field):
    from calibri.core.config import validate
    from calibri.core.run import plan

    config = validate({"objective": {"name": "sphere", "options": {"dim": 3}}, "optimizer": {"name": "pycma",
                                                                                          "options": options},
                       "budget": {"evaluations": 10}})
    with pytest.raises(ConfigError) as info:
        plan(config)
    assert info.value.field == field and "\n" not in str(info.value)


def test_tbpsa_option_error_is_one_line():
    from calibri.core.config import validate
    from calibri.core.run import plan

    pytest.importorskip("nevergrad")
    config = validate({"objective": {"name": "sphere", "options": {"dim": 3}},
                       "optimizer": {"name": "nevergrad.tbpsa", "options": {"initial_popsize": 0}},
                       "budget": {"evaluations": 10}})
    with pytest.raises(ConfigError, match=r"^optimizer\.options\.initial_popsize: must be at least 1"):
        plan(config)
