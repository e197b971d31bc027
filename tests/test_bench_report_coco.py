"""What COCO and IOHprofiler users expect of ``calibri bench``'s report: ERT and success rates per
function, ECDFs per BBOB function group, instances as repetitions, no meaningless p-values on
too few blocks, precision pooled by ranks only, an export cocopp reads, and BBOB-noisy problems."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibri.core.errors import ConfigError
from calibri.plugins.bench import analysis
from calibri.plugins.bench.analysis import RunData
from calibri.plugins.bench.cells import Problem, bbob_label, build_cells
from calibri.plugins.bench.config import validate_bench

ioh = pytest.importorskip("ioh")
HAS_COCOEX = importlib.util.find_spec("cocoex") is not None
NOISY_FUNCTION = 101


def bbob_problem(function: int, instance: int, dimension: int = 2) -> Problem:
    return Problem(bbob_label(function, dimension, instance), "bbob", {}, dimension, None, function, instance, "ioh")


def run_data(problem: Problem, optimizer: str, seed: int, best: list[float]) -> RunData:
    return RunData(problem, optimizer, seed, np.array(best, dtype=float), True, 0.0, 0.0, len(best))


# -- ERT and success rates ---------------------------------------------------------------------
def test_ert_on_a_hand_computed_case():
    curves = [np.array([5.0, 0.5, 0.05]),      # reaches 1 at 2, 0.1 at 3; budget 3
              np.array([5.0, 5.0, 5.0, 5.0]),  # never reaches 1; budget 4
              np.array([0.5])]                 # reaches 1 at once; budget 1
    ert, successes, spent = analysis.expected_running_time(curves, [1.0, 0.1, 1e-3])
    # target 1: 2 + 4 (whole budget) + 1 = 7 evaluations, 2 successes
    # target 0.1: 3 + 4 + 1 = 8, 1 success; target 1e-3: 8 spent, no success
    assert spent.tolist() == [7, 8, 8] and successes.tolist() == [2, 1, 0]
    assert ert[0] == pytest.approx(3.5) and ert[1] == pytest.approx(8.0) and math.isinf(ert[2])


def test_ert_rows_pool_instances_and_seeds_of_a_function():
    runs = [run_data(bbob_problem(3, 1), "a", 0, [5.0, 0.5, 0.05]), run_data(bbob_problem(3, 2), "a", 0, [5.0] * 3),
            run_data(bbob_problem(3, 1), "a", 1, [0.5, 0.5, 0.5]), run_data(bbob_problem(3, 2), "b", 0, [0.01] * 3),
            run_data(bbob_problem(20, 1), "a", 0, [50.0] * 3)]
    rows = {(r["function"], r["optimizer"], r["target"]): r for r in analysis.ert_rows(runs, 3, [1.0, 0.1])}
    a = rows[("f3-d2", "a", 1.0)]  # two instances × two seeds' worth of runs: 3 runs of "a" on f3
    assert (a["runs"], a["successes"], a["evaluations"], a["group"]) == (3, 2, 2 + 3 + 1, "separable")
    assert a["ert"] == pytest.approx(3.0) and a["success_rate"] == pytest.approx(2 / 3)
    assert rows[("f3-d2", "a", 0.1)]["ert"] == pytest.approx((3 + 3 + 3) / 1)
    assert rows[("f3-d2", "b", 0.1)]["ert"] == 1.0 and rows[("f3-d2", "b", 0.1)]["runs"] == 1
    assert math.isinf(rows[("f20-d2", "a", 1.0)]["ert"]) and rows[("f20-d2", "a", 1.0)]["group"] == "weakstructure"
    assert analysis.final_precision(runs, 3)[("f3-d2", "a")] == pytest.approx(0.5)  # median of 0.05, 5, 0.5


def test_bbob_groups_partition_the_functions():
    expected = {"separable": [1, 2, 3, 4, 5], "moderate": [6, 7, 8, 9], "ill-conditioned": [10, 11, 12, 13, 14],
                "multimodal": [15, 16, 17, 18, 19], "weakstructure": [20, 21, 22, 23, 24],
                "noisy-moderate": list(range(101, 107)), "noisy-severe": list(range(107, 122)),
                "noisy-multimodal": list(range(122, 131))}
    for key, functions in expected.items():
        assert [f for f in [*range(1, 25), *range(101, 131)] if analysis.function_group(f) == key] == functions
    assert analysis.function_group(None) is None and analysis.function_group(25) is None


# -- small samples and pooling -------------------------------------------------------------------
def test_sign_test_and_its_smallest_p():
    assert analysis.sign_test(np.array([1, 1, 1, 1, 1, 2.0]), np.array([2, 2, 2, 2, 2, 1.0])) == \
        (pytest.approx(2 * 7 / 64), 6)  # 5 against 1: 2 · (1 + 6) / 2^6
    assert analysis.sign_test(np.array([1.0, 1.0, np.inf]), np.array([1.0, 2.0, np.inf])) == (1.0, 1)  # ties out
    assert analysis.smallest_p(3) == 0.25 and analysis.smallest_p(6) == pytest.approx(0.03125)
    assert analysis.blocks_needed(1) == 6 and analysis.blocks_needed(4) == 8  # 4 · 2^-7 = 0.03125


def test_small_sample_warning_for_three_blocks_and_not_for_enough():
    note = analysis.significance_note(3, 1)
    assert note is not None and "with 3 blocks" in note and "= 0.25" in note
    assert "no difference here can be significant" in note
    assert "at least 6 untied blocks" in note
    assert analysis.significance_note(6, 1) is None
    assert analysis.significance_note(6, 2) is not None  # Holm over 2 comparisons: 2 · 2^-5 = 0.0625
    assert analysis.significance_note(7, 2) is None
    values = np.log10(np.array([[1e-3, 1e-1]] * 3))
    (ref, other) = analysis.ranking(values, ["A", "B"])
    assert other["p_value"] == 0.25 and other["reachable"] is False and other["smallest_p"] == 0.25
    (ref, other) = analysis.ranking(np.log10(np.array([[1e-3, 1e-1]] * 6)), ["A", "B"])
    assert other["reachable"] is True and other["p_value"] == pytest.approx(0.03125)


def test_rankings_pool_ranks_only():
    """Rescaling one function's precisions (here by 10^6, as a harder function would) changes no
    number of the pooled rankings: only which optimiser is better in a block enters."""
    rng = np.random.default_rng(1)
    values = rng.normal(size=(12, 3))
    rescaled = values.copy()
    rescaled[:6] = rescaled[:6] * 1e6 + 50  # the first function's blocks on another scale
    assert analysis.ranking(values, ["A", "B", "C"]) == analysis.ranking(rescaled, ["A", "B", "C"])
    assert np.array_equal(analysis.win_rates(values), analysis.win_rates(rescaled), equal_nan=True)
    assert not any("median" in row for row in analysis.ranking(values, ["A", "B", "C"]))


# -- a tiny bench: report, groups, instances as repetitions, cocopp --------------------------------
FUNCTIONS = [1, 2, 7, 21]


def tiny_bench_config(**changes):
    problems = [{"bbob": {"functions": FUNCTIONS, "dimensions": [2], "instances": "1-3"}}]
    if HAS_COCOEX:
        problems.append({"bbob": {"functions": [NOISY_FUNCTION], "dimensions": [2], "instances": "1-3",
                                  "library": "coco"}})
    data = {"name": "coco-view", "problems": problems, "optimizers": ["pycma", {"name": "random", "label": "rs"}],
            "budgets": [{"evaluations_per_dim": 10}], "seeds": 1, "sigma": 2.0}
    data.update(changes)
    return validate_bench(data)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from calibri.plugins.bench.bench import run_bench

    root = tmp_path_factory.mktemp("bench")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = run_bench(tiny_bench_config(), root / "b", workers=1, progress=False)
    finally:
        os.chdir(cwd)
    assert result["failed"] == []
    return root / "b", result


def load_runs(bench_dir: Path, config=None):
    config = config or tiny_bench_config()
    return [analysis.load_run(cell, bench_dir) for cell in build_cells(config)]


def test_group_ecdfs_are_drawn_for_the_groups_present(bench):
    bench_dir, _ = bench
    summary = json.loads((bench_dir / "summary.json").read_text())
    groups = summary["dimensions"]["2"]["ecdf"]["groups"]
    expected = {"separable": [1, 2], "moderate": [7], "weakstructure": [21]}
    if HAS_COCOEX:
        expected["noisy-moderate"] = [NOISY_FUNCTION]
    assert {key: g["functions"] for key, g in groups.items()} == expected
    for key in expected:
        assert (bench_dir / f"ecdf-d2-{key}.png").read_bytes()[:4] == b"\x89PNG"
    assert (bench_dir / "ecdf-d2.png").exists()  # all functions, as before
    assert not any((bench_dir / f"ecdf-d2-{key}.png").exists() for key in ("ill-conditioned", "multimodal"))
    runs = load_runs(bench_dir)
    separable = analysis.ecdf_by_optimizer([r for r in runs if r.problem.function in (1, 2)], 20, 2)
    assert groups["separable"]["area"] == pytest.approx(separable["area"])
    report = (bench_dir / "report.md").read_text()
    assert "![ECDF separable d=2](ecdf-d2-separable.png)" in report and "separable: area" in report


def test_instances_are_the_repetitions(bench):
    bench_dir, _ = bench
    report = (bench_dir / "report.md").read_text()
    assert "3 instances × 1 seed" in report and "3 runs per function and optimiser" in report
    assert "#### Budget 10·d evals = 20 evaluations (" in report
    summary = json.loads((bench_dir / "summary.json").read_text())
    assert summary["repetitions"]["instances"] == [1, 2, 3] and summary["repetitions"]["seeds"] == [0]
    assert summary["repetitions"]["runs_per_function"] == 3
    n_functions = len(FUNCTIONS) + HAS_COCOEX
    assert summary["dimensions"]["2"]["rankings"]["20"]["blocks"] == 3 * n_functions  # (function, instance, seed)
    with open(bench_dir / "ert.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == n_functions * 2 * 51
    f1 = [r for r in rows if r["function"] == "f1-d2" and r["optimizer"] == "pycma"]
    assert {r["runs"] for r in f1} == {"3"}  # the three instances, one seed
    runs = [r for r in load_runs(bench_dir) if r.problem.function == 1 and r.optimizer == "pycma"]
    assert [r.problem.instance for r in runs] == [1, 2, 3]
    ert, successes, _ = analysis.expected_running_time([r.best for r in runs], analysis.STANDARD_TARGETS)
    assert [int(r["successes"]) for r in f1] == successes.tolist()
    assert [float(r["ert"]) for r in f1] == pytest.approx(ert.tolist())
    table_row = next(line for line in report.splitlines() if line.startswith("| f1-d2 | pycma | 3 |"))
    assert table_row.count("/3)") == len(analysis.ERT_TARGETS)
    assert "Pooled across functions by ranks only" in report and "median precision" not in report


def test_report_replaces_p_values_by_words_on_three_blocks(bench, tmp_path):
    from calibri.plugins.bench.report import build_report

    bench_dir, _ = bench
    config = tiny_bench_config()
    few = [r for r in load_runs(bench_dir, config) if r.problem.function == 1]  # 1 function × 3 instances
    build_report(config, few, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "(3 blocks)" in report
    assert "Too few blocks for a test: with 3 blocks the smallest two-sided p-value the sign test can give is " \
           "2^(1−3) = 0.25" in report
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if "p (sign test)" in line) + 2
    rows = lines[start:lines.index("", start)]
    assert len(rows) == 2 and [row.endswith("| n/a | n/a |") for row in rows if "(ref.)" not in row] == [True]
    full = (bench_dir / "report.md").read_text()  # 12 or more blocks: a real test, no warning
    assert "Too few blocks" not in full and "p (sign test)" in full


def test_cocopp_reads_the_coco_export(bench):
    """cocopp, offline (sockets refused, its cache in the bench folder), finds every function,
    dimension, run and evaluation of the export, and the runs' final precisions."""
    pytest.importorskip("cocoex")
    if importlib.util.find_spec("cocopp") is None or importlib.util.find_spec("six") is None:
        pytest.skip("cocopp (and six, which it imports) not installed")
    bench_dir, result = bench
    script = (
        "import json, socket, sys, warnings\n"
        "def refuse(*args, **kwargs):\n"
        "    raise OSError('no network in this test')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "warnings.simplefilter('ignore')\n"
        "import cocopp\n"
        "out = []\n"
        "for folder in sys.argv[1:]:\n"
        "    for ds in cocopp.pproc.DataSetList(folder):\n"
        "        out.append({'alg': ds.algId, 'f': int(ds.funcId), 'dim': int(ds.dim), 'runs': int(ds.nbRuns()),\n"
        "                    'instances': [int(i) for i in ds.instancenumbers],\n"
        "                    'maxevals': [float(e) for e in ds.maxevals],\n"
        "                    'final': [float(v) for v in ds.finalfunvals]})\n"
        "print(json.dumps(out))\n")
    exdata = Path(result["coco"])
    folders = sorted(str(p) for p in exdata.iterdir())
    env = dict(os.environ, XDG_CACHE_HOME=str(bench_dir.parent / "cocopp-cache"), MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-c", script, *folders], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    datasets = json.loads(proc.stdout.strip().splitlines()[-1])
    functions = FUNCTIONS + ([NOISY_FUNCTION] if HAS_COCOEX else [])
    assert sorted((d["alg"], d["f"], d["dim"]) for d in datasets) == \
        sorted((alg, f, 2) for alg in ("pycma", "rs") for f in functions)
    runs = {(r.optimizer, r.problem.function, r.problem.instance): r for r in load_runs(bench_dir)}
    for d in datasets:
        assert d["runs"] == 3 and sorted(d["instances"]) == [1, 2, 3] and d["maxevals"] == [20.0] * 3
        if d["f"] > 100:  # COCO logs the noise-free value of noisy functions: not calibri's measured one
            continue
        for instance, final in zip(d["instances"], d["final"]):
            assert final == pytest.approx(runs[(d["alg"], d["f"], instance)].best[-1], rel=1e-6)


# -- BBOB-noisy ------------------------------------------------------------------------------------
def check(**options):
    from calibri.core.plugins import get_registry

    get_registry().get("objectives", "bbob").extras["check"](**options)


def test_noisy_functions_need_coco_with_a_one_line_error():
    with pytest.raises(ConfigError) as info:
        check(function=NOISY_FUNCTION, dimension=2, library="ioh")
    assert info.value.field == "objective.options.library" and "need library: coco" in info.value.message
    with pytest.raises(ConfigError) as info:
        check(function=131, dimension=2, library="coco")
    assert info.value.field == "objective.options.function" and "101 to 130" in info.value.message
    with pytest.raises(ConfigError, match="problems.0.bbob: library: the BBOB-noisy functions"):
        validate_bench({"problems": [{"bbob": {"functions": "101-103"}}], "optimizers": ["random"], "budgets": [5]})


def test_a_noisy_problem_runs_and_measures_against_the_noiseless_optimum(tmp_path):
    pytest.importorskip("cocoex")
    from calibri.core.config import validate
    from calibri.core.objective import RoundContext
    from calibri.core.run import start_run
    from calibri.core.store import RunStore
    from calibri.plugins.bbob import BBOBObjective, noiseless_base

    options = {"function": NOISY_FUNCTION, "dimension": 3, "instance": 2, "library": "coco"}
    check(**options)
    config = validate({"objective": {"name": "bbob", "options": options}, "optimizer": {"name": "pycma", "sigma": 2.0},
                       "budget": {"evaluations": 14}, "callbacks": []})
    start_run(config, tmp_path / "run")
    trials = RunStore(tmp_path / "run").read_trials()
    base = ioh.get_problem(noiseless_base(NOISY_FUNCTION), instance=2, dimension=3,
                           problem_class=ioh.ProblemClass.BBOB)
    assert len(trials) == 14 and all(t["metrics"]["precision"] == pytest.approx(t["value"] - base.optimum.y)
                                     for t in trials)
    objective = BBOBObjective(**options)
    try:
        x = {f"x[{i}]": 0.5 for i in range(3)}
        values = [r.value for r in objective.evaluate([x] * 4, RoundContext(round=0, seed=0))]
        assert len(set(values)) > 1  # noisy: the same point, different values
        (at_optimum,) = objective.evaluate([{f"x[{i}]": float(v) for i, v in enumerate(base.optimum.x)}],
                                           RoundContext(round=0, seed=0))
        assert 0 <= at_optimum.metrics["precision"] < 1e-7  # the noiseless optimum is the noisy one's
    finally:
        objective.close()


@pytest.mark.parametrize("block", range(101, 131, 3))
def test_each_noisy_function_shares_the_optimum_of_its_noiseless_base(block):
    """At the noiseless base function's x_opt, the Gaussian- and uniform-noise variants measure
    f_opt up to COCO's 1.01e-8 offset: the precision's reference is right for all of f101–f130."""
    pytest.importorskip("cocoex")
    from calibri.core.objective import RoundContext
    from calibri.plugins.bbob import BBOBObjective, noiseless_base

    for function in (block, block + 1):  # the Cauchy variant (block + 2) adds outliers at random
        base = ioh.get_problem(noiseless_base(function), instance=3, dimension=5, problem_class=ioh.ProblemClass.BBOB)
        objective = BBOBObjective(function=function, dimension=5, instance=3, library="coco")
        try:
            assert objective.f_opt == base.optimum.y
            (result,) = objective.evaluate([{f"x[{i}]": float(v) for i, v in enumerate(base.optimum.x)}],
                                           RoundContext(round=0, seed=0))
            assert 0 <= result.metrics["precision"] < 1e-7, function
        finally:
            objective.close()
