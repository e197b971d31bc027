"""Spaces: construction checks, exact round trips, search coordinates, and the ``space:`` config form.

Property tests (hypothesis) draw whole spaces (float, log-float, int, log-int and categorical
dimensions) with points inside them.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calibri.core.errors import ConfigError
from calibri.core.space import DEFAULT_SIGMA_FRACTION, Categorical, Float, Int, Space, to_jsonable

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- construction checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("build, field", [
    (lambda: Float("x", 1.0, 1.0), "x.low"),
    (lambda: Float("x", 2.0, 1.0), "x.low"),
    (lambda: Float("x", 0.0, 1.0, init=1.5), "x.init"),
    (lambda: Float("x", 0.0, 1.0, init=-0.1), "x.init"),
    (lambda: Float("x", 0.0, 1.0, log=True), "x.low"),
    (lambda: Float("x", -1.0, 1.0, log=True), "x.low"),
    (lambda: Float("x", float("-inf"), 1.0), "x.low"),
    (lambda: Float("x", 0.0, float("nan")), "x.high"),
    (lambda: Float("x", 0.0, 1.0, init=float("inf")), "x.init"),
    (lambda: Float("x", 0.0, 1.0, sigma=0.0), "x.sigma"),
    (lambda: Float("x", 0.0, 1.0, sigma=-0.5), "x.sigma"),
    (lambda: Float("x", 0.0, 1.0, sigma=float("inf")), "x.sigma"),
    (lambda: Float("x", "0", 1.0), "x.low"),
    (lambda: Float("x", True, 2.0), "x.low"),
    (lambda: Int("n", 0.5, 3), "n.low"),
    (lambda: Int("n", 0, 3.5), "n.high"),
    (lambda: Int("n", 0, 3, init=1.5), "n.init"),
    (lambda: Int("n", True, 3), "n.low"),
    (lambda: Int("n", 0, float("inf")), "n.high"),
    (lambda: Int("n", "1", 3), "n.low"),
    (lambda: Int("n", 3, 3), "n.low"),
    (lambda: Int("n", 4, 3), "n.low"),
    (lambda: Int("n", 0, 8, log=True), "n.low"),
    (lambda: Int("n", 0, 8, init=9), "n.init"),
    (lambda: Int("n", 0, 8, sigma=0), "n.sigma"),
    (lambda: Categorical("c", ("a",)), "c.choices"),
    (lambda: Categorical("c", ()), "c.choices"),
    (lambda: Categorical("c", ("a", "a")), "c.choices"),
    (lambda: Categorical("c", ("a", "b"), init="z"), "c.init"),
    (lambda: Categorical("c", ("a", [1])), "c.choices"),
    (lambda: Categorical("c", "ab"), "c.choices"),
    (lambda: Space([Float("x", 0, 1), Int("x", 0, 3)]), "space.x"),
    (lambda: Space([]), "space"),
    (lambda: Space([Float("", 0, 1)]), "space"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_dimensions_raise_config_errors_naming_the_field(build, field):
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.field == field
    assert str(info.value).startswith(field)


@pytest.mark.parametrize("mapping, field", [
    ({"x": {"low": 1.0, "high": 0.0}}, "space.x.low"),
    ({"x": {"low": 0.0, "high": 1.0, "init": 3.0}}, "space.x.init"),
    ({"w": {"low": 0.0, "high": 1.0, "log": True, "size": 3}}, "space.w[0].low"),
    ({"n": {"type": "int", "low": 0, "high": 2.5}}, "space.n.high"),
    ({"c": {"type": "categorical", "choices": ["a"]}}, "space.c.choices"),
    ({"c": {"type": "categorical", "choices": ["a", "b"], "init": "z"}}, "space.c.init"),
    ({"x": {"type": "complex", "low": 0, "high": 1}}, "space.x.type"),
    ({"x": {"low": 0, "high": 1, "step": 0.1}}, "space.x"),
    ({"x": {"low": 0, "high": 1, "size": 0}}, "space.x.size"),
    ({"x": {"low": 0, "high": 1, "size": 2.0}}, "space.x.size"),
    ({"x": {"low": 0, "high": 1}, "y": {"low": 0, "high": 1, "size": 1}, "y[0]": {"low": 0, "high": 1}},
     "space.y[0]"),
])
def test_bad_config_entries_raise_config_errors_naming_the_dimension(mapping, field):
    with pytest.raises(ConfigError) as info:
        Space.from_config(mapping)
    assert info.value.field == field


def test_defaults_are_resolved_at_construction():
    assert Float("x", -2.0, 6.0).init == 2.0
    assert Float("lr", 1e-4, 1e-2, log=True).init == pytest.approx(1e-3, rel=1e-12)
    assert Int("n", 1, 10).init == 5 and isinstance(Int("n", 1, 10).init, int)
    assert Int("n", 1, 100, log=True).init == 10
    assert Categorical("c", ["a", "b"]).init == "a"
    assert Categorical("c", ["a", "b"]).choices == ("a", "b")
    assert Int("n", 1.0, 4.0).low == 1 and isinstance(Int("n", 1.0, 4.0).low, int)
    assert isinstance(Float("x", 0, 1).low, float)


# -- exact round trips (hypothesis) ----------------------------------------------------------------------
JSON_SCALARS = st.one_of(
    st.text(max_size=8), st.integers(-10**6, 10**6), st.booleans(), st.none(),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
)
LIMIT = 1e6


@st.composite
def float_dims(draw, name):
    a = draw(st.floats(-LIMIT, LIMIT, allow_nan=False))
    b = draw(st.floats(-LIMIT, LIMIT, allow_nan=False))
    low, high = min(a, b), max(a, b)
    if low == high:
        high = low + 1.0
    log = low > 0 and draw(st.booleans())
    init = draw(st.floats(low, high))
    sigma = draw(st.none() | st.floats(1e-6, 1e3))
    return Float(name, low, high, init=init, sigma=sigma, log=log, group=draw(st.none() | st.sampled_from("gh")))


@st.composite
def int_dims(draw, name):
    low = draw(st.integers(-10**9, 10**9))
    high = low + draw(st.integers(1, 10**9))
    log = low > 0 and draw(st.booleans())
    init = draw(st.integers(low, high))
    return Int(name, low, high, init=init, log=log, sigma=draw(st.none() | st.floats(0.1, 100.0)),
               group=draw(st.none() | st.sampled_from("gh")))


@st.composite
def categorical_dims(draw, name):
    # unique=True compares with ==, so choices like 1 and True (equal in Python) are not drawn
    # together: see test_categorical_choices_equal_under_eq_are_rejected_or_kept_apart.
    choices = draw(st.lists(JSON_SCALARS, min_size=2, max_size=5, unique=True))
    return Categorical(name, tuple(choices), init=draw(st.sampled_from(choices)),
                       group=draw(st.none() | st.sampled_from("gh")))


@st.composite
def spaces(draw, kinds=("float", "int", "categorical")):
    builders = {"float": float_dims, "int": int_dims, "categorical": categorical_dims}
    picked = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=6))
    return Space([draw(builders[kind](f"d{i}")) for i, kind in enumerate(picked)])


def value_in(dim):
    if isinstance(dim, Float):
        return st.floats(dim.low, dim.high)
    if isinstance(dim, Int):
        return st.integers(dim.low, dim.high)
    return st.sampled_from(dim.choices)


@st.composite
def spaces_and_points(draw, kinds=("float", "int", "categorical")):
    space = draw(spaces(kinds))
    return space, {dim.name: draw(value_in(dim)) for dim in space.dims}


def assert_same_params(got, expected):
    assert list(got) == list(expected)
    for name in expected:
        assert got[name] == expected[name], name
        assert type(got[name]) is type(expected[name]), (name, got[name], expected[name])
        if isinstance(expected[name], float):  # -0.0 and 0.0 compare equal; the bits must not
            assert math.copysign(1.0, got[name]) == math.copysign(1.0, expected[name]), name


@FAST
@given(spaces_and_points())
def test_dict_vector_dict_round_trip_is_exact(space_and_point):
    space, params = space_and_point
    space.validate(params)
    vector = space.to_vector(params)
    assert vector.dtype == np.float64 and vector.shape == (len(space),)
    assert_same_params(space.from_vector(vector), params)


@FAST
@given(spaces_and_points())
def test_dict_json_dict_round_trip_is_exact(space_and_point):
    space, params = space_and_point
    text = space.to_json(params)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert_same_params(space.from_json(text), params)


@FAST
@given(spaces_and_points(kinds=("float", "int")))
def test_numpy_scalars_become_plain_python_values(space_and_point):
    space, params = space_and_point
    as_numpy = {name: (np.float64(v) if isinstance(v, float) else np.int64(v)) for name, v in params.items()}
    plain = to_jsonable(as_numpy)
    assert all(type(v) in (float, int) for v in plain.values())
    assert_same_params(space.from_json(space.to_json(as_numpy)), params)


@FAST
@given(spaces_and_points())
def test_search_round_trip(space_and_point):
    """Exact for linear and integer dimensions; log floats come back within rounding of exp(log)."""
    space, params = space_and_point
    z = space.to_search(params)
    back = space.from_search(z)
    space.validate(back)
    for dim in space.dims:
        if isinstance(dim, Float) and dim.log:
            assert back[dim.name] == pytest.approx(params[dim.name], rel=1e-12)
        else:
            assert back[dim.name] == params[dim.name] and type(back[dim.name]) is type(params[dim.name])


@FAST
@given(st.data())
def test_any_finite_search_vector_maps_into_the_space(data):
    space = data.draw(spaces())
    lows, highs = space.search_bounds()
    span = highs - lows
    z = np.array([data.draw(st.floats(lo - 3 * s, hi + 3 * s)) for lo, hi, s in zip(lows, highs, span)])
    space.validate(space.from_search(z))
    space.validate(space.from_vector(z))
    assert np.all(lows <= space.search_x0()) and np.all(space.search_x0() <= highs)


# -- search coordinates ------------------------------------------------------------------------------
def test_log_dimensions_are_searched_in_natural_log_units():
    space = Space([Float("lr", 1e-4, 1.0, init=1e-2, log=True), Int("width", 2, 512, init=32, log=True)])
    lows, highs = space.search_bounds()
    np.testing.assert_allclose(lows, [math.log(1e-4), math.log(2)])
    np.testing.assert_allclose(highs, [0.0, math.log(512)])
    np.testing.assert_allclose(space.search_x0(), [math.log(1e-2), math.log(32)])
    np.testing.assert_allclose(space.to_search({"lr": 0.5, "width": 64}), [math.log(0.5), math.log(64)])
    back = space.from_search([math.log(0.25), math.log(100.4)])
    assert back["lr"] == pytest.approx(0.25, rel=1e-14)
    assert back["width"] == 100 and isinstance(back["width"], int)
    # the default σ is a quarter of the range in search units (log units for log dims)
    np.testing.assert_allclose(space.search_sigmas(), DEFAULT_SIGMA_FRACTION * (highs - lows))


def test_integers_are_rounded_and_everything_is_clipped():
    space = Space([Float("x", -1.0, 2.0), Int("n", 1, 10), Float("lr", 1e-3, 1e-1, log=True),
                   Categorical("c", ("a", "b", "c"))])
    assert space.from_search([0.5, 2.4, math.log(1e-2), 1.4]) == {"x": 0.5, "n": 2, "lr": pytest.approx(1e-2),
                                                                 "c": "b"}
    assert space.from_search([0.5, 2.6, math.log(1e-2), 1.6])["n"] == 3
    assert space.from_search([0.5, 2.6, math.log(1e-2), 1.6])["c"] == "c"
    low = space.from_search([-50.0, -50.0, -50.0, -50.0])
    high = space.from_search([50.0, 50.0, 50.0, 50.0])
    assert low == {"x": -1.0, "n": 1, "lr": pytest.approx(1e-3, rel=1e-12), "c": "a"}
    assert high == {"x": 2.0, "n": 10, "lr": pytest.approx(1e-1, rel=1e-12), "c": "c"}
    assert 1e-3 <= low["lr"] and high["lr"] <= 1e-1
    assert all(type(v) is int for v in (low["n"], high["n"]))
    assert space.from_vector([9.0, 11.7, 5.0, -3.0]) == {"x": 2.0, "n": 10, "lr": 1e-1, "c": "a"}
    lows, highs = space.search_bounds()
    assert (lows[3], highs[3]) == (-0.5, 2.5)  # categoricals: one unit per choice


def test_search_sigmas_prefer_the_dimension_then_the_default_then_a_quarter_range():
    space = Space([Float("a", 0.0, 8.0, sigma=0.5), Float("b", 0.0, 8.0), Int("n", 0, 4),
                   Categorical("c", ("p", "q"))])
    np.testing.assert_allclose(space.search_sigmas(), [0.5, 2.0, 1.0, 0.5])
    np.testing.assert_allclose(space.search_sigmas(0.3), [0.5, 0.3, 0.3, 0.3])


def test_wrong_shapes_and_params_are_rejected():
    space = Space([Float("x", 0.0, 1.0), Int("n", 0, 3), Categorical("c", ("a", "b"))])
    with pytest.raises(ValueError, match="length 3"):
        space.from_vector([0.0, 1.0])
    with pytest.raises(ValueError, match="length 3"):
        space.from_search(np.zeros((3, 1)))
    good = {"x": 0.5, "n": 2, "c": "a"}
    space.validate(good)
    for bad in ({"x": 0.5, "n": 2}, {**good, "y": 1.0}, {**good, "x": 1.5}, {**good, "n": 2.0},
                {**good, "n": True}, {**good, "n": 4}, {**good, "c": "z"}, {**good, "x": "0.5"}):
        with pytest.raises(ValueError):
            space.validate(bad)


# -- config form -------------------------------------------------------------------------------------
CONFIG = {
    "w": {"type": "float", "low": -1.0, "high": 1.0, "init": 0.1, "sigma": 0.2, "size": 3, "group": "weights"},
    "lr": {"low": 1e-5, "high": 1e-1, "log": True, "group": "opt"},
    "layers": {"type": "int", "low": 1, "high": 8},
    "heads": {"type": "int", "low": 1, "high": 64, "log": True, "size": 2},
    "act": {"type": "categorical", "choices": ["relu", "gelu", None, 2.5], "init": "gelu", "group": "opt"},
}


def test_from_config_expands_size_and_keeps_groups():
    space = Space.from_config(CONFIG)
    assert space.names == ["w[0]", "w[1]", "w[2]", "lr", "layers", "heads[0]", "heads[1]", "act"]
    assert space.groups == {"weights": ["w[0]", "w[1]", "w[2]"], "opt": ["lr", "act"]}
    assert all(space[f"w[{i}]"] == Float(f"w[{i}]", -1.0, 1.0, init=0.1, sigma=0.2, group="weights")
               for i in range(3))
    assert isinstance(space["lr"], Float) and space["lr"].log  # type defaults to float
    assert isinstance(space["heads[1]"], Int) and space["heads[1]"].log
    assert space["act"].choices == ("relu", "gelu", None, 2.5)
    assert space.kinds == {"float", "int", "categorical"}


def test_to_config_round_trips_through_from_config_yaml_and_json():
    space = Space.from_config(CONFIG)
    config = space.to_config()
    assert config["w[1]"] == {"type": "float", "low": -1.0, "high": 1.0, "init": 0.1, "sigma": 0.2,
                              "group": "weights"}
    assert config["lr"]["log"] is True and config["lr"]["init"] == pytest.approx(1e-3)
    assert "sigma" not in config["layers"] and "log" not in config["layers"]
    assert Space.from_config(config) == space
    assert Space.from_config(yaml.safe_load(yaml.safe_dump(config, sort_keys=False))) == space
    assert Space.from_config(json.loads(json.dumps(config))) == space
    assert Space.from_config(config).to_config() == config


@FAST
@given(spaces())
def test_to_config_from_config_round_trip_property(space):
    config = space.to_config()
    assert Space.from_config(config) == space
    assert Space.from_config(yaml.safe_load(yaml.safe_dump(config, sort_keys=False))) == space


# -- known bugs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("choices", [(1, True), (False, 0), (1, 1.0), (0.0, -0.0)], ids=repr)
def test_categorical_choices_equal_under_eq_are_rejected_or_kept_apart(choices):
    try:
        space = Space([Categorical("c", choices)])
    except ConfigError as exc:
        assert exc.field == "c.choices"
        return
    for value in choices:
        back = space.from_vector(space.to_vector({"c": value}))["c"]
        assert type(back) is type(value) and repr(back) == repr(value), (value, back)


def test_clipping_a_log_dimension_lands_exactly_on_its_bounds():
    space = Space([Float("lr", 1e-3, 1e-1, log=True), Float("wd", 3e-4, 7.0, log=True)])
    assert space.from_search([-50.0, -50.0]) == {"lr": 1e-3, "wd": 3e-4}
    assert space.from_search([50.0, 50.0]) == {"lr": 1e-1, "wd": 7.0}


def test_nan_is_not_a_categorical_choice():
    try:
        Categorical("c", (float("nan"), 1.0))
    except ConfigError as exc:
        assert exc.field == "c.choices"
        return
    raise AssertionError("a NaN choice was accepted")


@pytest.mark.parametrize("bounds", [dict(low=1e200, high=1e300, log=True), dict(low=1e308, high=1.7e308)],
                         ids=["log", "linear"])
def test_huge_bounds_get_a_finite_default_init(bounds):
    dim = Float("x", **bounds)
    assert dim.low <= dim.init <= dim.high


def test_int_bounds_beyond_float64_precision_are_rejected_or_round_trip():
    try:
        space = Space([Int("n", 0, 2**60)])
    except ConfigError as exc:
        assert exc.field == "n.high"
        return
    value = 2**60 - 1
    assert space.from_vector(space.to_vector({"n": value}))["n"] == value


def test_float_dimensions_reject_bool_values():
    space = Space([Float("x", 0.0, 1.0)])
    try:
        space.validate({"x": True})
    except ValueError:
        return
    raise AssertionError("validate accepted True for a float dimension")
