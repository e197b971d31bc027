"""Every built-in optimiser passes the optimiser contract suite; backend-specific checks.

One ``OptimizerContract`` subclass per backend runs the shared suite
(:mod:`calibri.core.testing.optimizer_contract`).
Beyond the suite: every registered built-in imports and steps; nevergrad's CMA is the
full-covariance, non-elitist ``ParametrizedCMA`` (not the ``ng.optimizers.CMA`` selector); and the
pycma backend matches raw pycma for the same x0, σ, popsize and seed.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from calibri.core import Categorical, Float, Int, Optimizer, OptimizerSettings, Space
from calibri.core.plugins import get_registry
from calibri.core.testing.optimizer_contract import (
    OptimizerContract,
    check_optimizer_contract,
    contract_loss,
    contract_space,
    drive,
)

BUILT_IN = ["nevergrad.cma", "nevergrad.de", "nevergrad.pso", "nevergrad.oneplusone", "nevergrad.tbpsa", "optuna.tpe",
            "optuna.cmaes", "optuna.random", "optuna.qmc", "optuna.gp", "pycma", "random"]
HAS_TORCH = importlib.util.find_spec("torch") is not None

# -- the contract, backend by backend --------------------------------------------------------------------
class TestRandomContract(OptimizerContract):
    optimizer_name = "random"


class TestPycmaContract(OptimizerContract):
    optimizer_name = "pycma"


class TestNevergradCMAContract(OptimizerContract):
    optimizer_name = "nevergrad.cma"
    required_modules = ("nevergrad",)


class TestNevergradDEContract(OptimizerContract):
    optimizer_name = "nevergrad.de"
    required_modules = ("nevergrad",)


class TestNevergradPSOContract(OptimizerContract):
    optimizer_name = "nevergrad.pso"
    required_modules = ("nevergrad",)


class TestNevergradOnePlusOneContract(OptimizerContract):
    optimizer_name = "nevergrad.oneplusone"
    required_modules = ("nevergrad",)


class TestNevergradTBPSAContract(OptimizerContract):
    """TBPSA mutates log-normal step sizes per individual (σ·exp(N(0, 1/d))): the first
    generation's spread is σ on average but wider per sample, so the spread checks get room."""
    optimizer_name = "nevergrad.tbpsa"
    required_modules = ("nevergrad",)
    sigma_tolerance = 0.6


class TestOptunaTPEContract(OptimizerContract):
    optimizer_name = "optuna.tpe"
    required_modules = ("optuna",)


class TestOptunaRandomContract(OptimizerContract):
    optimizer_name = "optuna.random"
    required_modules = ("optuna",)


class TestOptunaQMCContract(OptimizerContract):
    optimizer_name = "optuna.qmc"
    required_modules = ("optuna", "scipy")


class TestOptunaCMAESContract(OptimizerContract):
    optimizer_name = "optuna.cmaes"
    required_modules = ("optuna", "cmaes")
    per_dimension_sigma = False  # optuna's CMA-ES has one σ, relative to each range


class TestOptunaGPContract(OptimizerContract):
    """GP fits are slow: small rounds, the GP takes over after 3 trials, its acquisition search is
    cut down, and the sphere check is left out."""

    optimizer_name = "optuna.gp"
    optimizer_options = {"sampler_options": {"n_startup_trials": 3}}
    required_modules = ("optuna", "torch", "scipy")
    popsize = 3
    rounds = 2
    state_rounds_before = 1
    state_rounds_after = 1
    check_progress = False

    def make(self, space, settings):
        optimizer = super().make(space, settings)
        sampler = optimizer.sampler
        if hasattr(sampler, "_n_preliminary_samples"):  # optuna's private knobs; defaults 2048 and 10
            sampler._n_preliminary_samples = 32
        if hasattr(sampler, "_n_local_search"):
            sampler._n_local_search = 2
        return optimizer


def test_every_built_in_optimizer_has_a_contract_class():
    registered = set(get_registry().names("optimizers"))
    assert set(BUILT_IN) <= registered, f"not registered: {sorted(set(BUILT_IN) - registered)}"
    covered = {cls.optimizer_name for cls in globals().values()
               if isinstance(cls, type) and issubclass(cls, OptimizerContract) and cls.__name__.startswith("Test")}
    assert covered == set(BUILT_IN)


# -- imports and steps ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_optimizer_imports_and_steps(name, tmp_path):
    if name == "optuna.gp" and not HAS_TORCH:
        pytest.skip("optuna.gp needs torch")
    registration = get_registry().get("optimizers", name)
    assert registration.plugin.startswith("calibri.optimizers."), registration.plugin
    factory = registration.factory
    kinds = registration.extras.get("kinds") or getattr(factory, "kinds", None) or {"float", "int"}
    space = contract_space(kinds)
    optimizer = factory(space, OptimizerSettings(seed=0, popsize=4, workdir=tmp_path))
    (asked,) = drive(optimizer, space, 1, 4)
    assert len(asked) == 4
    for params in asked:
        space.validate(params)
    space.validate(optimizer.recommend())


# -- nevergrad: the CMA really is full-covariance, non-elitist CMA-ES ------------------------------------
def test_nevergrad_cma_is_full_covariance_non_elitist_cma(tmp_path):
    ng = pytest.importorskip("nevergrad")
    import cma

    from calibri.optimizers.nevergrad_backend import NevergradCMA

    space = Space([Float(f"x{i}", -5.0, 5.0, init=1.0) for i in range(5)])
    optimizer = NevergradCMA(space, OptimizerSettings(seed=0, popsize=9, sigma=0.7, workdir=tmp_path))
    built = optimizer.ng_optimizer
    assert not isinstance(built, ng.optimizers.CMA), "got the CMA selector, which picks an algorithm by budget"
    assert not isinstance(built, ng.optimizers.base.ConfiguredOptimizer)
    assert type(built).__name__ == "_CMA", type(built)
    config = built._config
    assert isinstance(config, ng.families.ParametrizedCMA)
    assert config.diagonal is False and config.elitist is False
    assert config.scale == 1.0 and config.popsize == 9
    assert not config.fcmaes and not config.random_init and not config.high_speed
    assert not config.inopts  # nothing overrides pycma's defaults behind calibri's back
    # The parametrisation is unbounded, so nevergrad does not shrink σ (0.3 or 0.15 when bounded).
    assert not ng.p.helpers.Normalizer(built.parametrization).fully_bounded
    drive(optimizer, space, 1, 9, failures=False)
    es = built.es
    assert isinstance(es, cma.CMAEvolutionStrategy)
    assert es.sigma0 == 1.0 and es.popsize == 9
    assert es.opts["CMA_diagonal"] is False and es.opts["CMA_elitist"] is False
    assert es.countiter == 1  # the first generation was told


# -- pycma: the backend matches raw pycma ------------------------------------------------------------------
def test_pycma_backend_matches_raw_pycma(tmp_path):
    import cma

    from calibri.optimizers.pycma_backend import PycmaCMA

    seed, sigma, popsize = 7, 0.5, 10
    space = Space([Float(f"x{i}", -100.0, 100.0, init=float(i) - 2.0) for i in range(5)])
    ours = PycmaCMA(space, OptimizerSettings(seed=seed, sigma=sigma, popsize=popsize, workdir=tmp_path))
    asked = ours.ask(popsize)

    numpy_state = np.random.get_state()  # raw pycma seeds and draws from numpy's global generator
    try:
        raw = cma.CMAEvolutionStrategy(list(space.search_x0()), sigma,
                                       {"popsize": popsize, "seed": seed, "verbose": -9})
        raw_asked = np.array(raw.ask())
    finally:
        np.random.set_state(numpy_state)

    es = ours.es
    np.testing.assert_array_equal(es.mean, raw.mean)
    np.testing.assert_allclose(es.sigma * es.sigma_vec.scaling, raw.sigma * raw.sigma_vec.scaling * np.ones(5),
                               rtol=1e-15)
    np.testing.assert_allclose(es.opts["CMA_stds"], np.full(5, sigma))
    assert es.popsize == raw.popsize == popsize
    assert asked[0] == space.init_params()
    # x0 takes the first slot; the rest are raw pycma's first draws, in order.
    ours_z = np.array([space.to_search(p) for p in asked[1:]])
    np.testing.assert_allclose(ours_z, raw_asked[:popsize - 1], rtol=0, atol=1e-12)


def test_pycma_backend_per_dimension_sigma_is_cma_stds(tmp_path):
    import cma

    from calibri.optimizers.pycma_backend import PycmaCMA

    sigmas = [0.1, 0.5, 2.0]
    space = Space([Float(f"x{i}", -10.0, 10.0, init=0.0, sigma=s) for i, s in enumerate(sigmas)]
                  + [Float("lr", 1e-4, 1.0, init=1e-2, log=True)])
    ours = PycmaCMA(space, OptimizerSettings(seed=1, sigma=0.3, popsize=6, workdir=tmp_path))
    raw = cma.CMAEvolutionStrategy(list(space.search_x0()), 1.0,
                                   {"popsize": 6, "CMA_stds": sigmas + [0.3], "randn": np.random.RandomState(1).randn,
                                    "seed": np.nan, "verbose": -9})
    np.testing.assert_allclose(ours.es.sigma * ours.es.sigma_vec.scaling, raw.sigma * raw.sigma_vec.scaling)
    np.testing.assert_allclose(ours.es.sigma * ours.es.sigma_vec.scaling, sigmas + [0.3])
    np.testing.assert_array_equal(ours.es.mean, space.search_x0())


# -- the function form of the suite ------------------------------------------------------------------------
def test_check_optimizer_contract_runs_the_suite_on_a_factory():
    from calibri.optimizers.random_search import RandomSearch

    results = check_optimizer_contract(RandomSearch, popsize=4, rounds=2, progress_rounds=8)
    assert results["test_state_round_trip_continues_bit_identically"] == "passed"
    assert results["test_first_generation_spread_is_sigma"].startswith("skipped")  # uses_sigma = False
    assert set(results) >= {"test_asks_are_inside_the_space", "test_first_candidate_is_x0"}


class LocalGauss(Optimizer):
    """A small elitist local search that follows the contract, unless told to break one rule."""

    kinds = frozenset({"float", "int"})
    uses_sigma = True

    def __init__(self, space, settings, *, flaw=None):
        super().__init__(space, settings)
        self.flaw = flaw
        self.rng = np.random.Generator(np.random.PCG64(0 if flaw == "fixed_seed" else settings.seed))
        lows, highs = space.search_bounds()
        self.sigmas = space.search_sigmas(settings.sigma)
        if flaw == "sigma_times_range":
            self.sigmas = self.sigmas * (highs - lows)
        elif flaw == "bounded_shrink":
            self.sigmas = self.sigmas * 0.3
        self.center, self.best, self.x0_pending = space.search_x0(), None, flaw != "no_x0"

    def ask(self, n):
        out = []
        if self.x0_pending and n > 0:
            out.append(self.space.init_params())
            self.x0_pending = False
        while len(out) < n:
            noise = (np.random.standard_normal(len(self.space)) if self.flaw == "global_rng"
                     else self.rng.standard_normal(len(self.space)))
            z = self.center + self.sigmas * noise
            params = self.space.from_search(z)
            if self.flaw == "out_of_bounds":
                params[self.space.names[0]] = float(z[0]) + 100.0
            out.append(params)
        return out

    def tell(self, candidates, losses):
        if self.flaw == "full_rounds_only" and len(losses) != self.popsize:
            raise ValueError("partial round")
        for params, loss in zip(candidates, losses):
            if loss is None:
                continue
            key = -loss if self.flaw == "maximises" else loss
            if self.best is None or key < self.best[0]:
                self.best = (key, dict(params))
                self.center = self.space.to_search(params)

    def recommend(self):
        if self.flaw == "recommends_x0":
            return self.space.init_params()
        return dict(self.best[1]) if self.best else self.space.init_params()

    def state_dict(self):
        state = {"center": self.center.copy(), "best": self.best, "x0_pending": self.x0_pending}
        if self.flaw != "state_without_rng":
            state["rng"] = self.rng.bit_generator.state
        return state

    def load_state_dict(self, state):
        self.center, self.best, self.x0_pending = state["center"].copy(), state["best"], state["x0_pending"]
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]


def test_the_suite_passes_a_correct_local_search():
    results = check_optimizer_contract(LocalGauss)
    assert all(result == "passed" for result in results.values()), results


@pytest.mark.parametrize("flaw, check", [
    ("out_of_bounds", "test_asks_are_inside_the_space"),
    ("full_rounds_only", "test_ask_tell_rounds_with_failures_and_a_partial_round"),
    ("no_x0", "test_first_candidate_is_x0"),
    ("global_rng", "test_same_seed_same_asks"),
    ("fixed_seed", "test_different_seeds_different_asks"),
    ("state_without_rng", "test_state_round_trip_continues_bit_identically"),
    ("sigma_times_range", "test_first_generation_spread_is_sigma"),
    ("bounded_shrink", "test_first_generation_spread_is_sigma"),
    ("bounded_shrink", "test_first_generation_spread_is_per_dimension_sigma"),
    ("sigma_times_range", "test_first_generation_spread_on_log_dims_is_in_log_units"),
    ("maximises", "test_makes_progress_on_a_sphere"),
    ("recommends_x0", "test_recommendation_follows_the_tells"),
])
def test_the_suite_catches_a_broken_rule(flaw, check):
    """Each check can fail: one broken rule, one failing check."""
    from calibri.core.testing.optimizer_contract import contract_checks

    others = [name for name in contract_checks() if name != check]
    with pytest.raises((AssertionError, ValueError)) as info:
        check_optimizer_contract(LocalGauss, options={"flaw": flaw}, skip=others)
    if info.type is AssertionError:
        assert check in str(info.value)


def test_contract_loss_and_space_are_deterministic():
    space = contract_space({"float", "int", "categorical"})
    assert {"act", "mode"} <= set(space.names)
    x0 = space.init_params()
    assert contract_loss(space, x0) == contract_loss(space, dict(x0))
    assert isinstance(space["mode"], Categorical) and isinstance(space["n"], Int)
