"""``calibri bench``: the config, the matrix, the runner (resume, determinism across workers),
the statistics (ECDF, Holm, rankings) on hand-made cases, the report and the exports."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from calibri.core.errors import ConfigError
from calibri.plugins.bench import analysis
from calibri.plugins.bench.bench import run_bench
from calibri.plugins.bench.cells import budget_evaluations, build_cells
from calibri.plugins.bench.config import parse_indices, validate_bench

pytest.importorskip("ioh")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def tiny(**changes):
    data = {"name": "tiny", "problems": [{"bbob": {"functions": [1, 3], "dimensions": [2], "instances": [1]}},
                                         {"name": "sphere", "options": {"dim": 3}, "label": "sphere-3", "f_opt": 0.0}],
            "optimizers": ["pycma", {"name": "random", "label": "rs"}],
            "budgets": [{"evaluations_per_dim": 4}, {"rounds": 3}], "seeds": 2, "sigma": 2.0}
    data.update(changes)
    return validate_bench(data)


# -- config and matrix -----------------------------------------------------------------------
def test_parse_indices():
    assert parse_indices("1-3,7") == [1, 2, 3, 7]
    assert parse_indices([5, "1-2", 5]) == [1, 2, 5]
    assert parse_indices(4) == [4]
    with pytest.raises(ValueError):
        parse_indices("3-1")


def test_the_matrix_is_problems_by_optimisers_by_seeds():
    config = tiny()
    cells = build_cells(config)
    assert len(cells) == 3 * 2 * 2
    assert [c.key for c in cells[:4]] == ["f1-d2-i1/pycma/seed-0", "f1-d2-i1/pycma/seed-1",
                                          "f1-d2-i1/rs/seed-0", "f1-d2-i1/rs/seed-1"]
    # budgets: 4·d evaluations and 3 rounds of popsize 4 + ⌊3 ln d⌋ (d=2: 6, d=3: 7); cells run to the largest
    assert budget_evaluations(config, 2) == [8, 18] and budget_evaluations(config, 3) == [12, 21]
    assert {c.evaluations for c in cells if c.problem.dimension == 2} == {18}
    run = cells[0].run_config()
    assert run["objective"] == {"name": "bbob", "options": {"function": 1, "dimension": 2, "instance": 1,
                                                            "library": "ioh", "init": "origin"}}
    assert run["optimizer"] == {"name": "pycma", "options": {}, "sigma": 2.0}
    assert run["budget"] == {"evaluations": 18} and run["callbacks"] == [] and run["seed"] == 0
    assert cells[-1].problem.f_opt == 0.0 and cells[-1].problem.dimension == 3


def test_the_examples_validate():
    for name in ("bench-quick.yaml", "bench-bbob-d10.yaml", "bench-bbob-d76.yaml"):
        from calibri.plugins.bench.config import load_bench

        config = load_bench(EXAMPLES / name)
        cells = build_cells(config)
        # repetitions per function: seeds, or COCO's instances with one seed each
        instances = min(len(p.bbob.instances) if p.bbob else 1 for p in config.problems)
        assert len(config.seeds) * instances >= 3 and cells
    d10 = load_bench(EXAMPLES / "bench-bbob-d10.yaml")
    assert d10.seeds == [0] and d10.problems[0].bbob.instances == list(range(1, 16))
    assert len(build_cells(d10)) == 24 * 15 * 5  # COCO's set-up: 24 functions x 15 instances, 1 run each
    assert {o.name for o in d10.optimizers} == {"nevergrad.cma", "pycma", "optuna.tpe", "optuna.cmaes", "random"}


@pytest.mark.parametrize("changes,field,text", [
    ({"colour": 1}, "colour", "unknown key"),
    ({"seeds": 0}, "seeds", "must be at least 1 (got 0)"),
    ({"optimizers": ["pycma", "pycma"]}, "optimizers.1.label", "used twice"),
    ({"optimizers": ["simplex"]}, "optimizers.0.name", "unknown optimizer 'simplex'"),
    ({"optimizers": [{"name": "pycma", "options": {"activ": True}}]}, "optimizers.0.options.activ", "unknown option"),
    ({"budgets": [{"evaluations": 10, "rounds": 2}]}, "budgets.0", "exactly one of"),
    ({"problems": [{"bbob": {"functions": "1-25"}}]}, "problems.0.bbob.functions", "1 to 24"),
    ({"problems": [{"bbob": {"dimensions": [76], "library": "coco"}}]}, "problems.0.bbob", "library: ioh"),
    ({"problems": [{"name": "sphere", "options": {"dim": 0}}]}, "problems.0.options.dim", "at least 1"),
    ({"problems": [{"name": "nope"}]}, "problems.0.name", "unknown objective 'nope'"),
])
def test_bad_bench_configs_name_the_field(changes, field, text):
    with pytest.raises(ConfigError) as info:
        build_cells(tiny(**changes))
    assert info.value.field == field, str(info.value)
    assert text in info.value.message


def test_bad_bench_yaml_exits_2_with_one_line(cli_inproc, tmp_path):
    (tmp_path / "b.yaml").write_text("problems: [{bbob: {functions: 1-30}}]\noptimizers: [pycma]\nbudgets: [10]\n")
    result = cli_inproc("bench", "b.yaml", "-o", "out")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "calibri: error: problems.0.bbob.functions: BBOB has functions 1 to 24 (noiseless) and 101 to 130 "
        "(noisy) (got '1-30')"]
    assert "problems.0.bbob.functions" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_bench_yaml_through_the_real_cli(cli, tmp_path):
    (tmp_path / "b.yaml").write_text("problems: [sphere]\noptimizers: [{name: pycma, sigma: 2}]\nbudgets: [10]\n")
    result = cli("bench", "b.yaml")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["calibri: error: optimizers.0.sigma: unknown key"]
    assert "Traceback" not in result.stdout + result.stderr


# -- statistics on hand-made cases --------------------------------------------------------------
def test_runtimes_and_ecdf_on_a_hand_made_case():
    best = np.array([500.0, 50.0, 50.0, 0.5, 1e-9])
    targets = [100.0, 1.0, 1e-8, 1e-10]
    assert analysis.runtimes(best, targets).tolist() == [2, 4, 5, math.inf]
    other = np.array([10.0, 10.0])  # reaches 100 at once, never 1
    values = np.concatenate([analysis.runtimes(best, targets), analysis.runtimes(other, targets)])
    assert analysis.ecdf(values, [1, 2, 4, 5, 100]).tolist() == [1 / 8, 2 / 8, 3 / 8, 4 / 8, 4 / 8]
    assert len(analysis.STANDARD_TARGETS) == 51
    assert analysis.STANDARD_TARGETS[0] == 100 and analysis.STANDARD_TARGETS[-1] == pytest.approx(1e-8)
    assert analysis.fraction_of_targets([np.array([1e-9])]) == 1.0
    assert analysis.fraction_of_targets([np.array([1.0])]) == pytest.approx(11 / 51)  # 10^2 … 10^0


def test_holm_on_known_p_values():
    # sorted 0.005, 0.01, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → monotone: 0.02, 0.03, 0.06, 0.06
    assert analysis.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert analysis.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert analysis.holm([0.01]) == pytest.approx([0.01])


def test_ranking_and_win_rates_on_a_hand_made_case():
    # 10 blocks, A always best, B beats C except in two blocks where they tie
    raw = np.array([[1e-3, 1e-1, 1.0]] * 8 + [[1e-3, 1.0, 1.0]] * 2)
    values = np.log10(raw)
    rows = analysis.ranking(values, ["A", "B", "C"])
    assert [r["optimizer"] for r in rows] == ["A", "B", "C"]
    assert rows[0]["reference"] and rows[0]["mean_rank"] == 1.0 and rows[0]["wins"] == 10
    assert rows[1]["mean_rank"] == pytest.approx((8 * 2 + 2 * 2.5) / 10)
    assert rows[2]["wins"] == 0 and "median" not in rows[1]  # raw precisions are not pooled across blocks
    assert rows[1]["p_value"] == pytest.approx(0.001953125)  # exact two-sided sign test, 10 equal signs
    assert rows[1]["p_holm"] == pytest.approx(2 * 0.001953125) and rows[2]["p_holm"] == pytest.approx(2 * 0.001953125)
    matrix = analysis.win_rates(values)
    assert matrix[0, 1] == 1.0 and matrix[1, 0] == 0.0
    assert matrix[1, 2] == pytest.approx(0.9) and matrix[2, 1] == pytest.approx(0.1)


# -- the runner ------------------------------------------------------------------------------
def trial_lines(bench_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for path in sorted(bench_dir.glob("runs/*/*/*/trials.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        for line in lines:
            line.pop("wall_time")
        out[str(path.relative_to(bench_dir))] = lines
    return out


def test_bench_runs_resumes_and_is_deterministic_across_workers(tmp_path):
    config = tiny()
    first = run_bench(config, tmp_path / "a", workers=1, progress=False, report=False, export=False)
    assert (first["ran"], first["skipped"], first["failed"]) == (12, 0, [])
    files = sorted((tmp_path / "a").glob("runs/*/*/*/trials.jsonl"))
    assert len(files) == 12
    mtimes = {path: path.stat().st_mtime_ns for path in files}
    again = run_bench(config, tmp_path / "a", workers=2, progress=False, report=False, export=False)
    assert (again["ran"], again["skipped"]) == (0, 12)
    assert {path: path.stat().st_mtime_ns for path in files} == mtimes  # a finished cell is not rerun

    parallel = run_bench(config, tmp_path / "b", workers=2, progress=False, report=False, export=False)
    assert parallel["ran"] == 12
    assert trial_lines(tmp_path / "a") == trial_lines(tmp_path / "b")  # same seeds, same results

    # a larger budget resumes the cells: the old evaluations are kept, bit for bit
    before = trial_lines(tmp_path / "a")
    bigger = tiny(budgets=[{"evaluations_per_dim": 4}, {"rounds": 5}])
    more = run_bench(bigger, tmp_path / "a", workers=1, progress=False, report=False, export=False)
    assert more["ran"] == 12
    after = trial_lines(tmp_path / "a")
    for key, lines in before.items():
        assert after[key][:len(lines)] == lines and len(after[key]) > len(lines)
    fresh = run_bench(bigger, tmp_path / "c", workers=1, progress=False, report=False, export=False)
    assert fresh["ran"] == 12 and trial_lines(tmp_path / "c") == after  # resumed = run in one go


def test_a_changed_cell_config_is_refused(tmp_path):
    from calibri.core.errors import UserError

    run_bench(tiny(seeds=[0]), tmp_path, workers=1, progress=False, report=False, export=False)
    with pytest.raises(UserError, match="another optimizer"):
        run_bench(tiny(seeds=[0], sigma=1.0), tmp_path, workers=1, progress=False, report=False, export=False)


def test_report_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative bench directory (COCO's export changes the cwd while it writes)
    result = run_bench(tiny(), "bench", workers=1, progress=False)
    tmp_path = tmp_path / "bench"
    report = (tmp_path / "report.md").read_text()
    for heading in ("## Dimension 2", "## Dimension 3", "### Runtime ECDF", "### Fixed-budget convergence",
                    "### Rankings", "### Win rates", "### Wall-clock and optimiser overhead",
                    "#### Budget 4·d evals = 8 evaluations (4 blocks)", "#### Budget 3 rounds = 18 evaluations"):
        assert heading in report, heading
    for png in ("ecdf-d2.png", "convergence-d2.png", "win-rate-d2.png", "ecdf-d3.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "summary.json").read_text())
    d2 = summary["dimensions"]["2"]
    assert set(d2["ecdf"]["final"]) == {"pycma", "rs"}
    assert all(0 <= v <= 1 for v in d2["ecdf"]["area"].values())
    assert {r["optimizer"] for r in d2["overhead"]} == {"pycma", "rs"}
    import pandas as pd

    table = pd.read_csv(tmp_path / "evaluations.csv.gz")
    assert len(table) == 2 * 2 * 2 * 18 + 2 * 2 * 21
    cell = table[(table.problem == "f3-d2-i1") & (table.optimizer == "pycma") & (table.seed == 1)]
    assert cell.evaluation.tolist() == list(range(1, 19))
    assert np.allclose(cell.best, np.minimum.accumulate(cell.precision))
    ioh_json = json.loads((tmp_path / "export/iohprofiler/pycma/IOHprofiler_f3_Rastrigin.json").read_text())
    assert ioh_json["scenarios"][0]["dimension"] == 2 and len(ioh_json["scenarios"][0]["runs"]) == 2
    dat = (tmp_path / "export/iohprofiler/pycma" / ioh_json["scenarios"][0]["path"]).read_text()
    assert dat.count("evaluations raw_y") == 2
    if importlib.util.find_spec("cocoex") is not None:
        assert result["coco"] is not None
        info = (tmp_path / "export/coco/exdata/pycma/bbobexp_f3.info").read_text()
        assert "funcId = 3, DIM = 2" in info and "algId = 'pycma'" in info


def test_cma_wrapping_parity_on_two_cells():
    """calibri-wrapped pycma reaches exactly the targets raw pycma reaches (bit-identical runs)."""
    pytest.importorskip("cma")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cma_wrapping_parity.py"
    spec = importlib.util.spec_from_file_location("cma_wrapping_parity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.parity([1, 7], dimension=3, seeds=[0, 1], sigma=2.0, per_dim=30)
    assert result["cells"] == 4 and result["evaluations"] == 90
    assert result["identical_trajectories"] == 4
    assert result["calibri"] == result["raw"] and result["difference"] == 0 and result["calibri"] > 0.2


def test_the_cli_runs_skips_and_reports(cli_inproc, tmp_path):
    args = ("bench", str(EXAMPLES / "bench-quick.yaml"), "seeds=1", "budgets=[5]", "-o", "out", "-j", "1", "--quiet")
    first = cli_inproc(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["12 cells: 12 run, 0 already finished, 0 failed",
                                         "report: out/report.md", "bench directory: out"]
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "bench.yaml").exists()
    second = cli_inproc(*args, "--no-report")
    assert second.stdout.splitlines()[0] == "12 cells: 0 run, 12 already finished, 0 failed"
    (tmp_path / "out" / "report.md").unlink()
    third = cli_inproc(*args, "--report-only")
    assert third.returncode == 0 and (tmp_path / "out" / "report.md").exists()
