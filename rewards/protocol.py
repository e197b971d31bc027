"""The reward-server wire format (protocol version 1), shared by the server and the client.

No pickle anywhere: a request is plain JSON plus numpy's ``.npy`` array format, whose header is a
Python literal read with :func:`ast.literal_eval` (never code), and only ``uint8`` and ``float32``
arrays are accepted (an object array cannot even be described).

``POST /score`` — body (``Content-Type: application/x-calibri-reward``, ``Content-Length``
required)::

    {"prompts": ["a red fox", ...], "layout": "nchw"}\\n      <- one line of UTF-8 JSON, then b"\\n"
    \\x93NUMPY...                                              <- the images, an .npy file (np.save)

The JSON header (all keys optional):

``prompts``
    list of strings, one per image (default: empty prompts; required if the reward uses them).
``metadata``
    list of JSON objects, one per image (default: ``{}`` each).
``layout``
    ``"nhwc"`` (default: N×H×W×3, as images are stored) or ``"nchw"`` (N×3×H×W, the canonical
    tensor layout).
``protocol``
    the protocol version the client speaks; only ``1`` exists.

The array is ``uint8`` (0–255) or ``float32`` with every value in [0, 1] (no NaN), 4-D, three
channels where the layout puts them, at least one image of at least 1×1 pixels. ``float32`` is
lossless for the canonical images; ``uint8`` is four times smaller and exact for images that
were 8-bit to begin with.

Authentication (optional, for servers reachable from other machines): a server started with a
token answers ``/score`` and ``/info`` with 401 unless the request carries
``Authorization: Bearer TOKEN``; ``/health`` stays open. A token is printable ASCII without
spaces; both sides can read it from :data:`TOKEN_ENV`.

Response: ``{"scores": [...], "higher_is_better": ..., "reward": NAME, "count": N,
"elapsed_ms": ..., "queue_ms": ..., "score_ms": ...}``; a non-finite score is sent as ``null``.
Errors: ``{"error": "...", "status": CODE}`` with a 4xx (the request is wrong) or 5xx (the server
or the reward failed) status.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

PROTOCOL_VERSION = 1
CONTENT_TYPE = "application/x-calibri-reward"
LAYOUTS = ("nhwc", "nchw")
DTYPES = ("uint8", "float32")
HEADER_KEYS = ("prompts", "metadata", "layout", "protocol")
#: Longest JSON header line accepted (prompts and metadata of a whole batch).
MAX_HEADER_BYTES = 8 * 1024 * 1024
#: Longest .npy header accepted (numpy's own default).
MAX_NPY_HEADER_BYTES = 10_000
#: The environment variable holding the shared token, read by the server command and the client.
TOKEN_ENV = "CALIBRI_REWARD_TOKEN"
#: Longest token accepted (it travels in every request's headers).
MAX_TOKEN_CHARS = 4096


class ProtocolError(Exception):
    """A request the server rejects: ``status`` (4xx) and a one-line message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_token(token: Any, field: str) -> str:
    """``token`` without surrounding whitespace, if it can travel in a header: printable ASCII, no
    spaces, 1 to :data:`MAX_TOKEN_CHARS` characters. Raises ``ValueError`` naming ``field``."""
    if not isinstance(token, str):
        raise ValueError(f"{field}: expected a string, got {type(token).__name__}")
    token = token.strip()
    if not token:
        raise ValueError(f"{field}: the token is empty")
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError(f"{field}: the token is longer than {MAX_TOKEN_CHARS} characters")
    if not all("!" <= char <= "~" for char in token):
        raise ValueError(f"{field}: the token must be printable ASCII without spaces")
    return token


def read_token_file(path: Any, field: str) -> str:
    """The token held in the file ``path`` (``~`` expanded; surrounding whitespace ignored).
    Raises ``ValueError`` naming ``field`` if it cannot be read or is not a token."""
    try:
        with open(os.path.expanduser(os.fspath(path)), encoding="ascii", errors="strict") as stream:
            text = stream.read(MAX_TOKEN_CHARS + 64)
    except UnicodeDecodeError:
        raise ValueError(f"{field}: {path}: the token must be printable ASCII without spaces") from None
    except OSError as exc:
        raise ValueError(f"{field}: cannot read {path}: {exc.strerror or exc}") from None
    return check_token(text, f"{field} {path}")


# -- client side ---------------------------------------------------------------------------------
def encode_request(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]],
                   layout: str) -> list[bytes | memoryview]:
    """The body of ``POST /score`` as parts to send one after the other (the array is not copied)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    header = {"protocol": PROTOCOL_VERSION, "layout": layout, "prompts": list(prompts),
              "metadata": [dict(entry) for entry in metadata]}
    try:
        line = json.dumps(header, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                          default=_json_default).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"prompts and metadata must be JSON-serialisable: {exc}") from None
    return [line + b"\n" + npy_header(images), _data_view(images)]


def npy_header(array: np.ndarray) -> bytes:
    """The ``.npy`` header of ``array`` (what :func:`numpy.save` writes before the data)."""
    stream = io.BytesIO()
    npy_format.write_array_header_1_0(stream, npy_format.header_data_from_array_1_0(array))
    return stream.getvalue()


def _data_view(array: np.ndarray) -> memoryview:
    """The raw bytes of a C-contiguous array, without a copy (``np.save`` order)."""
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return memoryview(array.reshape(-1).view(np.uint8))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")


def decode_scores(payload: Any, expected: int) -> np.ndarray:
    """float64 scores from a ``/score`` response (``null`` → NaN). Raises ``ValueError``."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("scores"), list):
        raise ValueError("the response has no 'scores' list")
    scores = payload["scores"]
    if len(scores) != expected:
        raise ValueError(f"the response holds {len(scores)} scores for {expected} images")
    try:
        return np.array([math.nan if s is None else float(s) for s in scores], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("the response's scores are not all numbers") from None


# -- server side ---------------------------------------------------------------------------------
def decode_header(line: bytes) -> dict[str, Any]:
    """The JSON header line (without its newline), checked. Raises :class:`ProtocolError`."""
    try:
        header = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError(400, f"bad JSON header: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ProtocolError(400, "bad JSON header: nested too deeply") from None
    except ValueError as exc:
        raise ProtocolError(400, f"bad JSON header: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(400, f"bad JSON header: expected an object, got {_json_type(header)}")
    unknown = sorted(str(key) for key in header if key not in HEADER_KEYS)
    if unknown:
        raise ProtocolError(400, f"bad JSON header: unknown key {unknown[0]!r} (known: {', '.join(HEADER_KEYS)})")
    version = header.get("protocol", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(400, f"unsupported protocol {version!r} (this server speaks {PROTOCOL_VERSION})")
    layout = header.get("layout", "nhwc")
    if layout not in LAYOUTS:
        raise ProtocolError(400, f"bad JSON header: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    prompts = _list_of(header, "prompts", str, "strings", "a string")
    metadata = _list_of(header, "metadata", dict, "objects", "an object")
    return {"layout": layout, "prompts": prompts, "metadata": metadata}


def _list_of(header: dict[str, Any], key: str, kind: type, plural: str, singular: str) -> list[Any] | None:
    """``header[key]``: absent, or a list whose every item is a ``kind``; 400 naming the item."""
    value = header.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise ProtocolError(400, f"bad JSON header: {key} must be a list of {plural}, got {_json_type(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, kind):
            raise ProtocolError(400, f"bad JSON header: {key}[{i}] must be {singular}, got {_json_type(item)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def decode_npy(buffer: bytearray | bytes | memoryview) -> np.ndarray:
    """An array viewing ``buffer`` (an ``.npy`` file, nothing after it). Only uint8 and float32.

    The header is parsed with numpy's reader (a literal, never code; at most
    :data:`MAX_NPY_HEADER_BYTES`); the data is not copied unless it is big-endian or Fortran-ordered.
    """
    view = memoryview(buffer)
    if len(view) < 10 or bytes(view[:6]) != npy_format.MAGIC_PREFIX:
        raise ProtocolError(400, "bad npy: the images must follow the header line as an .npy file "
                                 "(starting with b'\\x93NUMPY')")
    stream = io.BytesIO(view[:min(len(view), 12 + MAX_NPY_HEADER_BYTES)])
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = npy_format.read_array_header_1_0(stream, MAX_NPY_HEADER_BYTES)
        elif version == (2, 0):
            shape, fortran_order, dtype = npy_format.read_array_header_2_0(stream, MAX_NPY_HEADER_BYTES)
        else:
            raise ProtocolError(400, f"bad npy: unsupported format version {version[0]}.{version[1]} (1.0 or 2.0)")
    except ProtocolError:
        raise
    except Exception as exc:  # numpy raises ValueError, but a hostile header may raise anything
        raise ProtocolError(400, f"bad npy header: {_one_line(exc)}") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise ProtocolError(400, f"wrong dtype: expected uint8 or float32 images, got {dtype.descr!r}")
    if dtype == np.uint8:
        dtype = np.dtype(np.uint8)
    elif dtype.kind == "f" and dtype.itemsize == 4:
        pass
    else:
        raise ProtocolError(400, f"wrong dtype: expected uint8 or float32 images, got {dtype.name}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(400, f"bad npy header: the shape must hold non-negative integers, got {shape!r}")
    offset = stream.tell()
    count = math.prod(shape)
    expected = count * dtype.itemsize
    available = len(view) - offset
    if available != expected:
        what = "truncated" if available < expected else "has trailing bytes"
        raise ProtocolError(400, f"bad npy: the data {what}: shape {tuple(shape)} {dtype.name} needs "
                                 f"{expected} bytes, got {available}")
    array = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
    array = array.reshape(shape, order="F" if fortran_order else "C")
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    return np.ascontiguousarray(array)


def check_images(array: np.ndarray, layout: str, max_batch: int) -> None:
    """Shape and batch size of decoded images (see :func:`check_values` for the values).
    Raises :class:`ProtocolError`."""
    shape = tuple(array.shape)
    wanted = "N×H×W×3" if layout == "nhwc" else "N×3×H×W"
    channels = shape[-1] if layout == "nhwc" and len(shape) == 4 else shape[1] if len(shape) == 4 else None
    if len(shape) != 4 or channels != 3:
        raise ProtocolError(400, f"wrong shape: layout {layout!r} needs images {wanted}, got shape {shape}")
    if shape[0] < 1:
        raise ProtocolError(400, "wrong shape: the batch holds no images")
    if min(shape) < 1:
        raise ProtocolError(400, f"wrong shape: images must be at least 1×1 pixels, got shape {shape}")
    if shape[0] > max_batch:
        raise ProtocolError(413, f"batch too large: {shape[0]} images, this server takes at most {max_batch} "
                                 "per request (--max-batch)")


def check_values(array: np.ndarray) -> None:
    """float32 images hold no NaN or infinity and lie in [0, 1]. Raises :class:`ProtocolError`."""
    if array.dtype == np.float32:
        low, high = array.min(), array.max()  # NaN propagates: one check covers both
        if not (low >= 0.0 and high <= 1.0):
            if not np.isfinite(array).all():
                raise ProtocolError(400, "bad values: images contain NaN or infinite values")
            raise ProtocolError(400, f"out of range: float32 images must lie in [0, 1], got "
                                     f"[{float(low):.6g}, {float(high):.6g}]")


def check_texts(n: int, prompts: list[str] | None, metadata: list[dict] | None,
                uses_prompt: bool) -> tuple[list[str], list[dict]]:
    """Prompts and metadata for ``n`` images (defaults filled in). Raises :class:`ProtocolError`."""
    if prompts is None:
        if uses_prompt:
            raise ProtocolError(400, "prompts missing: this reward uses prompts; send \"prompts\", one per image")
        prompts = [""] * n
    if len(prompts) != n:
        raise ProtocolError(400, f"prompts count mismatch: {n} images but {len(prompts)} prompts")
    if metadata is None:
        metadata = [{} for _ in range(n)]
    if len(metadata) != n:
        raise ProtocolError(400, f"metadata count mismatch: {n} images but {len(metadata)} metadata entries")
    return prompts, metadata


def encode_scores(scores: np.ndarray) -> list[float | None]:
    """Scores as JSON numbers (exact: Python writes the shortest repr that reads back the same)."""
    return [float(s) if math.isfinite(s) else None for s in np.asarray(scores, dtype=np.float64).tolist()]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("…" if len(text) > 300 else "") if text else type(exc).__name__


__all__ = [
    "CONTENT_TYPE", "DTYPES", "HEADER_KEYS", "LAYOUTS", "MAX_HEADER_BYTES", "MAX_TOKEN_CHARS", "PROTOCOL_VERSION",
    "ProtocolError", "TOKEN_ENV", "check_images", "check_texts", "check_token", "check_values", "decode_header",
    "decode_npy", "decode_scores", "encode_request", "encode_scores", "npy_header", "read_token_file",
]
