"""Several rewards as one: :class:`CombinedReward`, and :func:`build_reward` from a config spec.

Two ways to combine, chosen by ``mode``:

* ``"sum"`` — the raw weighted sum ``Σ wᵢ · sᵢ · rᵢ``, where ``sᵢ`` is +1 for a reward whose
  direction is the combination's and −1 otherwise. A combination is higher-is-better as soon as
  one of its components is, so a lower-is-better component (e.g. ``total_variation``) next to a
  higher-is-better one enters negated; a combination of lower-is-better components only is itself
  lower-is-better, and its total their plain weighted sum (``reward: [total_variation]`` scores
  and is optimised like ``reward: total_variation``). With only higher-is-better components this
  is exactly Flow-GRPO's ``multi_score`` total (its ``"avg"``). Scales add up as they are: a
  reward in the thousands (``sharpness``) drowns one in [0, 1] unless the weights compensate.
* ``"standardized"`` — each reward is first turned into a z-score against a *baseline*:
  ``Σ wᵢ · sᵢ · (rᵢ − μᵢ) / σᵢ``. The weights then say how many baseline standard deviations of
  one reward are worth one of another, whatever the rewards' units. The baseline (μᵢ, σᵢ: mean and
  population standard deviation of each reward over a set of images) comes from, in order:

  1. ``baseline=`` given explicitly (``{name: {"mean": μ, "std": σ}}``);
  2. :meth:`CombinedReward.calibrate` on images you choose — typically the baseline model's
     round-0 images;
  3. otherwise, the first batch scored (``auto_calibrate=True``, the default): that batch's
     statistics are taken and then frozen.

  Whichever it was, the baseline is part of :meth:`CombinedReward.state_dict`, so a resumed run
  restores it with :meth:`CombinedReward.load_state_dict` and scores exactly as before. Where
  several processes score images, give the baseline or calibrate before handing the reward out:
  otherwise each process would freeze the statistics of its own first batch.
  A reward constant over the baseline images (σ = 0) is only centred (σ taken as 1), with a
  warning.

In both modes :meth:`CombinedReward.score_with_details` also returns every component's raw scores
(as the component returns them: not negated, not standardised) for a run's metrics. A weight of 0
keeps a reward in those details without optimising it.

Specs accepted by :func:`build_reward` (YAML or Python)::

    reward: pickscore                                       # one reward by name
    reward: {name: jpeg_compressibility, options: {quality: 90}}
    reward: {pickscore: 1.0, ocr: 0.2}                      # Flow-GRPO style: name → weight (sum)
    reward:                                                 # a list of components (sum)
      - {name: sharpness, weight: 0.5}
      - {name: total_variation, weight: 1.0}
      - colorfulness                                        # weight 1
    reward:                                                 # any mode
      mode: standardized
      components: {sharpness: 1.0, colorfulness: 1.0}
      baseline: {sharpness: {mean: 310.0, std: 95.0}, colorfulness: {mean: 30.0, std: 12.0}}

A component entry may carry ``label:`` to use one reward twice (labels name the details); in the
mapping forms the key is the label, and ``name:`` inside the entry picks the reward. The same
mapping (``components``, ``mode``, ``baseline``, ``auto_calibrate``) is the option set of the
``combined`` reward (registered with the offline rewards), for code that builds rewards straight
from the registry.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import ConfigError, PluginError
from .base import Reward, batch_text, to_canonical

MODES = ("sum", "standardized")
_MODE_ALIASES = {"sum": "sum", "standardized": "standardized", "standardised": "standardized"}
STATE_FORMAT = "calibri.combined_reward"
STATE_VERSION = 1


class CombinedReward(Reward):
    """A weighted combination of named rewards (see the module's docstring): higher is better if
    any component's is, lower is better if every component's is.

    ``rewards`` maps a label to a :class:`~calibri.rewards.base.Reward`; ``weights`` maps labels to
    finite numbers (missing ones are 1). ``mode`` is ``"sum"`` or ``"standardized"``;
    ``baseline`` optionally gives the standardisation statistics, ``{label: {"mean", "std"}}``
    (or ``(mean, std)`` pairs); ``auto_calibrate`` lets the first scored batch set them when
    neither ``baseline`` nor :meth:`calibrate` did.

    Each component scores the whole batch with its own ``batch_size`` on its own device.
    ``uses_prompt`` is true if any component uses the prompt, and ``needs`` is the first component
    need other than ``"cpu"`` (else ``"cpu"``).
    """

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float] | None = None, *,
                 mode: str = "sum", baseline: Mapping[str, Any] | None = None,
                 auto_calibrate: bool = True) -> None:
        super().__init__()
        if not isinstance(rewards, Mapping) or not rewards:
            raise ValueError("CombinedReward needs a non-empty mapping of label → reward")
        for label, reward in rewards.items():
            if not isinstance(label, str) or not label:
                raise ValueError(f"reward labels must be non-empty strings, got {label!r}")
            if not isinstance(reward, Reward):
                raise TypeError(f"component {label!r} is a {type(reward).__name__}, not a calibri Reward")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(rewards))
        if unknown:
            raise ValueError(f"weights for unknown components {unknown} (components: {sorted(rewards)})")
        if mode not in _MODE_ALIASES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.rewards: dict[str, Reward] = dict(rewards)
        self.weights: dict[str, float] = {label: _weight(weights.get(label, 1.0), label) for label in self.rewards}
        self.mode = _MODE_ALIASES[mode]
        self.auto_calibrate = bool(auto_calibrate)
        self.uses_prompt = any(reward.uses_prompt for reward in self.rewards.values())
        self.needs = next((reward.needs for reward in self.rewards.values() if reward.needs != "cpu"), "cpu")
        directions = {label: bool(reward.higher_is_better) for label, reward in self.rewards.items()}
        self.higher_is_better = any(directions.values())
        self._signs = {label: 1.0 if higher == self.higher_is_better else -1.0 for label, higher in directions.items()}
        self._baseline: dict[str, tuple[float, float]] | None = None
        self.baseline_source: str | None = None
        if baseline is not None:
            self.set_baseline(baseline)

    # -- the baseline ----------------------------------------------------------------------------
    @property
    def baseline(self) -> dict[str, dict[str, float]] | None:
        """``{label: {"mean": μ, "std": σ}}`` used by the standardized mode, or None while unset."""
        if self._baseline is None:
            return None
        return {label: {"mean": mean, "std": std} for label, (mean, std) in self._baseline.items()}

    def set_baseline(self, baseline: Mapping[str, Any], source: str = "explicit") -> None:
        """Set the standardisation statistics for every component (and freeze them)."""
        if not isinstance(baseline, Mapping):
            raise ValueError(f"baseline must map component labels to {{mean, std}}, got {type(baseline).__name__}")
        missing = sorted(set(self.rewards) - set(baseline))
        extra = sorted(set(baseline) - set(self.rewards))
        if missing or extra:
            raise ValueError(f"baseline must cover exactly the components {sorted(self.rewards)}"
                             + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
        stats: dict[str, tuple[float, float]] = {}
        for label in self.rewards:
            entry = baseline[label]
            if isinstance(entry, Mapping):
                if set(entry) != {"mean", "std"}:
                    raise ValueError(f"baseline[{label!r}] must have exactly the keys mean and std, got {sorted(entry)}")
                mean, std = entry["mean"], entry["std"]
            elif isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2:
                mean, std = entry
            else:
                raise ValueError(f"baseline[{label!r}] must be {{mean, std}} or a (mean, std) pair, got {entry!r}")
            mean, std = _number(mean, f"baseline[{label!r}].mean"), _number(std, f"baseline[{label!r}].std")
            if std <= 0:
                raise ValueError(f"baseline[{label!r}].std must be positive, got {std}")
            stats[label] = (mean, std)
        self._baseline = stats
        self.baseline_source = source

    def calibrate(self, images: Any, prompts: Sequence[str] | None = None,
                  metadata: Sequence[Mapping[str, Any]] | None = None) -> dict[str, dict[str, float]]:
        """Set the baseline from these images (at least 2): each component's mean and population
        standard deviation over them. Replaces any earlier baseline; returns it."""
        per_reward = self._score_components(images, prompts, metadata)
        self._calibrate_from(per_reward, source="calibrate")
        return self.baseline  # type: ignore[return-value]

    def _calibrate_from(self, per_reward: Mapping[str, np.ndarray], source: str) -> None:
        n = len(next(iter(per_reward.values())))
        if n < 2:
            raise ValueError(f"calibrating a standardized reward needs at least 2 images, got {n}")
        stats: dict[str, dict[str, float]] = {}
        for label, scores in per_reward.items():
            if not np.isfinite(scores).all():
                raise ValueError(f"cannot calibrate on non-finite {label!r} scores")
            mean, std = float(np.mean(scores)), float(np.std(scores))
            if not std > 1e-12 * max(1.0, abs(mean)):
                warnings.warn(f"reward {label!r} is constant ({mean:.6g}) over the {n} calibration images: it is "
                              "only centred (std taken as 1)", RuntimeWarning, stacklevel=3)
                std = 1.0
            stats[label] = {"mean": mean, "std": std}
        self.set_baseline(stats, source=source)

    # -- scoring -----------------------------------------------------------------------------------
    def _score_components(self, images: Any, prompts: Sequence[str] | None,
                          metadata: Sequence[Mapping[str, Any]] | None) -> dict[str, np.ndarray]:
        canonical = to_canonical(images)
        n = canonical.shape[0]
        prompts, metadata = batch_text(n, prompts, metadata)
        return {label: np.asarray(reward(canonical, prompts, metadata), dtype=np.float64)
                for label, reward in self.rewards.items()}

    def contributions(self, per_reward: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each component's signed, weighted (and in standardized mode standardised) term of the
        total; the total is their sum, in the components' order."""
        if self.mode == "standardized" and self._baseline is None:
            raise RuntimeError("the standardized mode needs a baseline: pass baseline=, call calibrate(), "
                               "or leave auto_calibrate on and score a batch")
        terms: dict[str, np.ndarray] = {}
        for label in self.rewards:
            values = np.asarray(per_reward[label], dtype=np.float64)
            if self.mode == "standardized":
                mean, std = self._baseline[label]  # type: ignore[index]
                values = (values - mean) / std
            terms[label] = self.weights[label] * self._signs[label] * values
        return terms

    def combine(self, per_reward: Mapping[str, np.ndarray]) -> np.ndarray:
        """The total of raw per-component scores (as :meth:`score_with_details` returns them)."""
        terms = list(self.contributions(per_reward).values())
        total = np.zeros_like(terms[0])
        for term in terms:
            total = total + term
        return total

    def score_with_details(self, images: Any, prompts: Sequence[str] | None = None,
                           metadata: Sequence[Mapping[str, Any]] | None = None
                           ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(total, per_reward)``: the combined float64 scores, one per image, and each component's
        raw scores by label. In standardized mode without a baseline, this batch (of at least 2
        images) calibrates it first (``auto_calibrate``)."""
        per_reward = self._score_components(images, prompts, metadata)
        if self.mode == "standardized" and self._baseline is None and self.auto_calibrate:
            self._calibrate_from(per_reward, source="first call")
        return self.combine(per_reward), per_reward

    def __call__(self, images: Any, prompts: Sequence[str] | None = None,
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        """The combined scores (the components batch the images themselves)."""
        return self.score_with_details(images, prompts, metadata)[0]

    def score(self, images, prompts, metadata):
        return self.score_with_details(images, prompts, metadata)[0]

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to score identically (JSON-serialisable): the mode, weights,
        directions, and the baseline with where it came from; nested combinations' states too."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "mode": self.mode,
            "weights": dict(self.weights),
            "higher_is_better": {label: bool(r.higher_is_better) for label, r in self.rewards.items()},
            "baseline": self.baseline,
            "baseline_source": self.baseline_source,
            "components": {label: r.state_dict() for label, r in self.rewards.items() if isinstance(r, CombinedReward)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s baseline. The mode, labels, weights and directions must
        match this object's (a resumed run must combine the same way): ``ValueError`` otherwise."""
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a {STATE_FORMAT} state of version {STATE_VERSION}: "
                             f"{state.get('format')!r} version {state.get('version')!r}")
        mine = self.state_dict()
        for key in ("mode", "weights", "higher_is_better"):
            if state[key] != mine[key]:
                raise ValueError(f"the saved combined reward differs in {key}: saved {state[key]!r}, "
                                 f"now {mine[key]!r}")
        children = state.get("components", {})
        if set(children) != set(mine["components"]):
            raise ValueError(f"the saved combined reward nests {sorted(children)}, this one {sorted(mine['components'])}")
        for label, child in children.items():
            self.rewards[label].load_state_dict(child)  # type: ignore[attr-defined]
        if state["baseline"] is None:
            self._baseline, self.baseline_source = None, None
        else:
            self.set_baseline(state["baseline"], source=state.get("baseline_source") or "explicit")

    def __repr__(self) -> str:
        parts = ", ".join(f"{label}×{self.weights[label]:g}" for label in self.rewards)
        return f"CombinedReward({parts}, mode={self.mode!r})"


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


def _weight(value: Any, label: str) -> float:
    return _number(value, f"the weight of {label!r}")


# -- building from a spec ------------------------------------------------------------------------
_COMBINED_KEYS = ("components", "mode", "baseline", "auto_calibrate")


def build_reward(spec: Any, registry: Any = None, *, field: str = "reward", device: str | None = None) -> Reward:
    """A :class:`~calibri.rewards.base.Reward` from a spec (see the module's docstring).

    ``registry`` defaults to :func:`calibri.core.plugins.get_registry`. ``field`` is the spec's
    dotted path in the config, used in errors. ``device`` is passed to every reward factory that
    takes a ``device`` argument and whose options do not set one. Mistakes in the spec raise
    :class:`~calibri.core.errors.ConfigError` naming the field (an unknown name lists the
    available rewards); a factory returning something other than a Reward raises
    :class:`~calibri.core.errors.PluginError`.
    """
    if registry is None:
        from ..core.plugins import get_registry

        registry = get_registry()
    if isinstance(spec, str):
        return _build_one(spec, {}, registry, field, device, name_field=field)
    if isinstance(spec, Mapping):
        if "name" in spec:
            _only_keys(spec, ("name", "options"), field)
            options = spec.get("options") or {}
            if not isinstance(options, Mapping):
                raise ConfigError(f"{field}.options", f"expected a mapping of options, got {options!r}")
            return _build_one(spec["name"], options, registry, field, device, name_field=f"{field}.name")
        if "components" in spec:
            _only_keys(spec, _COMBINED_KEYS, field)
            return _build_combined(spec, registry, field, device)
        return _build_combined({"components": spec}, registry, field, device, components_field=field)
    if isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        return _build_combined({"components": spec}, registry, field, device, components_field=field)
    raise ConfigError(field, "expected a reward name, {name, options}, or a list or mapping of rewards with "
                             f"weights, got {type(spec).__name__} {spec!r}")


def _only_keys(spec: Mapping[str, Any], allowed: Sequence[str], field: str) -> None:
    extra = sorted(str(key) for key in set(spec) - set(allowed))
    if extra:
        raise ConfigError(f"{field}.{extra[0]}", f"unknown key (allowed: {', '.join(allowed)})")


def _build_one(name: Any, options: Mapping[str, Any], registry: Any, field: str, device: str | None,
               name_field: str) -> Reward:
    from ..core.options import validate_options
    from ..core.plugins import build_from

    if not isinstance(name, str) or not name:
        raise ConfigError(name_field, f"expected a reward name, got {name!r}")
    registration = registry.get("rewards", name, name_field)
    if registration.factory is combined:  # keep precise field paths for nested components
        _only_keys(options, _COMBINED_KEYS + ("device",), f"{field}.options")
        if "components" not in options:
            raise ConfigError(f"{field}.options.components", "field required")
        return _build_combined(options, registry, f"{field}.options", options.get("device", device))
    options = validate_options(registration.factory, options, f"{field}.options")
    if device is not None and "device" not in options and _accepts(registration.factory, "device"):
        options["device"] = device
    try:
        reward = build_from(registration, registration.factory, **options)
    except ValueError as exc:
        raise ConfigError(f"{field}.options", f"reward {name!r}: {exc}") from None
    if not isinstance(reward, Reward):
        raise PluginError(f"reward {name!r} (from plugin {registration.plugin!r}) built a "
                          f"{type(reward).__name__}, not a calibri.rewards.base.Reward")
    return reward


@dataclass(frozen=True)
class _Entry:
    """One component of a spec, with the config paths of its parts (for errors)."""

    label: str
    name: Any
    weight: Any
    options: Any
    field: str
    name_field: str
    weight_field: str


def _build_combined(spec: Mapping[str, Any], registry: Any, field: str, device: str | None,
                    components_field: str | None = None) -> CombinedReward:
    entries = _component_entries(spec["components"], components_field or f"{field}.components")
    rewards: dict[str, Reward] = {}
    weights: dict[str, float] = {}
    for entry in entries:
        if entry.label in rewards:
            raise ConfigError(entry.field, f"component {entry.label!r} appears twice; give one of them a distinct "
                                           "label")
        weight = entry.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(entry.weight_field, f"expected a finite number as the weight, got {weight!r}")
        if not isinstance(entry.options, Mapping):
            raise ConfigError(f"{entry.field}.options", f"expected a mapping of options, got {entry.options!r}")
        rewards[entry.label] = _build_one(entry.name, entry.options, registry, entry.field, device,
                                          name_field=entry.name_field)
        weights[entry.label] = float(weight)
    mode = spec.get("mode", "sum")
    if mode not in _MODE_ALIASES:
        raise ConfigError(f"{field}.mode", f"expected one of {', '.join(MODES)}, got {mode!r}")
    auto_calibrate = spec.get("auto_calibrate", True)
    if not isinstance(auto_calibrate, bool):
        raise ConfigError(f"{field}.auto_calibrate", f"expected true or false, got {auto_calibrate!r}")
    try:
        return CombinedReward(rewards, weights, mode=mode, baseline=spec.get("baseline"),
                              auto_calibrate=auto_calibrate)
    except ValueError as exc:
        raise ConfigError(f"{field}.baseline", str(exc)) from None


def _component_entries(components: Any, field: str) -> list[_Entry]:
    out: list[_Entry] = []
    if isinstance(components, Mapping):
        for key, value in components.items():
            label, where = str(key), f"{field}.{key}"
            if isinstance(value, Mapping):
                _only_keys(value, ("name", "weight", "options"), where)
                out.append(_Entry(label, value.get("name", label), value.get("weight", 1.0),
                                  value.get("options") or {}, where,
                                  f"{where}.name" if "name" in value else where, f"{where}.weight"))
            else:
                out.append(_Entry(label, label, value, {}, where, where, where))
    elif isinstance(components, Sequence) and not isinstance(components, (str, bytes, bytearray)):
        for i, item in enumerate(components):
            where = f"{field}[{i}]"
            if isinstance(item, str):
                out.append(_Entry(item, item, 1.0, {}, where, where, where))
            elif isinstance(item, Mapping):
                _only_keys(item, ("name", "label", "weight", "options"), where)
                if "name" not in item:
                    raise ConfigError(f"{where}.name", "field required")
                label = item.get("label", item["name"])
                if not isinstance(label, str) or not label:
                    raise ConfigError(f"{where}.label", f"expected a non-empty string, got {label!r}")
                out.append(_Entry(label, item["name"], item.get("weight", 1.0), item.get("options") or {}, where,
                                  f"{where}.name", f"{where}.weight"))
            else:
                raise ConfigError(where, f"expected a reward name or {{name, weight, options}}, got {item!r}")
    else:
        raise ConfigError(field, f"expected a list or mapping of rewards, got {type(components).__name__}")
    if not out:
        raise ConfigError(field, "needs at least one reward")
    return out


def _accepts(factory: Any, parameter: str) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return parameter in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def combined(components: Any, mode: str = "sum", baseline: Any = None, auto_calibrate: bool = True,
             device: str | None = None) -> CombinedReward:
    """Several rewards with weights: raw weighted sum or sum of standardised scores."""
    spec = {"components": components, "mode": mode, "baseline": baseline, "auto_calibrate": auto_calibrate}
    from ..core.plugins import get_registry

    return _build_combined(spec, get_registry(), "combined", device)


__all__ = ["MODES", "CombinedReward", "build_reward", "combined"]
