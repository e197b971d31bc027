"""Reading a reward server's pickled answer without letting it run code.

Unpickling calls whatever callables the bytes name, so a hostile or compromised server could run
anything in the calibration process. :func:`loads` uses an unpickler whose ``find_class``
returns none of the named callables: the answer may hold only what pickle builds with its own
opcodes — dicts, lists, tuples, sets, strings, bytes, numbers, booleans and None.

The one exception is NumPy numbers and arrays of plain numeric dtypes (bool, signed and unsigned
integers, floats; of 1–8 bytes, either byte order), because Flow-GRPO's servers compute their
scores with NumPy. Their pickles name ``numpy.dtype``, ``numpy.ndarray``, ``…multiarray.scalar``,
``…multiarray._reconstruct``, ``…numeric._frombuffer`` (protocol 5) and ``_codecs.encode``
(protocol 2 bytes); in their place the unpickler returns stand-ins of its own that only check a
dtype string and decode raw bytes (``numpy.frombuffer``) — NumPy's callables are never given to
the pickle machine. Arrays become lists and NumPy numbers Python numbers, so the
result holds plain Python values only. Object arrays, structured, string and datetime dtypes, and
every other class are refused with :class:`UnsafePickleError`.
"""
from __future__ import annotations

import io
import math
import pickle
import re
from typing import Any

import numpy as np

#: Modules NumPy pickles its arrays and dtypes from (1.x and 2.x layouts).
_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric")
#: A plain numeric dtype: byte order, kind (bool, int, uint, float), size in bytes.
_DTYPE = re.compile(r"([<>|=]?)(b1|[iu][1248]|f[248])")
#: Largest array accepted, in elements.
MAX_ELEMENTS = 50_000_000


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names something other than plain data (or holds a malformed NumPy value)."""


class _Dtype:
    """Stand-in for ``numpy.dtype(name, align, copy)``: a plain numeric dtype, else refused."""

    def __init__(self, name: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(name, str) or _DTYPE.fullmatch(name) is None:
            raise UnsafePickleError(f"refusing NumPy dtype {name!r}: only plain numeric dtypes are accepted")
        self.name, self.order = name, "="

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise UnsafePickleError("malformed NumPy dtype state")
        if any(item is not None for item in state[2:5]):  # subarray, names, fields
            raise UnsafePickleError("refusing a structured NumPy dtype")
        self.order = state[1]

    def numpy(self) -> np.dtype:
        match = _DTYPE.fullmatch(self.name)
        assert match is not None
        order = match.group(1) or self.order
        return np.dtype((order if order in "<>" else "=") + match.group(2))


class _ArrayStub:
    """Stand-in for ``_reconstruct(ndarray, shape, typecode)``; ``__setstate__`` fills it."""

    def __init__(self) -> None:
        self.value: list[Any] | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickleError("malformed NumPy array state")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _Dtype) or not isinstance(raw, (bytes, bytearray)):
            raise UnsafePickleError("refusing a NumPy array that is not of a plain numeric dtype")
        if (not isinstance(shape, tuple) or not all(isinstance(n, int) and 0 <= n for n in shape)
                or math.prod(shape) > MAX_ELEMENTS):
            raise UnsafePickleError(f"malformed or too large NumPy array shape {shape!r}")
        kind = dtype.numpy()
        count = math.prod(shape)
        if len(raw) != count * kind.itemsize:
            raise UnsafePickleError("NumPy array data does not match its shape")
        array = np.frombuffer(bytes(raw), dtype=kind, count=count)
        self.value = array.reshape(shape, order="F" if fortran else "C").tolist()


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayStub:
    if cls is not _NDARRAY:
        raise UnsafePickleError("refusing a NumPy reconstruction of anything but an ndarray")
    return _ArrayStub()


def _scalar(dtype: Any, raw: Any = None) -> Any:
    if not isinstance(dtype, _Dtype) or not isinstance(raw, (bytes, bytearray)):
        raise UnsafePickleError("refusing a NumPy scalar that is not of a plain numeric dtype")
    kind = dtype.numpy()
    if len(raw) != kind.itemsize:
        raise UnsafePickleError("malformed NumPy scalar")
    return np.frombuffer(bytes(raw), dtype=kind, count=1)[0].item()


def _frombuffer(raw: Any, dtype: Any, shape: Any, order: Any = "C") -> _ArrayStub:
    stub = _ArrayStub()
    stub.__setstate__((1, shape, dtype, order == "F", bytes(raw) if isinstance(raw, bytearray) else raw))
    return stub


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: protocol 2 writes bytes as latin-1 text."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("refusing _codecs.encode other than str → latin-1 bytes")
    return text.encode("latin-1")


def _set(items: Any = ()) -> set:
    if not isinstance(items, (list, tuple)):
        raise UnsafePickleError("refusing a set built from anything but a list")
    return set(items)


def _frozenset(items: Any = ()) -> frozenset:
    return frozenset(_set(items))


def _empty_bytes(*args: Any) -> bytes:
    if args:
        raise UnsafePickleError("refusing bytes() with arguments")
    return b""


_BUILTINS = {"set": _set, "frozenset": _frozenset, "bytes": _empty_bytes}
_NDARRAY = object()  # what ``numpy.ndarray`` resolves to: a marker, never a class
_STAND_INS = {"dtype": _Dtype, "ndarray": _NDARRAY, "_reconstruct": _reconstruct, "scalar": _scalar,
              "_frombuffer": _frombuffer}


class RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global except NumPy's numeric array/scalar path, which it replaces."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _NUMPY_MODULES and name in _STAND_INS:
            return _STAND_INS[name]
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return _BUILTINS[name]  # protocols 0–2 write sets as set(list), b"" as bytes()
        raise UnsafePickleError(f"refusing to load {module}.{name}: only plain data is accepted")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a persistent reference")


def loads(data: bytes) -> Any:
    """Plain Python data from ``data``; :class:`UnsafePickleError` for anything else."""
    try:
        result = RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, RecursionError, UnicodeDecodeError) as exc:
        raise UnsafePickleError(f"not a readable pickle: {type(exc).__name__}: {exc}") from None
    return _plain(result)


def _plain(value: Any, depth: int = 0) -> Any:
    """Stand-ins replaced by their values; anything but plain data refused."""
    if depth > 64:
        raise UnsafePickleError("the answer nests too deeply")
    if isinstance(value, _ArrayStub):
        if value.value is None:
            raise UnsafePickleError("malformed NumPy array (no data)")
        return value.value
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(item, depth + 1) for item in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, (set, frozenset)):
        return type(value)(_plain(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return {_plain(key, depth + 1): _plain(item, depth + 1) for key, item in value.items()}
    raise UnsafePickleError(f"refusing a {type(value).__name__} in the answer: only plain data is accepted")


__all__ = ["MAX_ELEMENTS", "RestrictedUnpickler", "UnsafePickleError", "loads"]
