"""Serving any :class:`~calibri.rewards.base.Reward` over HTTP (the ``calibri reward serve`` command).

Standard library only (:class:`http.server.ThreadingHTTPServer`); the wire format is in
:mod:`calibri.rewards.protocol` (JSON plus ``.npy``, no pickle). One thread per connection reads,
decodes and checks its request and writes its answer; the scoring itself runs on a pool of
``workers`` reward instances, each used by one request at a time, so a reward need not be
thread-safe. At most ``max_pending`` request bodies are held in memory at once.

Hostile or broken clients: a request's headers must arrive within ``read_timeout`` of its first
byte, and its body within ``read_timeout`` of the server starting to read it (a deadline for the
whole, not per read: trickling a byte at a time buys no time); a body declared larger than
``max_request_bytes`` is refused from the headers, and a receive buffer grows with the bytes that
actually arrive, never with the size a client declares. With a ``token``, ``/score`` and
``/info`` need ``Authorization: Bearer TOKEN``.

Routes: ``POST /score`` (score a batch), ``GET /health`` (liveness), ``GET /info`` (the reward's
attributes and the server's limits). Every answer is JSON; every mistake in a request gets a 4xx
naming it, and nothing a client sends stops the server.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import io
import ipaddress
import json
import math
import numbers
import os
import queue
import re
import socket
import socketserver
import stat
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from .base import Reward
from .protocol import (CONTENT_TYPE, DTYPES, LAYOUTS, MAX_HEADER_BYTES, PROTOCOL_VERSION, ProtocolError,
                       check_images, check_texts, check_token, check_values, decode_header, decode_npy,
                       encode_scores)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_REQUEST_MB = 256.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 64
#: Largest ``read_timeout`` (one day): beyond it, a timeout no longer protects anything.
MAX_READ_TIMEOUT = 86400.0
#: Largest ``--max-request-mb`` (1 TiB): a body is held in memory whole.
MAX_REQUEST_MB = float(2**20)
#: Routes and the methods each accepts.
ROUTES: dict[str, tuple[str, ...]] = {"/score": ("POST",), "/health": ("GET", "HEAD"), "/info": ("GET", "HEAD")}
_ACCEPTED_TYPES = (CONTENT_TYPE, "application/octet-stream")
#: Routes open without the token (liveness probes).
_OPEN_ROUTES = ("/health",)
#: A receive buffer starts this large (or at the body's size, if smaller) and doubles as bytes arrive.
_FIRST_CHUNK = 2**20
_CONTENT_LENGTH = re.compile(r"[0-9]+")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only ever means this machine."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


class _Disconnected(Exception):
    """The client went away mid-request: nothing to answer."""


class RewardServer:
    """An HTTP server scoring images with ``rewards`` (one instance per worker) under ``name``.

    ``port=0`` picks a free port (see :attr:`port`). :meth:`serve` runs in the foreground until
    Ctrl-C; :meth:`start` runs in a background thread (tests, notebooks); :meth:`close` stops
    accepting, lets requests in flight finish (up to ``grace`` seconds) and closes connections.
    ``read_timeout`` bounds the time a client has for a request's headers, and again for its body
    (HTTP 408), and how long an idle kept-alive connection stays open. ``token``: if given,
    ``/score`` and ``/info`` answer 401 unless sent ``Authorization: Bearer TOKEN``.
    """

    def __init__(self, rewards: Reward | Sequence[Reward], name: str, *, host: str = DEFAULT_HOST,
                 port: int = 0, max_batch: int = DEFAULT_MAX_BATCH,
                 max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * 2**20), max_pending: int | None = None,
                 read_timeout: float = DEFAULT_READ_TIMEOUT, options: Mapping[str, Any] | None = None,
                 log: Callable[[str], None] | None = None, log_requests: bool = False,
                 unix_socket: str | os.PathLike[str] | None = None, token: str | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        rewards = [rewards] if isinstance(rewards, Reward) else list(rewards)
        if not rewards or not all(isinstance(r, Reward) for r in rewards):
            raise TypeError("RewardServer needs one or more calibri Reward instances")
        self.name = name
        self.reward = rewards[0]
        self.workers = len(rewards)
        self.max_batch = _count("max_batch", max_batch)
        self.max_request_bytes = _count("max_request_bytes", max_request_bytes)
        self.max_pending = 2 * self.workers + 2 if max_pending is None else _count("max_pending", max_pending)
        self.read_timeout = _seconds("read_timeout", read_timeout)
        self.max_connections = _count("max_connections", max_connections)
        self._connection_slots = threading.BoundedSemaphore(self.max_connections)
        # Compared as digests: equal lengths, so the comparison's time tells nothing of the token.
        self._token_digest = None if token is None else _digest(check_token(token, "token"))
        self.options = dict(options or {})
        self.log = log
        self.log_requests = log_requests
        self._pool: queue.Queue[Reward] = queue.Queue()
        for reward in rewards:
            self._pool.put(reward)
        self._pending = threading.BoundedSemaphore(self.max_pending)
        self._buffers: list[bytearray] = []  # receive buffers, reused (no page faults per request)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._requests = 0
        self._connections: set[socket.socket] = set()
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.unix_socket = os.fspath(unix_socket) if unix_socket is not None else None
        self.httpd: socketserver.BaseServer = (_UnixHTTPServer(self.unix_socket, self) if self.unix_socket is not None
                                               else _HTTPServer((host, port), self))

    # -- addresses -------------------------------------------------------------------------------
    @property
    def host(self) -> str | None:
        return None if self.unix_socket is not None else self.httpd.server_address[0]

    @property
    def port(self) -> int | None:
        return None if self.unix_socket is not None else self.httpd.server_address[1]

    @property
    def url(self) -> str:
        """What the ``remote`` reward's ``url`` option takes to reach this server."""
        if self.unix_socket is not None:
            return f"unix:{os.path.abspath(self.unix_socket)}"
        host = self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    # -- running ---------------------------------------------------------------------------------
    def serve(self, grace: float = 10.0) -> None:
        """Serve in this thread until Ctrl-C (``KeyboardInterrupt``), then :meth:`close`."""
        try:
            self.httpd.serve_forever(poll_interval=0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.close(grace)

    def start(self) -> "RewardServer":
        """Serve in a background (daemon) thread; returns self."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"reward-server {self.url}", daemon=True)
        self._thread.start()
        return self

    def close(self, grace: float = 10.0) -> None:
        """Stop accepting, wait up to ``grace`` s for requests in flight, close every connection."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()
        deadline = time.monotonic() + grace
        try:
            with self._idle:
                if self._in_flight and grace > 0:
                    self._say(f"stopping: waiting up to {grace:g} s for {self._in_flight} request(s) in flight "
                              "(Ctrl-C again to stop now)")
                while self._in_flight and time.monotonic() < deadline:
                    self._idle.wait(max(0.0, min(0.5, deadline - time.monotonic())))
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
            pass
        with self._lock:
            connections = list(self._connections)
        for connection in connections:  # idle keep-alive connections: wake their threads
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.unix_socket is not None:
            try:
                os.unlink(self.unix_socket)
            except OSError:
                pass

    def __enter__(self) -> "RewardServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the handlers use -------------------------------------------------------------------
    @property
    def needs_token(self) -> bool:
        """Whether ``/score`` and ``/info`` need ``Authorization: Bearer TOKEN``."""
        return self._token_digest is not None

    def authorized(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries this server's token (always, without one)."""
        if self._token_digest is None:
            return True
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        given = _digest(credentials.strip()) if scheme.lower() == "bearer" else b""
        return hmac.compare_digest(given, self._token_digest)

    def info(self) -> dict[str, Any]:
        from .. import core

        reward = self.reward
        return {
            "reward": self.name, "class": f"{type(reward).__module__}.{type(reward).__qualname__}",
            "higher_is_better": bool(reward.higher_is_better), "uses_prompt": bool(reward.uses_prompt),
            "needs": str(reward.needs), "batch_size": int(reward.batch_size), "options": _public(self.options),
            "protocol": PROTOCOL_VERSION, "dtypes": list(DTYPES), "layouts": list(LAYOUTS),
            "max_batch": self.max_batch, "max_request_bytes": self.max_request_bytes,
            "max_header_bytes": MAX_HEADER_BYTES, "workers": self.workers, "read_timeout": self.read_timeout,
            "calibri_version": getattr(core, "__version__", None),
        }

    def health(self) -> dict[str, Any]:
        with self._lock:
            in_flight, requests = self._in_flight, self._requests
        return {"status": "ok", "reward": self.name, "protocol": PROTOCOL_VERSION,
                "uptime_s": round(time.monotonic() - self._started, 3), "requests": requests,
                "in_flight": in_flight, "workers": self.workers}

    def score(self, images: Any, prompts: list[str], metadata: list[dict],
              array: Any = None) -> tuple[Any, float, float]:
        """Scores from a free worker; also the ms spent waiting for it and scoring.

        The values of the images are checked by the reward itself (:meth:`Reward.__call__`
        converts and checks its input, as in-process), so they are not read an extra time; when
        the reward rejects them, :func:`check_values` on ``array`` (the decoded images) tells a
        bad request (400) from a batch this reward cannot score (422)."""
        start = time.perf_counter()
        reward = self._pool.get()
        started = time.perf_counter()
        try:
            scores = reward(images, prompts, metadata)
        except ValueError as exc:
            if array is not None:
                check_values(array)
            raise ProtocolError(422, f"reward {self.name!r} cannot score these images: {_one_line(exc)}") from None
        except Exception as exc:
            raise ProtocolError(500, f"reward {self.name!r} failed: {type(exc).__name__}: {_one_line(exc)}") from None
        finally:
            self._pool.put(reward)
        done = time.perf_counter()
        return scores, (started - start) * 1e3, (done - started) * 1e3

    def _take_buffer(self, size: int) -> bytearray:
        """A kept buffer of at least ``size`` bytes, else an empty one that grows as bytes arrive
        (never allocated at the size a client declares: declaring costs it nothing)."""
        with self._lock:
            fitting = [buffer for buffer in self._buffers if len(buffer) >= size]
            if fitting:
                buffer = min(fitting, key=len)
                self._buffers.remove(buffer)
                return buffer
            if self._buffers:  # too small: let the largest go, its replacement comes back instead
                self._buffers.remove(max(self._buffers, key=len))
        return bytearray()

    def _give_back_buffer(self, buffer: bytearray) -> None:
        # Reused only if nothing still views it (a reward may keep its input): the only references
        # left are the caller's and this frame's (and getrefcount's argument).
        if sys.getrefcount(buffer) <= 3:
            with self._lock:
                if len(self._buffers) < self.max_pending:
                    self._buffers.append(buffer)

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._requests += 1

    def _leave(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()

    def _say(self, message: str) -> None:
        if self.log is not None:
            try:
                self.log(message)
            except Exception:  # a broken log must not break a request
                pass


class _ConnectionCap:
    """Serve at most ``app.max_connections`` connections at once (one thread each); the rest get
    a 503 and are closed at once, so a flood of connections cannot take every thread and file
    handle (each served one is cut off after ``read_timeout`` if it stalls)."""

    app: RewardServer

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.app._connection_slots.acquire(blocking=False):
            _refuse_connection(request)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            self.app._connection_slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self.app._connection_slots.release()


def _refuse_connection(sock: socket.socket) -> None:
    """A 503 sent without waiting (it fits in the socket's buffer; a client that reads nothing
    must not stall the accepting thread)."""
    body = json.dumps({"error": "too many connections; retry later"}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
    try:
        sock.setblocking(False)
        sock.send(head + body)
    except OSError:
        pass


class _HTTPServer(_ConnectionCap, ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: RewardServer) -> None:
        self.app = app
        host = address[0]
        if ":" in host.strip("[]"):
            self.address_family = socket.AF_INET6
            address = (host.strip("[]"), address[1])
        super().__init__(address, _Handler)

    def server_bind(self) -> None:  # no reverse DNS lookup of the host (HTTPServer does one)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:  # one line, never a traceback
        import sys

        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            self.app._say(f"error with {client_address!r}: {type(exc).__name__}: {exc}")


class _UnixHTTPServer(_ConnectionCap, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The same server on a Unix socket: same-host clients only, access set by file permissions."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, path: str, app: RewardServer) -> None:
        self.app = app
        _remove_stale_socket(path)
        super().__init__(path, _Handler)

    def server_bind(self) -> None:
        old = os.umask(0o177)  # the socket file is created owner-only (rw-------)
        try:
            socketserver.UnixStreamServer.server_bind(self)
        finally:
            os.umask(old)
        self.server_name, self.server_port = "localhost", 0

    handle_error = _HTTPServer.handle_error


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a server that is gone; refuse a live one or another file."""
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return  # let bind report it
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "a server is already listening on this socket", path)


#: Socket buffer for Unix-socket connections: fewer, larger copies (faster than the default).
_UNIX_BUFFER = 4 * 2**20


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "calibri-reward/1"
    sys_version = ""
    disable_nagle_algorithm = True
    server: _HTTPServer

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        self.timeout = self.server.app.read_timeout
        self._linger = False
        self._unix = self.request.family == socket.AF_UNIX
        if self._unix:
            self.disable_nagle_algorithm = False
            try:
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UNIX_BUFFER)
            except OSError:
                pass
        super().setup()
        self.rfile.close()  # read through the deadline instead (the socket stays open)
        self._reader = _RequestReader(self.connection, self.server.app.read_timeout)
        self.rfile = io.BufferedReader(self._reader, 1 << 16)
        with self.server.app._lock:
            self.server.app._connections.add(self.connection)

    def handle_one_request(self) -> None:
        self._reader.between_requests()  # the next request's clock starts with its first byte
        super().handle_one_request()

    def parse_request(self) -> bool:
        try:
            parsed = super().parse_request()
        except TimeoutError:  # the headers did not all arrive in time
            self.close_connection = True
            self._body_read = True  # nothing worth lingering for
            self._send_json(408, {"error": f"timed out: the request's headers did not arrive within "
                                           f"{self.server.app.read_timeout:g} s (--read-timeout)", "status": 408})
            return False
        if parsed and self.headers.defects:  # a line that is no header: where the body starts is unknown
            self.send_error(400, "malformed headers: every header line must be 'Name: value'")
            return False
        return parsed

    def handle(self) -> None:
        super().handle()
        if self._linger:  # read what the client still sends, so that it gets to read our answer
            self._discard_input(seconds=2.0, limit=2**34)

    def _discard_input(self, seconds: float, limit: int) -> None:
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline, total = time.monotonic() + seconds, 0
            while total < limit and time.monotonic() < deadline:
                self.connection.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = self.connection.recv(1 << 16)
                if not chunk:
                    break
                total += len(chunk)
        except OSError:
            pass

    def finish(self) -> None:
        with self.server.app._lock:
            self.server.app._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # every method goes through _dispatch (405, not 501, for the others)
            return self._dispatch
        raise AttributeError(name)

    # -- routing ---------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        app = self.server.app
        app._enter()
        self._start = time.perf_counter()
        self._body_read = False
        try:
            try:
                path = urlsplit(self.path).path
            except ValueError:
                raise ProtocolError(400, f"bad request target {self.path[:200]!r}") from None
            methods = ROUTES.get(path)
            if methods is None:
                self._send_json(404, {"error": f"unknown path {path!r} (known: {', '.join(ROUTES)})", "status": 404})
            elif self.command not in methods:
                self._send_json(405, {"error": f"method {self.command} not allowed on {path} "
                                               f"(allowed: {', '.join(methods)})", "status": 405},
                                headers=(("Allow", ", ".join(methods)),))
            elif path not in _OPEN_ROUTES and not self._authorized():
                self._send_json(401, {"error": self._auth_problem(), "status": 401},
                                headers=(("WWW-Authenticate", 'Bearer realm="calibri-reward"'),))
            elif path == "/score":
                self._send_json(200, self._score())
            elif path == "/health":
                self._send_json(200, app.health())
            else:
                self._send_json(200, app.info())
        except ProtocolError as exc:
            self._send_json(exc.status, {"error": exc.message, "status": exc.status})
        except _Disconnected:
            self.close_connection = True
        except TimeoutError:
            self._send_json(408, {"error": f"timed out: the request's body did not arrive within "
                                           f"{app.read_timeout:g} s (--read-timeout)", "status": 408})
        except OSError:  # the connection broke
            self.close_connection = True
        except Exception as exc:  # a bug: answer 500, keep serving
            self._send_json(500, {"error": f"internal error: {type(exc).__name__}: {_one_line(exc)}", "status": 500})
        finally:
            app._leave()

    def _authorized(self) -> bool:
        values = self.headers.get_all("Authorization") or []
        return len(values) <= 1 and self.server.app.authorized(values[0] if values else None)

    def _auth_problem(self) -> str:
        values = self.headers.get_all("Authorization") or []
        if not values:
            return "this server needs a token: send 'Authorization: Bearer TOKEN'"
        if len(values) > 1:
            return "send one Authorization header, not several"
        if values[0].strip().partition(" ")[0].lower() != "bearer":
            return "send the token as 'Authorization: Bearer TOKEN'"
        return "wrong token"

    def _score(self) -> dict[str, Any]:
        app = self.server.app
        if self.headers.get("Transfer-Encoding"):
            raise ProtocolError(411, "send the body with a Content-Length (Transfer-Encoding is not accepted)")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise ProtocolError(411, "Content-Length required")
        if len(lengths) > 1:  # which one counts is where request smuggling starts
            raise ProtocolError(400, f"bad Content-Length: {len(lengths)} Content-Length headers, send one")
        digits = lengths[0].strip()
        if not _CONTENT_LENGTH.fullmatch(digits):
            raise ProtocolError(400, f"bad Content-Length {lengths[0][:40]!r}")
        length = int(digits) if len(digits) <= 30 else None  # None: more than any limit (int() is slow on more)
        if length is None or length > app.max_request_bytes:
            size = f"{length} bytes" if length is not None else f"a {len(digits)}-digit number of bytes"
            raise ProtocolError(413, f"request too large: {size}, this server accepts at most "
                                     f"{app.max_request_bytes} (--max-request-mb)")
        content_type = (self.headers.get("Content-Type") or CONTENT_TYPE).split(";")[0].strip().lower()
        if content_type not in _ACCEPTED_TYPES:
            raise ProtocolError(415, f"unsupported Content-Type {content_type!r} (send {CONTENT_TYPE})")
        if not app._pending.acquire(timeout=app.read_timeout):
            raise ProtocolError(503, "server busy: too many requests waiting; retry later")
        buffer = None
        try:
            self._reader.restart()  # the body's deadline runs from when there is room for it
            line = self._read_header_line(length)
            buffer = app._take_buffer(length - len(line))
            return self._score_body(line[:-1], self._read_into(buffer, length - len(line)))
        finally:
            if buffer is not None:
                app._give_back_buffer(buffer)
            app._pending.release()

    def _score_body(self, line: bytes, body: memoryview) -> dict[str, Any]:
        app = self.server.app
        header = decode_header(line)
        images = decode_npy(body)
        check_images(images, header["layout"], app.max_batch)
        prompts, metadata = check_texts(images.shape[0], header["prompts"], header["metadata"],
                                        bool(app.reward.uses_prompt))
        array = images
        if header["layout"] == "nchw":
            import torch

            images = torch.from_numpy(array)
        scores, queue_ms, score_ms = app.score(images, prompts, metadata, array)
        return {"scores": encode_scores(scores), "higher_is_better": bool(app.reward.higher_is_better),
                "reward": app.name, "count": len(prompts),
                "elapsed_ms": round((time.perf_counter() - self._start) * 1e3, 3),
                "queue_ms": round(queue_ms, 3), "score_ms": round(score_ms, 3)}

    def _read_header_line(self, length: int) -> bytes:
        """The body's first line (the JSON header), with its newline."""
        line = self.rfile.readline(min(length, MAX_HEADER_BYTES + 1))
        if not line.endswith(b"\n"):
            if len(line) == length:
                self._body_read = True
                raise ProtocolError(400, "the body must start with a JSON header line ended by a newline, "
                                         "then the .npy images")
            if len(line) > MAX_HEADER_BYTES:
                raise ProtocolError(413, f"JSON header line longer than {MAX_HEADER_BYTES} bytes")
            raise _Disconnected
        return line

    def _read_into(self, buffer: bytearray, size: int) -> memoryview:
        """The rest of the body (the .npy file), read into the start of ``buffer``, which grows
        (doubling) only as bytes arrive: memory follows what was sent, not what was declared."""
        got = 0
        while got < size:
            if got >= len(buffer):
                buffer.extend(bytes(min(size, max(got + _FIRST_CHUNK, 2 * got)) - len(buffer)))
            with memoryview(buffer) as whole, whole[got:min(size, len(buffer))] as room:
                n = self.rfile.readinto(room)
            if not n:
                raise _Disconnected
            got += n
        self._body_read = True
        return memoryview(buffer)[:size]

    # -- answers ---------------------------------------------------------------------------------
    def _send_json(self, status: int, payload: Mapping[str, Any], headers: Sequence[tuple[str, str]] = ()) -> None:
        app = self.server.app
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
        if status >= 400 and not getattr(self, "_body_read", False) and _may_have_body(getattr(self, "headers", None)):
            self.close_connection = True  # an unread body would be taken for the next request
            self._linger = True
        try:
            self.connection.settimeout(app.read_timeout)  # reads may have left a shorter one
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for key, value in headers:
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(body)
        except OSError:
            self.close_connection = True
        if app.log is not None and (app.log_requests or status >= 400):
            elapsed = (time.perf_counter() - getattr(self, "_start", time.perf_counter())) * 1e3
            detail = f": {payload.get('error')}" if status >= 400 else ""
            app._say(f"{self._peer()} {getattr(self, 'command', None) or '-'} {getattr(self, 'path', '')!r} "
                     f"{status} {elapsed:.1f} ms{detail}")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found by the HTTP layer (bad request line, headers too long): JSON too."""
        self.close_connection = True
        self._linger = True  # the rest of the request is unread
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":  # unparsed: still answer with a status line
            self.request_version = "HTTP/1.0"
        if not hasattr(self, "headers"):
            self.headers = None
        if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:  # the client's mistake: not worth a retry
            code, message = 400, f"{message or 'unsupported HTTP version'} (send HTTP/1.1 or HTTP/1.0)"
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._send_json(code, {"error": message or phrase, "status": code})

    def log_request(self, code: Any = "-", size: Any = "-") -> None:  # logged by _send_json instead
        pass

    def log_message(self, format: str, *args: Any) -> None:
        app = self.server.app
        if app.log_requests:
            app._say(f"{self._peer()} {format % args}")

    def _peer(self) -> str:
        return "unix" if self._unix or not self.client_address else str(self.client_address[0])


def _may_have_body(headers: Any) -> bool:
    """Whether bytes of a body may follow these request headers (any Content-Length but one 0, any
    Transfer-Encoding, malformed lines): after an answer that did not read them, the connection
    cannot carry another request."""
    if headers is None:
        return False
    lengths = [value.strip() for value in headers.get_all("Content-Length") or []]
    return bool(headers.get("Transfer-Encoding") or headers.defects or (lengths and lengths != ["0"]))


class _RequestReader(io.RawIOBase):
    """A connection's input, read against one deadline per request rather than a timeout per
    read: a client sending a byte now and then gets no more time than one sending nothing.

    Between requests a read waits up to ``timeout`` for the next one's first byte; the request
    must then arrive within ``timeout`` of that byte (:meth:`restart` gives the body its own)."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._sock = sock
        self._timeout = timeout
        self._deadline: float | None = None

    def readable(self) -> bool:
        return True

    def between_requests(self) -> None:
        self._deadline = None

    def restart(self) -> None:
        self._deadline = time.monotonic() + self._timeout

    def readinto(self, buffer: Any) -> int:
        if self._deadline is None:
            timeout = self._timeout
        else:
            timeout = self._deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(timeout)
        n = self._sock.recv_into(buffer)
        if n and self._deadline is None:
            self._deadline = time.monotonic() + self._timeout
        return n


def _count(name: str, value: Any) -> int:
    """``value`` as a whole number of at least 1, else a ValueError naming ``name``."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or int(value) != value or value < 1):
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    return int(value)


def _seconds(name: str, value: Any) -> float:
    """``value`` as seconds: finite, above 0, at most :data:`MAX_READ_TIMEOUT`; else a ValueError."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not 0 < value <= MAX_READ_TIMEOUT):
        raise ValueError(f"{name} must be a finite number of seconds above 0 and at most "
                         f"{MAX_READ_TIMEOUT:g}, got {value!r}")
    return float(value)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500] + ("…" if len(text) > 500 else "") if text else type(exc).__name__


_SECRET = re.compile(r"key|token|secret|password|credential|auth", re.IGNORECASE)


def _public(options: Mapping[str, Any]) -> dict[str, Any]:
    """The reward's options as JSON, with values of secret-looking keys (``api_key``) hidden."""
    return {str(key): "<hidden>" if _SECRET.search(str(key)) else _jsonable(value) for key, value in options.items()}


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)


__all__ = ["DEFAULT_HOST", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_REQUEST_MB", "DEFAULT_PORT", "DEFAULT_READ_TIMEOUT",
           "MAX_READ_TIMEOUT", "MAX_REQUEST_MB", "ROUTES", "RewardServer", "is_loopback"]
