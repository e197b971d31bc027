"""The ``bbob`` objective: the same f as ioh and COCO at the same x, precision f − f_opt, its space
and its option checks."""
from __future__ import annotations

import numpy as np
import pytest

from calibri.core.errors import ConfigError
from calibri.core.objective import RoundContext
from calibri.core.plugins import get_registry
from calibri.core.space import Float

ioh = pytest.importorskip("ioh")
CTX = RoundContext(round=0, seed=0)


def objective(**options):
    registration = get_registry().get("objectives", "bbob")
    registration.extras["check"](**options)
    return registration.factory(**options)


def params(x):
    return {f"x[{i}]": float(v) for i, v in enumerate(x)}


@pytest.mark.parametrize("function,dimension,instance", [(1, 2, 1), (3, 10, 2), (8, 5, 1), (15, 20, 3),
                                                          (21, 10, 1), (24, 76, 1), (10, 57, 4), (6, 114, 1)])
def test_values_equal_ioh_and_precision_is_f_minus_fopt(function, dimension, instance):
    obj = objective(function=function, dimension=dimension, instance=instance)
    problem = ioh.get_problem(function, instance=instance, dimension=dimension, problem_class=ioh.ProblemClass.BBOB)
    xs = np.random.default_rng(function).uniform(-5, 5, (4, dimension))
    results = obj.evaluate([params(x) for x in xs], CTX)
    for x, result in zip(xs, results):
        assert result.value == problem(x)
        assert result.metrics["precision"] == result.value - problem.optimum.y
    assert obj.f_opt == problem.optimum.y


@pytest.mark.parametrize("function", [1, 7, 16, 24])
def test_precision_is_zero_at_the_optimum(function):
    problem = ioh.get_problem(function, instance=1, dimension=10, problem_class=ioh.ProblemClass.BBOB)
    (result,) = objective(function=function, dimension=10).evaluate([params(problem.optimum.x)], CTX)
    assert abs(result.metrics["precision"]) < 1e-8
    (result,) = objective(function=function, dimension=10).evaluate([params(np.full(10, 4.5))], CTX)
    assert result.metrics["precision"] > 0


@pytest.mark.parametrize("function,dimension,instance", [(1, 10, 1), (2, 2, 1), (17, 5, 9), (24, 40, 15), (3, 10, 11)])
def test_coco_values_equal_cocoex_and_match_ioh(function, dimension, instance):
    """Instances 6-15 included: COCO's convention runs instances 1-15, which its default suite lacks."""
    cocoex = pytest.importorskip("cocoex")
    obj = objective(function=function, dimension=dimension, instance=instance, library="coco")
    suite = cocoex.Suite("bbob", f"instances:{instance}", f"function_indices:{function} dimensions:{dimension}")
    problem = suite.get_problem_by_function_dimension_instance(function, dimension, instance)
    assert problem.id == f"bbob_f{function:03d}_i{instance:02d}_d{dimension:02d}"
    reference = objective(function=function, dimension=dimension, instance=instance)
    xs = np.random.default_rng(0).uniform(-5, 5, (3, dimension))
    results = obj.evaluate([params(x) for x in xs], CTX)
    for x, result, via_ioh in zip(xs, results, reference.evaluate([params(x) for x in xs], CTX)):
        assert result.value == problem(x)
        assert result.value == pytest.approx(via_ioh.value, rel=1e-11)
        assert result.metrics["precision"] == pytest.approx(via_ioh.metrics["precision"], rel=1e-9, abs=1e-9)
    problem.free()
    obj.close()


def test_space_is_the_bbob_domain_starting_at_the_origin():
    space = get_registry().get("objectives", "bbob").extras["space"](function=3, dimension=7)
    assert len(space) == 7 and space.names == [f"x[{i}]" for i in range(7)]
    assert all(isinstance(d, Float) and (d.low, d.high, d.init, d.sigma) == (-5.0, 5.0, 0.0, None) for d in space.dims)
    uniform = get_registry().get("objectives", "bbob").extras["space"](dimension=7, init="uniform", init_seed=3)
    x0 = uniform.to_vector(uniform.init_params())
    assert np.all(np.abs(x0) <= 4) and np.unique(x0).size == 7
    again = get_registry().get("objectives", "bbob").extras["space"](dimension=7, init="uniform", init_seed=3)
    assert np.array_equal(again.to_vector(again.init_params()), x0)


@pytest.mark.parametrize("options,field,text", [
    ({"function": 25}, "objective.options.function", "functions 1 to 24"),
    ({"function": 0}, "objective.options.function", "functions 1 to 24"),
    ({"dimension": 0}, "objective.options.dimension", "at least"),
    ({"dimension": 76, "library": "coco"}, "objective.options.dimension", "library: ioh allows any"),
    ({"instance": 0}, "objective.options.instance", "must be in"),
])
def test_bad_options_are_one_line_errors_naming_the_field(options, field, text):
    with pytest.raises(ConfigError) as info:
        get_registry().get("objectives", "bbob").extras["check"](**options)
    assert info.value.field == field and text in info.value.message


def test_a_calibri_run_logs_precision(tmp_path):
    from calibri.core.config import validate
    from calibri.core.run import start_run
    from calibri.core.store import RunStore

    config = validate({"objective": {"name": "bbob", "options": {"function": 2, "dimension": 4}},
                       "optimizer": {"name": "pycma", "sigma": 2.0}, "budget": {"evaluations": 24},
                       "callbacks": []})
    summary = start_run(config, tmp_path / "run")
    trials = RunStore(tmp_path / "run").read_trials()
    assert len(trials) == 24 == summary["evaluations"]
    assert trials[0]["params"] == {f"x[{i}]": 0.0 for i in range(4)}  # x0: the origin, evaluated first
    f_opt = ioh.get_problem(2, instance=1, dimension=4, problem_class=ioh.ProblemClass.BBOB).optimum.y
    assert all(t["metrics"]["precision"] == pytest.approx(t["value"] - f_opt, abs=1e-9) for t in trials)
