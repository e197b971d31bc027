"""The optimiser contract suite: the rules of :class:`calibri.core.optimizer.Optimizer`, as tests.

Every optimiser plugin (the built-in backends included) must pass it. It checks:

* **bounds** -- every asked candidate is inside the space (:meth:`Space.validate`: bounds, and
  ``int`` values for integer dimensions), over several rounds, on a space with float, log-float,
  int, log-int and (when the optimiser's ``kinds`` allow it) categorical dimensions, one of them
  starting on a bound with a step size twice its range;
* **ask/tell** -- ``n`` asked, ``n`` losses told, for several rounds, with failed evaluations
  (``None``), a round where everything failed, and a partial round (``n < popsize``, the last
  round of an ``evaluations`` budget) followed by a full one; ``recommend()`` stays in the space;
* **x0 injection** -- the first candidate of the first ask is exactly ``space.init_params()``,
  also for log dimensions and initial values on a bound;
* **determinism** -- the same seed and the same tells give the same asks; different seeds give
  different asks;
* **exact resume** -- ``pickle.loads(pickle.dumps(opt.state_dict()))`` loaded into a freshly
  built optimiser (same space, settings and ``workdir``) continues bit-identically;
* **step size** (``uses_sigma = True`` only) -- the first generation's per-coordinate standard
  deviation, in search units, is the requested σ within ±20 % (global ``settings.sigma``,
  per-dimension ``Float(sigma=...)``, and log dimensions in natural-log units), around x0;
* **progress** -- a modest budget on a sphere ends clearly below the loss of x0, and so does
  the loss at ``recommend()`` (a recommendation that ignores the tells fails);
* a one-dimensional space works, and ``popsize`` follows ``settings.popsize``.

Usage with pytest: subclass :class:`OptimizerContract` in a module named ``test_*.py``, in a class
named ``Test*``, and name the optimiser, by registry name or by factory::

    from calibri.core.testing.optimizer_contract import OptimizerContract

    from my_plugin import LocalRandom


    class TestLocalRandom(OptimizerContract):
        optimizer_factory = LocalRandom          # or: optimizer_name = "mine.local-random"
        optimizer_options = {"shrink": 1.0}      # keyword options, as in the run YAML


    class TestPycma(OptimizerContract):
        optimizer_name = "pycma"

        def make(self, space, settings):         # or build it yourself
            from calibri.optimizers.pycma_backend import PycmaCMA
            return PycmaCMA(space, settings, active=False)

Class attributes size the checks (``popsize``, ``rounds``, ``sigma_popsize``, ``progress_rounds``
...) and switch off what does not apply (``check_progress = False`` for an optimiser too slow for
a sphere budget; ``per_dimension_sigma = False`` for a backend with a single global σ).
``required_modules`` names modules to import first; the tests are skipped when one is missing.

Without pytest's collection, :func:`check_optimizer_contract` runs every check in temporary
folders and raises ``AssertionError`` on the first violation::

    from calibri.core.testing.optimizer_contract import check_optimizer_contract

    def test_local_random_follows_the_contract():
        check_optimizer_contract(LocalRandom)
"""
from __future__ import annotations

import json
import math
import pickle
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from calibri.core.optimizer import Optimizer, OptimizerSettings
from calibri.core.space import Categorical, Float, Int, Params, Space, to_jsonable

__all__ = ["OptimizerContract", "check_optimizer_contract", "contract_checks", "contract_loss", "contract_space", "drive"]

DEFAULT_KINDS = frozenset({"float", "int"})


# -- shared pieces ---------------------------------------------------------------------------------------
def contract_space(kinds: Sequence[str] | frozenset[str] = DEFAULT_KINDS) -> Space:
    """The mixed space most checks search: linear and log floats, linear and log ints, a float
    starting on its lower bound with σ twice its range (many samples land outside and must be
    brought back), and two categoricals when ``kinds`` includes ``"categorical"``."""
    dims: list[Any] = [
        Float("x", -5.0, 5.0, init=1.0),
        Float("lr", 1e-4, 1e-1, init=1e-3, log=True),
        Float("edge", 0.0, 1.0, init=0.0, sigma=2.0),
        Int("n", 1, 10, init=3),
        Int("width", 1, 1024, init=32, log=True),
    ]
    if "categorical" in kinds:
        dims.append(Categorical("act", ("relu", "gelu", "silu"), init="gelu"))
        dims.append(Categorical("mode", (1, 2.5, "auto"), init=2.5))
    return Space(dims)


def contract_loss(space: Space, params: Params) -> float:
    """A deterministic loss: squared distance to 0.3 of each range, in search coordinates."""
    lows, highs = space.search_bounds()
    u = (space.to_search(params) - lows) / (highs - lows)
    return float(np.sum((u - 0.3) ** 2))


def fails(round_index: int, position: int) -> bool:
    """The contract's failure pattern: about one candidate in four fails (the first never does)."""
    return position > 0 and (round_index + position) % 4 == 1


def drive(optimizer: Optimizer, space: Space, rounds: int, n: int, *, start: int = 0,
          failures: bool = True, all_failed: Sequence[int] = (),
          loss: Callable[[Space, Params], float] = contract_loss) -> list[list[Params]]:
    """Ask ``n`` and tell their losses for ``rounds`` rounds (numbered from ``start``); some
    evaluations fail (``failures``), and every one fails in the rounds listed in ``all_failed``.
    Returns what was asked, round by round."""
    history = []
    for index in range(start, start + rounds):
        asked = optimizer.ask(n)
        assert isinstance(asked, list), f"ask() must return a list, got {type(asked).__name__}"
        assert len(asked) == n, f"round {index}: ask({n}) returned {len(asked)} candidates"
        losses: list[float | None] = []
        for position, params in enumerate(asked):
            if index in all_failed or (failures and fails(index, position)):
                losses.append(None)
            else:
                losses.append(loss(space, params))
        optimizer.tell(asked, losses)
        history.append([dict(params) for params in asked])
    return history


def canonical(history: Sequence[Sequence[Params]]) -> list[list[str]]:
    """Asks as exact text (JSON floats are shortest-repr, so equal text is equal bits)."""
    return [[json.dumps(to_jsonable(p), sort_keys=True) for p in asked] for asked in history]


def _first_difference(a: list[list[str]], b: list[list[str]]) -> str:
    for r, (ra, rb) in enumerate(zip(a, b)):
        for c, (pa, pb) in enumerate(zip(ra, rb)):
            if pa != pb:
                return f"round {r}, candidate {c}: {pa} != {pb}"
        if len(ra) != len(rb):
            return f"round {r}: {len(ra)} != {len(rb)} candidates"
    return f"{len(a)} != {len(b)} rounds"


# -- the suite -------------------------------------------------------------------------------------------
class OptimizerContract:
    """Base class of an optimiser's contract tests; see the module docstring.

    Set ``optimizer_name`` (looked up in :func:`calibri.core.plugins.get_registry`) or
    ``optimizer_factory`` (called as ``factory(space, settings, **optimizer_options)``), or
    override :meth:`make`.
    """

    #: Registry name of the optimiser (``calibri.core.plugins.get_registry()``).
    optimizer_name: ClassVar[str | None] = None
    #: Or the factory itself: a class or function ``factory(space, settings, **options)``.
    optimizer_factory: ClassVar[Callable[..., Optimizer] | None] = None
    #: Keyword options for the factory (the run YAML's ``optimizer.options``).
    optimizer_options: ClassVar[dict[str, Any]] = {}
    #: Dimension kinds and σ use; ``None``: read from the registration or the factory's class.
    kinds: ClassVar[frozenset[str] | None] = None
    uses_sigma: ClassVar[bool | None] = None
    #: Modules to import first; the tests are skipped when one is missing.
    required_modules: ClassVar[tuple[str, ...]] = ()

    #: Round size (``settings.popsize``) and rounds of the bounds, ask/tell and determinism checks.
    popsize: ClassVar[int] = 6
    rounds: ClassVar[int] = 4
    #: Rounds before the checkpoint and after it in the resume check.
    state_rounds_before: ClassVar[int] = 2
    state_rounds_after: ClassVar[int] = 2
    #: First-generation size and relative tolerance of the step-size checks.
    sigma_popsize: ClassVar[int] = 200
    sigma_tolerance: ClassVar[float] = 0.2
    #: Whether per-dimension σ (``Float(sigma=...)``) may differ between dimensions; a backend
    #: with one global σ checks per-dimension σ with equal values only.
    per_dimension_sigma: ClassVar[bool] = True
    #: The sphere check: budget, and the fraction of x0's loss the best loss must get below.
    check_progress: ClassVar[bool] = True
    progress_popsize: ClassVar[int] = 8
    progress_rounds: ClassVar[int] = 12
    progress_factor: ClassVar[float] = 0.25
    #: The fraction of x0's loss the loss at ``recommend()`` must get below after the same budget
    #: (looser: a CMA-ES mean trails its best samples; a recommendation that ignores the tells stays at 1).
    recommend_factor: ClassVar[float] = 0.6
    #: Seed of every check (the determinism check also uses ``seed + 1``).
    seed: ClassVar[int] = 3

    # -- building ------------------------------------------------------------------------------------
    def make(self, space: Space, settings: OptimizerSettings) -> Optimizer:
        """A new optimiser; override to build it another way."""
        factory = type(self).optimizer_factory
        if factory is None:
            if self.optimizer_name is None:
                raise TypeError(f"{type(self).__name__}: set optimizer_name or optimizer_factory, "
                                "or override make()")
            from calibri.core.plugins import get_registry

            factory = get_registry().get("optimizers", self.optimizer_name).factory
        return factory(space, settings, **self.optimizer_options)

    def settings(self, workdir: Path, *, seed: int | None = None, sigma: float | None = None,
                 popsize: int | None = None) -> OptimizerSettings:
        """Settings for one optimiser; ``workdir`` is created (file-backed backends keep files there)."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        return OptimizerSettings(seed=self.seed if seed is None else seed, sigma=sigma,
                                 popsize=self.popsize if popsize is None else popsize, workdir=workdir)

    def _declared(self, attribute: str) -> Any:
        """``kinds``/``uses_sigma`` from this class, else the registration, else the factory,
        else an optimiser built on a one-dimensional space."""
        value = getattr(type(self), attribute)
        if value is not None:
            return value
        factory = type(self).optimizer_factory
        if factory is None and self.optimizer_name is not None:
            from calibri.core.plugins import get_registry

            registration = get_registry().get("optimizers", self.optimizer_name)
            if attribute in registration.extras and registration.extras[attribute] is not None:
                return registration.extras[attribute]
            factory = registration.factory
        if isinstance(factory, type) and hasattr(factory, attribute):
            return getattr(factory, attribute)
        with tempfile.TemporaryDirectory(prefix="calibri-contract-probe-") as tmp:
            probe = self.make(Space([Float("x", -1.0, 1.0)]), self.settings(Path(tmp)))
            return getattr(probe, attribute)

    def optimizer_kinds(self) -> frozenset[str]:
        return frozenset(self._declared("kinds") or DEFAULT_KINDS)

    def optimizer_uses_sigma(self) -> bool:
        return bool(self._declared("uses_sigma"))

    @pytest.fixture(autouse=True)
    def _contract_requirements(self) -> None:
        self.check_requirements()

    def check_requirements(self) -> None:
        for module in self.required_modules:
            pytest.importorskip(module)

    # -- (a) bounds ----------------------------------------------------------------------------------
    def test_asks_are_inside_the_space(self, tmp_path: Path) -> None:
        """Every candidate of several rounds validates, with a large σ pushing against the bounds."""
        space = contract_space(self.optimizer_kinds())
        optimizer = self.make(space, self.settings(tmp_path / "opt", sigma=3.0))
        history = drive(optimizer, space, self.rounds, self.popsize)
        for index, asked in enumerate(history):
            for position, params in enumerate(asked):
                try:
                    space.validate(params)
                except ValueError as exc:
                    raise AssertionError(f"round {index}, candidate {position} is outside the space: {exc}; "
                                         f"params={params!r}") from None
        for name in ("x", "lr", "n"):  # the searched values move, not just x0 repeated
            values = {params[name] for asked in history for params in asked}
            assert len(values) > 1, f"dimension {name!r} never moved from {values} in {self.rounds} rounds"
        recommendation = optimizer.recommend()
        try:
            space.validate(recommendation)
        except ValueError as exc:
            raise AssertionError(f"recommend() is outside the space: {exc}") from None

    # -- (b) ask/tell round trip ---------------------------------------------------------------------
    def test_ask_tell_rounds_with_failures_and_a_partial_round(self, tmp_path: Path) -> None:
        """Full rounds with some failures and one where every evaluation failed, then a partial
        round (the last round of an ``evaluations`` budget), then a full round again."""
        space = contract_space(self.optimizer_kinds())
        optimizer = self.make(space, self.settings(tmp_path / "opt"))
        assert optimizer.popsize == self.popsize, (
            f"popsize is {optimizer.popsize}, settings asked for {self.popsize}")
        history = drive(optimizer, space, self.rounds, self.popsize, all_failed=(1,))
        partial = max(1, self.popsize // 2)
        history += drive(optimizer, space, 1, partial, start=self.rounds)
        history += drive(optimizer, space, 1, 1, start=self.rounds + 1, failures=False)
        history += drive(optimizer, space, 1, self.popsize, start=self.rounds + 2)
        for index, asked in enumerate(history):
            for params in asked:
                space.validate(params)
            if len(asked) > 2:
                distinct = {json.dumps(to_jsonable(p), sort_keys=True) for p in asked}
                assert len(distinct) > 1, f"round {index}: all {len(asked)} candidates are identical: {asked[0]}"
        space.validate(optimizer.recommend())

    def test_popsize_follows_the_settings(self, tmp_path: Path) -> None:
        space = contract_space(self.optimizer_kinds())
        optimizer = self.make(space, self.settings(tmp_path / "a", popsize=7))
        assert optimizer.popsize == 7, f"settings.popsize=7 but popsize is {optimizer.popsize}"
        default = self.make(space, OptimizerSettings(seed=self.seed, workdir=_mkdir(tmp_path / "b")))
        assert isinstance(default.popsize, int) and default.popsize >= 1, (
            f"default popsize must be a positive int, got {default.popsize!r}")

    # -- (c) x0 injection ----------------------------------------------------------------------------
    def test_first_candidate_is_x0(self, tmp_path: Path) -> None:
        """The first candidate of the first ask is the space's initial point, value and type."""
        dims: list[Any] = [Float("a", -5.0, 5.0, init=1.25), Float("b", 0.0, 10.0, init=7.5),
                           Int("n", 0, 20, init=13)]
        if "categorical" in self.optimizer_kinds():
            dims.append(Categorical("c", ("p", "q", "r"), init="q"))
        space = Space(dims)
        optimizer = self.make(space, self.settings(tmp_path / "opt"))
        first = optimizer.ask(self.popsize)[0]
        self._assert_is_x0(space, first)

    def test_first_candidate_is_x0_on_log_and_boundary_dims(self, tmp_path: Path) -> None:
        """x0 exactly as written, also when a log transform or a bound could alter it: the
        initial point is what the user wrote, not ``exp(log(init))`` or a bound-repaired value."""
        space = Space([Float("lr", 1e-5, 1.0, init=1e-3, log=True), Float("wd", 1e-6, 1e-1, init=3e-4, log=True),
                       Float("low", 0.0, 1.0, init=0.0), Float("high", -2.0, 7.0, init=7.0),
                       Int("top", 1, 8, init=8), Int("width", 1, 1024, init=100, log=True)])
        optimizer = self.make(space, self.settings(tmp_path / "opt"))
        first = optimizer.ask(self.popsize)[0]
        self._assert_is_x0(space, first)

    @staticmethod
    def _assert_is_x0(space: Space, first: Params) -> None:
        x0 = space.init_params()
        assert set(first) == set(x0), f"first candidate has keys {sorted(first)}, the space {sorted(x0)}"
        wrong = {name: (first[name], x0[name]) for name in x0
                 if first[name] != x0[name] or type(first[name]) is not type(x0[name])}
        assert not wrong, ("the first candidate of the first ask must be space.init_params(); "
                           "(asked, init) differ for " + ", ".join(f"{k}: {v[0]!r} vs {v[1]!r}"
                                                                    for k, v in wrong.items()))

    # -- (d) determinism -----------------------------------------------------------------------------
    def test_same_seed_same_asks(self, tmp_path: Path) -> None:
        space = contract_space(self.optimizer_kinds())
        runs = []
        for name in ("a", "b"):
            optimizer = self.make(space, self.settings(tmp_path / name))
            runs.append(canonical(drive(optimizer, space, self.rounds, self.popsize)))
        assert runs[0] == runs[1], f"same seed, same tells, different asks: {_first_difference(*runs)}"

    def test_different_seeds_different_asks(self, tmp_path: Path) -> None:
        space = contract_space(self.optimizer_kinds())
        firsts = []
        for seed in (self.seed, self.seed + 1):
            optimizer = self.make(space, self.settings(tmp_path / f"seed{seed}", seed=seed))
            firsts.append(canonical(drive(optimizer, space, 2, self.popsize)))
        # the first candidate is x0 for every seed; compare the rest
        rest = [[asked[1:] if r == 0 else asked for r, asked in enumerate(run)] for run in firsts]
        assert rest[0] != rest[1], f"seeds {self.seed} and {self.seed + 1} gave identical asks"

    # -- (e) exact resume ----------------------------------------------------------------------------
    def test_state_round_trip_continues_bit_identically(self, tmp_path: Path) -> None:
        """Checkpoint, pickle, load into a fresh optimiser (same space, settings and workdir):
        the next rounds are the ones the original asks."""
        space = contract_space(self.optimizer_kinds())
        settings = self.settings(tmp_path / "opt")
        before, after = self.state_rounds_before, self.state_rounds_after
        original = self.make(space, settings)
        drive(original, space, before, self.popsize)
        blob = pickle.dumps(original.state_dict())
        expected = canonical(drive(original, space, after, self.popsize, start=before))
        expected_recommendation = json.dumps(to_jsonable(original.recommend()), sort_keys=True)

        restored = self.make(space, settings)
        restored.load_state_dict(pickle.loads(blob))
        got = canonical(drive(restored, space, after, self.popsize, start=before))
        assert got == expected, f"resumed optimiser diverged: {_first_difference(got, expected)}"
        assert json.dumps(to_jsonable(restored.recommend()), sort_keys=True) == expected_recommendation, (
            "recommend() differs after resume")

    # -- (f) step size -------------------------------------------------------------------------------
    def _check_first_generation_spread(self, tmp_path: Path, space: Space, sigma: float | None,
                                       expected: np.ndarray) -> None:
        if not self.optimizer_uses_sigma():
            pytest.skip("the optimiser does not use σ (uses_sigma = False)")
        n = self.sigma_popsize
        optimizer = self.make(space, self.settings(tmp_path / "opt", sigma=sigma, popsize=n))
        asked = optimizer.ask(n)
        assert len(asked) == n, f"ask({n}) returned {len(asked)} candidates"
        z = np.array([space.to_search(params) for params in asked[1:]])  # without the injected x0
        std = z.std(axis=0, ddof=1)
        ratio = std / expected
        tol = self.sigma_tolerance
        bad = [f"{name}: std {s:.4g} vs σ {e:.4g}" for name, s, e, r in zip(space.names, std, expected, ratio)
               if not 1 - tol <= r <= 1 + tol]
        assert not bad, (f"first generation's spread is not σ within ±{tol:.0%} "
                         f"(search units; σ={sigma}): " + "; ".join(bad))
        offset = np.abs(z.mean(axis=0) - space.search_x0()) / expected
        limit = 5.0 / math.sqrt(len(z))
        assert np.all(offset <= limit), (
            f"first generation is not centred on x0: mean offsets {np.round(offset, 3)} σ (limit {limit:.3f} σ)")

    def test_first_generation_spread_is_sigma(self, tmp_path: Path) -> None:
        """``settings.sigma`` = 0.5 on 8 floats in [-100, 100]: the spread must be 0.5, not a
        fraction of it (bounded-space shrinking) nor σ times the range (wrong units)."""
        space = Space([Float(f"x{i}", -100.0, 100.0, init=0.0) for i in range(8)])
        self._check_first_generation_spread(tmp_path, space, 0.5, np.full(8, 0.5))

    def test_first_generation_spread_is_per_dimension_sigma(self, tmp_path: Path) -> None:
        """A dimension's own σ wins over ``settings.sigma``."""
        sigmas = [0.5, 1.0, 2.0, 4.0] * 2 if self.per_dimension_sigma else [0.5] * 8
        space = Space([Float(f"x{i}", -100.0, 100.0, init=0.0, sigma=s) for i, s in enumerate(sigmas)])
        self._check_first_generation_spread(tmp_path, space, 7.0, np.array(sigmas))

    def test_first_generation_spread_on_log_dims_is_in_log_units(self, tmp_path: Path) -> None:
        """On log dimensions σ is in natural-log units: std of ``ln x`` is σ."""
        space = Space([Float(f"r{i}", 1e-3, 1e3, init=1.0, log=True) for i in range(4)])
        self._check_first_generation_spread(tmp_path, space, 0.5, np.full(4, 0.5))

    # -- (g) progress --------------------------------------------------------------------------------
    def test_makes_progress_on_a_sphere(self, tmp_path: Path) -> None:
        if not self.check_progress:
            pytest.skip("progress check switched off for this optimiser (check_progress = False)")
        space = Space([Float(f"x{i}", -5.0, 5.0, init=4.0) for i in range(4)])
        optimizer = self.make(space, self.settings(tmp_path / "opt", popsize=self.progress_popsize))
        history = drive(optimizer, space, self.progress_rounds, self.progress_popsize, failures=False,
                        loss=_shifted_sphere)
        x0_loss = _shifted_sphere(space, space.init_params())
        best = min(_shifted_sphere(space, params) for asked in history for params in asked)
        assert best < self.progress_factor * x0_loss, (
            f"after {self.progress_rounds} rounds of {self.progress_popsize}, the best loss {best:.4g} is not "
            f"below {self.progress_factor} x the loss of x0 ({x0_loss:.4g})")

    def test_recommendation_follows_the_tells(self, tmp_path: Path) -> None:
        """``recommend()`` is what a run reports and validates: it must reflect what was told,
        not stay at x0 (or anywhere else the tells do not lead)."""
        if not self.check_progress:
            pytest.skip("progress check switched off for this optimiser (check_progress = False)")
        space = Space([Float(f"x{i}", -5.0, 5.0, init=4.0) for i in range(4)])
        optimizer = self.make(space, self.settings(tmp_path / "opt", popsize=self.progress_popsize))
        drive(optimizer, space, self.progress_rounds, self.progress_popsize, failures=False, loss=_shifted_sphere)
        recommendation = optimizer.recommend()
        space.validate(recommendation)
        x0_loss = _shifted_sphere(space, space.init_params())
        loss = _shifted_sphere(space, recommendation)
        assert loss < self.recommend_factor * x0_loss, (
            f"after {self.progress_rounds} rounds of {self.progress_popsize} told, recommend() has loss {loss:.4g}, "
            f"not below {self.recommend_factor} x the loss of x0 ({x0_loss:.4g})")

    # -- one dimension -------------------------------------------------------------------------------
    def test_one_dimensional_space(self, tmp_path: Path) -> None:
        space = Space([Float("x", -2.0, 2.0, init=0.5)])
        optimizer = self.make(space, self.settings(tmp_path / "opt", popsize=4))
        history = drive(optimizer, space, 3, 4)
        self._assert_is_x0(space, history[0][0])
        for asked in history:
            for params in asked:
                space.validate(params)
        space.validate(optimizer.recommend())


def _shifted_sphere(space: Space, params: Params) -> float:
    """The progress checks' loss: a sphere centred at -1 in every coordinate."""
    return float(sum((params[name] + 1.0) ** 2 for name in space.names))


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def contract_checks() -> list[str]:
    """Names of the suite's checks, in definition order."""
    return [name for name in vars(OptimizerContract) if name.startswith("test_")]


def check_optimizer_contract(factory: Callable[..., Optimizer] | str, *, options: dict[str, Any] | None = None,
                             skip: Sequence[str] = (), **attributes: Any) -> dict[str, str]:
    """Run every contract check on ``factory`` (a factory, or a registry name) outside pytest's
    collection, each in a fresh temporary folder.

    ``options`` are the factory's keyword options; ``attributes`` override the suite's class
    attributes (``popsize=4``, ``check_progress=False``, ``kinds=...``); ``skip`` names checks to
    leave out. Returns ``{check: "passed" | "skipped: reason"}``; raises ``AssertionError`` (naming
    the check) on the first violation.
    """
    unknown = sorted(set(attributes) - set(dir(OptimizerContract)))
    if unknown:
        raise TypeError(f"unknown contract attributes: {', '.join(unknown)}")
    attrs: dict[str, Any] = dict(attributes, optimizer_options=dict(options or {}))
    if isinstance(factory, str):
        attrs["optimizer_name"] = factory
    else:
        attrs["optimizer_factory"] = factory
    suite = type("AdHocOptimizerContract", (OptimizerContract,), attrs)()
    suite.check_requirements()
    results: dict[str, str] = {}
    for name in contract_checks():
        if name in skip:
            results[name] = "skipped: asked to"
            continue
        with tempfile.TemporaryDirectory(prefix="calibri-contract-") as tmp:
            try:
                getattr(suite, name)(Path(tmp))
            except pytest.skip.Exception as exc:
                results[name] = f"skipped: {exc.msg}"
                continue
            except AssertionError as exc:
                raise AssertionError(f"optimizer contract, {name}: {exc}") from exc
        results[name] = "passed"
    return results
