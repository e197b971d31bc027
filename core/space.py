"""Parameter spaces: ordered, named dimensions with bounds, initial values and step sizes.

A :class:`Space` is the one description of "what is searched" shared by objectives, optimisers
and run storage. Values exchanged with the rest of calibri are plain ``dict[str, value]`` in the
user's units; optimisers that work on vectors use :meth:`Space.to_search` / :meth:`Space.from_search`
(log dimensions are searched in natural-log units, integers as rounded reals).
"""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np

from .errors import ConfigError

Kind = Literal["float", "int", "categorical"]
Params = dict[str, Any]

#: σ used for a dimension that names none, as a fraction of its (search-space) range.
DEFAULT_SIGMA_FRACTION = 0.25


def _finite(name: str, what: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}.{what}", f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name}.{what}", f"must be a finite number, got {value!r}")
    return value


@dataclass(frozen=True)
class Float:
    """A real dimension on ``[low, high]``; ``log`` searches ``ln(x)`` (needs ``low > 0``).

    ``sigma`` is the initial step size in the units searched: user units, or natural-log
    units when ``log`` is set. ``None`` defers to the optimiser's ``sigma`` or a quarter of the range.
    """

    name: str
    low: float
    high: float
    init: float | None = None
    sigma: float | None = None
    log: bool = False
    group: str | None = None
    kind: Kind = field(default="float", init=False)

    def __post_init__(self) -> None:
        low = _finite(self.name, "low", self.low)
        high = _finite(self.name, "high", self.high)
        if low >= high:
            raise ConfigError(f"{self.name}.low", f"low ({low:g}) must be below high ({high:g})")
        if self.log and low <= 0:
            raise ConfigError(f"{self.name}.low", f"a log dimension needs low > 0, got {low:g}")
        init = self.init
        if init is None:  # midpoint (geometric for log), computed without overflow
            init = math.exp((math.log(low) + math.log(high)) / 2) if self.log else low / 2 + high / 2
            init = min(max(init, low), high)
        init = _finite(self.name, "init", init)
        if not low <= init <= high:
            raise ConfigError(f"{self.name}.init", f"init {init:g} is outside [{low:g}, {high:g}]")
        if self.sigma is not None and not (_finite(self.name, "sigma", self.sigma) > 0):
            raise ConfigError(f"{self.name}.sigma", f"sigma must be positive, got {self.sigma:g}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "init", init)

    def to_number(self, value: Any) -> float:
        return float(value)

    def from_number(self, number: float) -> float:
        return float(min(max(float(number), self.low), self.high))

    def contains(self, value: Any) -> bool:
        return (isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
                and self.low <= value <= self.high)


@dataclass(frozen=True)
class Int:
    """An integer dimension on ``[low, high]`` (both included); searched as a rounded real."""

    name: str
    low: int
    high: int
    init: int | None = None
    sigma: float | None = None
    log: bool = False
    group: str | None = None
    kind: Kind = field(default="int", init=False)

    def __post_init__(self) -> None:
        for what in ("low", "high", "init"):
            value = getattr(self, what)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not math.isfinite(value) or int(value) != value):
                raise ConfigError(f"{self.name}.{what}", f"must be an integer, got {value!r}")
        low, high = int(self.low), int(self.high)
        for what, value in (("low", low), ("high", high)):
            if abs(value) > 2**53:  # the vector form is float64
                raise ConfigError(f"{self.name}.{what}", f"must be within ±2**53, got {value}")
        if low >= high:
            raise ConfigError(f"{self.name}.low", f"low ({low}) must be below high ({high})")
        if self.log and low <= 0:
            raise ConfigError(f"{self.name}.low", f"a log dimension needs low > 0, got {low}")
        init = int(self.init) if self.init is not None else (
            int(round(math.sqrt(low * high))) if self.log else (low + high) // 2)
        if not low <= init <= high:
            raise ConfigError(f"{self.name}.init", f"init {init} is outside [{low}, {high}]")
        if self.sigma is not None and not (_finite(self.name, "sigma", self.sigma) > 0):
            raise ConfigError(f"{self.name}.sigma", f"sigma must be positive, got {self.sigma:g}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "init", init)

    def to_number(self, value: Any) -> float:
        return float(value)

    def from_number(self, number: float) -> int:
        return int(min(max(int(round(float(number))), self.low), self.high))

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and self.low <= value <= self.high


@dataclass(frozen=True)
class Categorical:
    """One of ``choices`` (JSON scalars). Vector form is the index of the choice."""

    name: str
    choices: tuple[Any, ...]
    init: Any = None
    group: str | None = None
    kind: Kind = field(default="categorical", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.choices, (list, tuple)):
            raise ConfigError(f"{self.name}.choices", f"must be a list of choices, got {self.choices!r}")
        choices = tuple(self.choices)
        if len(choices) < 2:
            raise ConfigError(f"{self.name}.choices", "needs at least two choices")
        for i, choice in enumerate(choices):
            if not isinstance(choice, (str, int, float, bool)) and choice is not None:
                raise ConfigError(f"{self.name}.choices", f"choice {choice!r} is not a JSON scalar")
            if isinstance(choice, float) and not math.isfinite(choice):
                raise ConfigError(f"{self.name}.choices", f"choice {choice!r} is not a finite number")
            for other in choices[:i]:  # 1 == 1.0 == True and 0.0 == -0.0 would not round-trip
                if choice == other or repr(choice) == repr(other):
                    raise ConfigError(f"{self.name}.choices", f"choices {other!r} and {choice!r} are not distinct")
        init = choices[0] if self.init is None else self.init
        if init not in choices:
            raise ConfigError(f"{self.name}.init", f"init {init!r} is not one of {list(choices)}")
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "init", init)

    def to_number(self, value: Any) -> float:
        return float(self.choices.index(value))

    def from_number(self, number: float) -> Any:
        index = int(min(max(int(round(float(number))), 0), len(self.choices) - 1))
        return self.choices[index]

    def contains(self, value: Any) -> bool:
        return value in self.choices


Dim = Union[Float, Int, Categorical]


class Space:
    """An ordered set of named dimensions.

    Round trips are exact: ``from_vector(to_vector(p)) == p`` and ``from_json(to_json(p)) == p``
    for every ``p`` inside the space.
    """

    def __init__(self, dims: Iterable[Dim]) -> None:
        self.dims: tuple[Dim, ...] = tuple(dims)
        if not self.dims:
            raise ConfigError("space", "a space needs at least one dimension")
        seen: set[str] = set()
        for dim in self.dims:
            if not isinstance(dim.name, str) or not dim.name:
                raise ConfigError("space", f"dimension names must be non-empty strings, got {dim.name!r}")
            if dim.name in seen:
                raise ConfigError(f"space.{dim.name}", "duplicate dimension name")
            seen.add(dim.name)
        self._index = {dim.name: i for i, dim in enumerate(self.dims)}

    # -- description ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.dims)

    def __iter__(self):
        return iter(self.dims)

    def __getitem__(self, name: str) -> Dim:
        return self.dims[self._index[name]]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Space) and self.dims == other.dims

    def __repr__(self) -> str:
        return f"Space({len(self)} dims: {', '.join(self.names[:5])}{', ...' if len(self) > 5 else ''})"

    @property
    def names(self) -> list[str]:
        return [dim.name for dim in self.dims]

    @property
    def kinds(self) -> set[str]:
        return {dim.kind for dim in self.dims}

    @property
    def groups(self) -> dict[str, list[str]]:
        """Dimension names by group; ungrouped dimensions are left out."""
        out: dict[str, list[str]] = {}
        for dim in self.dims:
            if dim.group is not None:
                out.setdefault(dim.group, []).append(dim.name)
        return out

    def init_params(self) -> Params:
        return {dim.name: dim.init for dim in self.dims}

    # -- checking -----------------------------------------------------------------------------
    def check_kinds(self, supported: Iterable[str], who: str) -> None:
        """Raise a :class:`ConfigError` if ``who`` cannot search some dimension of this space."""
        supported = set(supported)
        for dim in self.dims:
            if dim.kind not in supported:
                raise ConfigError(
                    f"space.{dim.name}",
                    f"{who} cannot search {dim.kind} dimensions (it handles: {', '.join(sorted(supported))})",
                )

    def validate(self, params: Mapping[str, Any]) -> None:
        if set(params) != set(self._index):
            missing = sorted(set(self._index) - set(params))
            extra = sorted(set(params) - set(self._index))
            raise ValueError(f"params do not match the space (missing {missing}, unexpected {extra})")
        for dim in self.dims:
            if not dim.contains(params[dim.name]):
                raise ValueError(f"{dim.name}={params[dim.name]!r} is outside the space")

    # -- user-space encodings -----------------------------------------------------------------
    def to_vector(self, params: Mapping[str, Any]) -> np.ndarray:
        """User values as float64 (categoricals as choice index)."""
        return np.array([dim.to_number(params[dim.name]) for dim in self.dims], dtype=np.float64)

    def from_vector(self, vector: Sequence[float] | np.ndarray) -> Params:
        """The inverse of :meth:`to_vector`; rounds integers, clips into bounds."""
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (len(self),):
            raise ValueError(f"expected a vector of length {len(self)}, got shape {vector.shape}")
        return {dim.name: dim.from_number(x) for dim, x in zip(self.dims, vector)}

    def to_json(self, params: Mapping[str, Any]) -> str:
        return json.dumps(to_jsonable(params, self))

    def from_json(self, text: str) -> Params:
        data = json.loads(text)
        return {dim.name: _from_jsonable(dim, data[dim.name]) for dim in self.dims}

    # -- search coordinates for vector optimisers --------------------------------------------
    def _search_transform(self, dim: Dim, value: float) -> float:
        return math.log(value) if getattr(dim, "log", False) else float(value)

    def search_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lows, highs = [], []
        for dim in self.dims:
            if isinstance(dim, Categorical):
                lows.append(-0.5)
                highs.append(len(dim.choices) - 0.5)
            else:
                lows.append(self._search_transform(dim, dim.low))
                highs.append(self._search_transform(dim, dim.high))
        return np.array(lows), np.array(highs)

    def search_x0(self) -> np.ndarray:
        return self.to_search(self.init_params())

    def search_sigmas(self, default: float | None = None) -> np.ndarray:
        """Per-dimension step sizes in search units: the dimension's own, else ``default``,
        else :data:`DEFAULT_SIGMA_FRACTION` of the range."""
        lows, highs = self.search_bounds()
        out = []
        for dim, low, high in zip(self.dims, lows, highs):
            own = getattr(dim, "sigma", None)
            out.append(own if own is not None else default if default is not None
                       else DEFAULT_SIGMA_FRACTION * (high - low))
        return np.array(out, dtype=np.float64)

    def to_search(self, params: Mapping[str, Any]) -> np.ndarray:
        return np.array(
            [self._search_transform(dim, dim.to_number(params[dim.name])) if not isinstance(dim, Categorical)
             else dim.to_number(params[dim.name]) for dim in self.dims],
            dtype=np.float64,
        )

    def from_search(self, z: Sequence[float] | np.ndarray) -> Params:
        """Map search coordinates back to user values (inverse log, rounding, clipping)."""
        z = np.asarray(z, dtype=np.float64)
        if z.shape != (len(self),):
            raise ValueError(f"expected a vector of length {len(self)}, got shape {z.shape}")
        out: Params = {}
        for dim, x in zip(self.dims, z):
            if getattr(dim, "log", False):  # clip to the exact bounds, not exp(log(bound))
                x = dim.low if x <= math.log(dim.low) else dim.high if x >= math.log(dim.high) else math.exp(x)
            out[dim.name] = dim.from_number(x)
        return out

    # -- config form --------------------------------------------------------------------------
    def to_config(self) -> dict[str, dict[str, Any]]:
        """The ``space:`` YAML mapping that rebuilds this space."""
        out: dict[str, dict[str, Any]] = {}
        for dim in self.dims:
            entry: dict[str, Any] = {"type": dim.kind}
            if isinstance(dim, Categorical):
                entry.update(choices=list(dim.choices), init=dim.init)
            else:
                entry.update(low=dim.low, high=dim.high, init=dim.init)
                if dim.sigma is not None:
                    entry["sigma"] = dim.sigma
                if dim.log:
                    entry["log"] = True
            if dim.group is not None:
                entry["group"] = dim.group
            out[dim.name] = entry
        return out

    @classmethod
    def from_config(cls, mapping: Mapping[str, Mapping[str, Any]]) -> "Space":
        """Build from the ``space:`` YAML mapping. ``size: n`` expands a float/int entry into
        ``name[0] ... name[n-1]``."""
        dims: list[Dim] = []
        for name, entry in mapping.items():
            entry = dict(entry)
            kind = entry.pop("type", "float")
            size = entry.pop("size", None)
            builder = {"float": Float, "int": Int, "categorical": Categorical}.get(kind)
            if builder is None:
                raise ConfigError(f"space.{name}.type", f"unknown type {kind!r} (use float, int or categorical)")
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ConfigError(f"space.{name}.size", f"must be a positive integer, got {size!r}")
            names = [name] if size is None else [f"{name}[{i}]" for i in range(int(size))]
            for dim_name in names:
                try:
                    dims.append(builder(name=dim_name, **entry))
                except TypeError as exc:
                    raise ConfigError(f"space.{name}", _unexpected_argument(exc)) from None
                except ConfigError as exc:
                    raise ConfigError(f"space.{exc.field}", exc.message) from None
        return cls(dims)


def _unexpected_argument(exc: TypeError) -> str:
    text = str(exc)
    if "unexpected keyword argument" in text:
        return "unknown key " + text.split("argument", 1)[1].strip()
    if "missing" in text:
        return "missing " + text.split("missing", 1)[1].strip()
    return text


def to_jsonable(params: Mapping[str, Any], space: Space | None = None) -> dict[str, Any]:
    """Plain Python scalars (no numpy types) so ``json.dumps`` writes exact, portable values."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, np.generic):
            value = value.item()
        out[name] = value
    return out


def _from_jsonable(dim: Dim, value: Any) -> Any:
    if isinstance(dim, Float):
        return float(value)
    if isinstance(dim, Int):
        return int(value)
    return value
