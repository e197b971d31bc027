"""Rewards over HTTP: the ``remote`` reward (a client) and the ``calibri reward serve`` command.

``calibri reward serve NAME`` serves any registered reward (:mod:`calibri.rewards.server`);
the ``remote`` reward sends images to such a server and returns its scores, so a heavy model can
live in another process, environment or machine while a run scores through it. The wire format
(:mod:`calibri.rewards.protocol`) is JSON plus numpy's ``.npy`` — no pickle, no JPEG: images
travel as the canonical float32 values by default, so remote scores equal in-process ones
exactly. See ``docs/rewards.md`` ("Remote rewards").
"""
from __future__ import annotations

import http.client
import json
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import click
import numpy as np

from ..core.errors import CalibriError, ConfigError, UserError
from ..core.hookspecs import hookimpl
from .base import Reward, batch_text, to_canonical
from .protocol import (CONTENT_TYPE, PROTOCOL_VERSION, TOKEN_ENV, check_token, decode_scores, encode_request,
                       read_token_file)
from .server import (DEFAULT_HOST, DEFAULT_MAX_BATCH, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_REQUEST_MB, DEFAULT_PORT,
                     DEFAULT_READ_TIMEOUT, MAX_READ_TIMEOUT, MAX_REQUEST_MB, RewardServer, is_loopback)

DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
ENCODINGS = ("float32", "uint8")
#: Bytes kept free in a request for the HTTP and .npy headers.
_SLACK = 4096
#: Send buffer of Unix-socket connections (matches the server's receive buffer).
_UNIX_BUFFER = 4 * 2**20


class RewardServerError(CalibriError, RuntimeError):
    """The reward server failed (5xx, after the retries), did not answer in time, or answered
    something that is not the protocol. ``status`` is the HTTP status, if there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RewardRequestError(RewardServerError, ValueError):
    """The reward server rejected the request (4xx): bad images, too large, wrong protocol.

    A ``ValueError`` too, as :meth:`Reward.__call__` raises for images it cannot score."""


class RewardServerUnavailable(UserError):
    """No reward server could be reached at the URL (refused, no such host or socket file)."""


class RemoteReward(Reward):
    """A reward computed by a ``calibri reward serve`` server at ``url``: ``http://HOST:PORT``
    (optionally with a base path, or ``https://`` behind a proxy) or ``unix:/PATH`` for a server
    on a Unix socket (``--unix-socket``; same machine, faster).

    ``higher_is_better``, ``uses_prompt`` and ``needs`` are those of the served reward, read from
    ``GET /info`` on first use (as are the server's batch and size limits: larger batches are
    split to fit). ``timeout`` bounds connecting and each read (seconds); a request that exceeds
    it fails at once, without retry. Connection errors and 5xx answers are retried ``retries``
    times, waiting ``backoff`` · 2^k seconds (at most 10 s) before retry k; 4xx answers are not
    retried. ``encoding``: ``float32`` (default; lossless: the canonical values themselves, in
    the canonical N×3×H×W layout) or ``uint8`` (4× smaller, rounds to 1/255 steps: exact only
    for images that were 8-bit to begin with). ``device`` is accepted for uniformity and unused.
    ``token`` or ``token_file`` (else the ``CALIBRI_REWARD_TOKEN`` environment variable, if set):
    the shared token of a server started with ``--token-file``, sent as ``Authorization: Bearer``;
    prefer ``token_file`` or the variable to keep it out of config files.
    Safe to use from several threads (one connection per thread, kept alive between requests).
    """

    def __init__(self, url: str = DEFAULT_URL, timeout: float = 60.0, retries: int = 2, batch_size: int = 16,
                 encoding: Literal["float32", "uint8"] = "float32", backoff: float = 0.5,
                 device: str = "cpu", token: str | None = None, token_file: str | None = None) -> None:
        super().__init__(batch_size=batch_size, device=device)
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a finite number above 0, got {timeout}")
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        if not (backoff >= 0 and math.isfinite(backoff)):
            raise ValueError(f"backoff must be a finite number, 0 or more, got {backoff}")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.encoding = encoding
        self._scheme, self._host, self._port, self._base, self.url = _parse_url(url)
        self._token = _client_token(token, token_file)
        self._info: dict[str, Any] | None = None
        self._setup_local()

    def _setup_local(self) -> None:
        self._local = threading.local()
        self._info_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # connections and locks stay behind
        state = dict(self.__dict__)
        del state["_local"], state["_info_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup_local()

    def __repr__(self) -> str:
        return f"RemoteReward(url={self.url!r}, encoding={self.encoding!r})"

    # -- the served reward's attributes ----------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The server's ``GET /info`` (fetched once, then cached)."""
        with self._info_lock:
            if self._info is None:
                payload = self._get_json("/info")
                missing = [key for key in ("higher_is_better", "uses_prompt", "max_batch", "max_request_bytes")
                           if key not in payload]
                if missing:
                    raise RewardServerError(f"{self.url}/info is not a calibri reward server's answer "
                                            f"(no {missing[0]!r})")
                if payload.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
                    raise RewardServerError(f"reward server at {self.url} speaks protocol {payload.get('protocol')!r}; "
                                            f"this client speaks {PROTOCOL_VERSION}")
                self._info = payload
            return self._info

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        return bool(self.info()["higher_is_better"])

    @property
    def uses_prompt(self) -> bool:  # type: ignore[override]
        return bool(self.info()["uses_prompt"])

    @property
    def needs(self) -> str:  # type: ignore[override]
        return str(self.info().get("needs", "cpu"))

    def last_timing(self) -> dict[str, float]:
        """The server's timings of this thread's last ``/score`` request (ms): ``elapsed_ms``
        (from its headers to its answer), ``queue_ms`` (waiting for a worker), ``score_ms``."""
        return dict(getattr(self._local, "timing", None) or {})

    def health(self) -> dict[str, Any]:
        """The server's ``GET /health`` (not cached)."""
        return self._get_json("/health")

    # -- scoring ---------------------------------------------------------------------------------
    def __call__(self, images: Any, prompts: Sequence[str] | None = None,
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        """float64 scores, one per image (the :class:`Reward` contract; see :meth:`Reward.__call__`).

        Same conversions and checks as :meth:`Reward.__call__`, except that the values of a batch
        that is canonical already (a float32 CPU tensor N×3×H×W) are checked by the server only:
        it runs the same checks before scoring, and its rejection raises
        :class:`RewardRequestError`, a ``ValueError``. Requests are split to fit ``batch_size``
        and the server's limits.
        """
        canonical = _as_canonical(images)
        n = canonical.shape[0]
        prompts, metadata = batch_text(n, prompts, metadata)
        return self.score(canonical, prompts, metadata)

    def score(self, images, prompts, metadata):
        info = self.info()
        array, layout = self._encode(images)
        n = array.shape[0]
        per_image = array[0].nbytes
        header_bytes = len(json.dumps({"prompts": list(prompts), "metadata": [dict(m) for m in metadata]},
                                      ensure_ascii=False, default=str).encode("utf-8"))
        room = int(info["max_request_bytes"]) - _SLACK - header_bytes
        if room < per_image:
            raise ValueError(f"one {per_image}-byte image does not fit in a request: the server at {self.url} "
                             f"accepts at most {info['max_request_bytes']} bytes (--max-request-mb)")
        step = max(1, min(n, self.batch_size, int(info["max_batch"]), room // per_image))
        scores = [self._score_chunk(array[i:i + step], prompts[i:i + step], metadata[i:i + step], layout)
                  for i in range(0, n, step)]
        return np.concatenate(scores)

    def _encode(self, images: Any) -> tuple[np.ndarray, str]:
        import torch

        tensor = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.as_tensor(images)
        if self.encoding == "uint8":
            _check_values(tensor)  # quantising would hide NaN and out-of-range values from the server
            n, c, h, w = tensor.shape
            quantised = torch.empty((n, h, w, c), dtype=torch.uint8)  # values in [0, 1]: no clamping needed
            quantised.copy_(tensor.float().mul(255.0).round_().permute(0, 2, 3, 1))
            return quantised.numpy(), "nhwc"
        return tensor.to(torch.float32).contiguous().numpy(), "nchw"

    def _score_chunk(self, array: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]],
                     layout: str) -> np.ndarray:
        parts = encode_request(array, prompts, metadata, layout)
        payload = self._json(*self._request("POST", "/score", parts))
        if isinstance(payload, dict):
            self._local.timing = {key: payload[key] for key in ("elapsed_ms", "queue_ms", "score_ms") if key in payload}
        try:
            return decode_scores(payload, array.shape[0])
        except ValueError as exc:
            raise RewardServerError(f"reward server at {self.url} answered badly: {exc}") from None

    # -- HTTP ------------------------------------------------------------------------------------
    def _get_json(self, path: str) -> dict[str, Any]:
        payload = self._json(*self._request("GET", path))
        if not isinstance(payload, dict):
            raise RewardServerError(f"{self.url}{path} answered {type(payload).__name__}, not a JSON object")
        return payload

    def _json(self, status: int, data: bytes) -> Any:
        try:
            return json.loads(data)
        except ValueError:
            raise RewardServerError(f"reward server at {self.url} answered HTTP {status} with a body that is "
                                    "not JSON (is it a calibri reward server?)", status) from None

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            return connection, False
        if self._scheme == "unix":
            connection = _UnixHTTPConnection(self._host, timeout=self.timeout)
        else:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            connection = cls(self._host, self._port, timeout=self.timeout)
        self._local.connection = connection
        return connection, True

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            connection.close()

    def close(self) -> None:
        """Close this thread's connection to the server (others close when their threads end)."""
        self._drop_connection()

    def _exchange(self, connection: http.client.HTTPConnection, method: str, path: str,
                  parts: Sequence[bytes | memoryview] | None) -> tuple[int, bytes]:
        connection.putrequest(method, self._base + path, skip_accept_encoding=True)
        connection.putheader("Accept", "application/json")
        if self._token is not None:
            connection.putheader("Authorization", f"Bearer {self._token}")
        if parts is None:
            connection.endheaders()
        else:
            connection.putheader("Content-Type", CONTENT_TYPE)
            connection.putheader("Content-Length", str(sum(memoryview(part).nbytes for part in parts)))
            try:
                connection.endheaders(bytes(parts[0]))
                for part in parts[1:]:
                    connection.send(part)
            except (BrokenPipeError, ConnectionResetError):  # the server may have answered early (413)
                response = connection.getresponse()
                data = response.read()
                self._drop_connection()
                return response.status, data
        response = connection.getresponse()
        data = response.read()
        if response.will_close:
            self._drop_connection()
        return response.status, data

    def _request(self, method: str, path: str, parts: Sequence[bytes | memoryview] | None = None) -> tuple[int, bytes]:
        attempts = self.retries + 1
        attempt, reconnected = 0, False
        while True:
            connection, fresh = self._connection()
            try:
                status, data = self._exchange(connection, method, path, parts)
            except TimeoutError:
                self._drop_connection()
                raise RewardServerError(f"no answer from the reward server at {self.url} within "
                                        f"{self.timeout:g} s (timeout)") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                if not fresh and not reconnected:  # a kept-alive connection the server had closed
                    reconnected = True
                    continue
                failure, status, data = _describe(exc, self._host), None, b""
            else:
                if status < 500:
                    if status >= 400:
                        hint = (f" (give the remote reward's token or token_file option, or set {TOKEN_ENV})"
                                if status == 401 else "")
                        raise RewardRequestError(f"reward server at {self.url} rejected the request "
                                                 f"(HTTP {status}): {_error_text(data)}{hint}", status)
                    return status, data
                failure = f"HTTP {status}: {_error_text(data)}"
            attempt += 1
            if attempt >= attempts:
                break
            time.sleep(min(self.backoff * 2 ** (attempt - 1), 10.0))
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        if status is None:
            raise RewardServerUnavailable(f"no reward server at {self.url}: {failure}{tries}")
        raise RewardServerError(f"reward server at {self.url} failed: {failure}{tries}", status)


def _client_token(token: str | None, token_file: str | None) -> str | None:
    """The token to send: ``token``, the contents of ``token_file``, else ``$CALIBRI_REWARD_TOKEN``."""
    if token is not None and token_file is not None:
        raise ValueError("give token or token_file, not both")
    if token_file is not None:
        return read_token_file(token_file, "token_file")
    if token is not None:
        return check_token(token, "token")
    from_env = os.environ.get(TOKEN_ENV, "")
    return check_token(from_env, TOKEN_ENV) if from_env.strip() else None


def _as_canonical(images: Any) -> Any:
    """``to_canonical(images)``, but a batch already canonical in form goes as it is (unchecked)."""
    import torch

    if (isinstance(images, torch.Tensor) and images.dtype == torch.float32 and images.dim() == 4
            and images.shape[1] == 3 and images.device.type == "cpu" and images.numel() > 0):
        return images.detach().contiguous()
    return to_canonical(images)


def _check_values(tensor: Any) -> None:
    """The contract's value checks (NaN, [0, 1]) in two reductions; ValueError as to_canonical's."""
    low, high = tensor.min(), tensor.max()  # NaN propagates: this one test also catches it
    if not (low >= 0.0 and high <= 1.0):
        to_canonical(tensor)  # raises the ValueError naming the problem
        raise ValueError(f"float images must lie in [0, 1], got [{float(low):.3g}, {float(high):.3g}]")


def _parse_url(url: Any) -> tuple[str, str, int, str, str]:
    """``(scheme, host or socket path, port, base path, normalised url)``."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"url must be http://HOST:PORT, https://… or unix:/PATH, got {url!r}")
    url = url.strip()
    if url.startswith("unix:"):
        path = url[len("unix:"):]
        path = "/" + path.lstrip("/") if path.startswith("//") else path
        if not path:
            raise ValueError(f"url unix:PATH needs the socket's path, got {url!r}")
        return "unix", path, 0, "", f"unix:{path}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url must be http://HOST:PORT, https://… or unix:/PATH, got {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"url has a bad port: {url!r}") from None
    if parts.query or parts.fragment:
        raise ValueError(f"url must not carry a query or fragment, got {url!r}")
    base = parts.path.rstrip("/")
    return parts.scheme, parts.hostname, port, base, f"{parts.scheme}://{parts.netloc}{base}"


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (the server's ``--unix-socket``)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _UNIX_BUFFER)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _describe(exc: BaseException, host: str) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, FileNotFoundError):
        return "no such socket file"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host {host!r}"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _error_text(data: bytes) -> str:
    try:
        payload = json.loads(data)
        if isinstance(payload, dict) and "error" in payload:
            return str(payload["error"])
    except ValueError:
        pass
    text = " ".join(data[:300].decode("utf-8", "replace").split())
    return text or "no details"


# -- the command ---------------------------------------------------------------------------------
def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings → options; values are read as YAML (``90`` → 90, ``true`` → True)."""
    import yaml

    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("--option", f"expected KEY=VALUE, got {item!r}")
        if key in options:
            raise ConfigError(f"--option {key}", "given twice")
        try:
            options[key] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            options[key] = text
    return options


def build_server(name: str, options: Mapping[str, Any], *, workers: int = 1, device: str | None = None,
                 **server_options: Any) -> RewardServer:
    """A :class:`RewardServer` for the registered reward ``name`` (``workers`` instances of it)."""
    from .combine import build_reward

    if workers < 1:
        raise ConfigError("--workers", f"must be at least 1, got {workers}")
    spec = {"name": name, "options": dict(options)}
    rewards = [build_reward(spec, field="reward", device=device) for _ in range(workers)]
    return RewardServer(rewards, name, options=options, **server_options)


class _PositiveNumber(click.ParamType):
    """A finite number above 0 and at most ``most`` (click's FloatRange lets nan and inf through)."""

    name = "number"

    def __init__(self, most: float) -> None:
        self.most = most

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not (math.isfinite(number) and 0 < number <= self.most):
            self.fail(f"must be a finite number above 0 and at most {self.most:.15g}, got {value!r}", param, ctx)
        return number


@click.group("reward")
def reward_group() -> None:
    """Image rewards: serve one over HTTP for runs in other processes or machines."""


@reward_group.command("serve")
@click.argument("name")
@click.option("--host", help=f"Address to listen on [default: {DEFAULT_HOST}]. Non-loopback addresses need "
                             "--allow-remote.")
@click.option("--port", type=click.IntRange(0, 65535),
              help=f"Port [default: {DEFAULT_PORT}]; 0: any free port (printed at start).")
@click.option("--unix-socket", type=click.Path(dir_okay=False),
              help="Listen on this Unix socket instead of TCP (same machine only, owner-only file, faster).")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="A reward option (repeatable); values are read as YAML.")
@click.option("--max-batch", default=DEFAULT_MAX_BATCH, show_default=True, type=click.IntRange(min=1),
              help="Most images per request (more: HTTP 413).")
@click.option("--max-request-mb", default=DEFAULT_MAX_REQUEST_MB, show_default=True,
              type=_PositiveNumber(MAX_REQUEST_MB), help="Largest request body in MiB (more: HTTP 413).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Reward instances scoring in parallel (each loads its own model).")
@click.option("--max-pending", type=click.IntRange(min=1),
              help="Request bodies held in memory at once [default: 2 × workers + 2].")
@click.option("--read-timeout", default=DEFAULT_READ_TIMEOUT, show_default=True,
              type=_PositiveNumber(MAX_READ_TIMEOUT),
              help="Seconds a client has to send a request's headers, and again its body, however it trickles "
                   "them (more: HTTP 408); also how long an idle kept-alive connection is kept.")
@click.option("--max-connections", default=DEFAULT_MAX_CONNECTIONS, show_default=True, type=click.IntRange(1, 10_000),
              help="Connections served at once (one thread each); more get HTTP 503 at once.")
@click.option("--device", help="Device for rewards that take one (cpu, cuda, cuda:1).")
@click.option("--plugin", "plugin_modules", multiple=True, metavar="MODULE",
              help="Import this plugin module first (repeatable), e.g. one that registers the reward.")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False),
              help=f"Require this file's token on /score and /info (clients send 'Authorization: Bearer TOKEN'; "
                   f"/health stays open). Without it, the {TOKEN_ENV} environment variable, if set.")
@click.option("--allow-remote", is_flag=True,
              help="Allow a non-loopback --host. There is no encryption: use --token-file too, or better an SSH "
                   "tunnel.")
@click.option("--log-requests", is_flag=True, help="Log every request (errors are always logged).")
def serve_command(name: str, host: str | None, port: int | None, unix_socket: str | None, options: tuple[str, ...],
                  max_batch: int, max_request_mb: float, workers: int, max_pending: int | None,
                  read_timeout: float, max_connections: int, device: str | None, plugin_modules: tuple[str, ...], token_file: str | None,
                  allow_remote: bool, log_requests: bool) -> None:
    """Serve the reward NAME over HTTP (POST /score, GET /health, GET /info) until Ctrl-C.

    With --token-file (or CALIBRI_REWARD_TOKEN set), /score and /info answer 401 unless the client
    sends the token: the remote reward's token_file option, or the same variable."""
    from ..core.plugins import add_plugin_modules

    if unix_socket is not None and (host is not None or port is not None):
        raise UserError("give either --unix-socket or --host/--port, not both")
    host = DEFAULT_HOST if host is None else host
    port = DEFAULT_PORT if port is None else port
    token, token_source = _server_token(token_file)
    loopback = unix_socket is not None or is_loopback(host)
    if not loopback and not allow_remote:
        raise UserError(f"refusing to listen on {host!r}: not a loopback address, and the reward server has no "
                        "encryption (pass --allow-remote, with --token-file, to do it anyway)")
    if plugin_modules:
        add_plugin_modules(*plugin_modules)
    reward_options = parse_options(options)

    def log(message: str) -> None:
        click.echo(f"calibri: reward server: {message}", err=True)

    import torch  # noqa: F401  (imported now rather than by the first request)

    where = unix_socket if unix_socket is not None else f"{host}:{port}"
    try:
        server = build_server(name, reward_options, workers=workers, device=device, host=host, port=port,
                              unix_socket=unix_socket, max_batch=max_batch,
                              max_request_bytes=math.ceil(max_request_mb * 2**20), max_pending=max_pending,
                              read_timeout=read_timeout, log=log, log_requests=log_requests, token=token,
                              max_connections=max_connections)
    except OSError as exc:
        raise UserError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    if not loopback and token is None:
        click.echo(f"calibri: warning: serving on {host}, reachable from other machines, without a token or "
                   "encryption: anyone who can reach it can use it (see --token-file)", err=True)
    elif not loopback:
        click.echo(f"calibri: warning: serving on {host}, reachable from other machines; requests (the token "
                   "included) travel unencrypted: prefer an SSH tunnel", err=True)
    needs = f"; clients need the token from {token_source}" if token is not None else ""
    click.echo(f"calibri: serving reward {name!r} at {server.url} ({workers} worker{'s' * (workers > 1)}, "
               f"max batch {max_batch}, max request {max_request_mb:g} MiB{needs}); Ctrl-C to stop")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    click.echo("calibri: reward server stopped")


def _server_token(token_file: str | None) -> tuple[str | None, str | None]:
    """The token the server requires and where it came from (``--token-file``, else the variable)."""
    try:
        if token_file is not None:
            return read_token_file(token_file, "--token-file"), "--token-file"
        if os.environ.get(TOKEN_ENV, "").strip():
            return check_token(os.environ[TOKEN_ENV], TOKEN_ENV), TOKEN_ENV
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return None, None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@hookimpl
def calibri_register_rewards(register):
    register("remote", RemoteReward,
             description="A reward computed by a `calibri reward serve` server (url, timeout, retries, encoding, "
                         "token_file)")


@hookimpl
def calibri_register_commands(register):
    register(reward_group)


__all__ = ["DEFAULT_URL", "ENCODINGS", "RemoteReward", "RewardServerError", "RewardServerUnavailable",
           "build_server", "parse_options", "reward_group", "serve_command"]
