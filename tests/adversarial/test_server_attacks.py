"""Hostile clients of the reward server (``calibri reward serve``): a corpus of attacks and mistakes.

Before: four clients trickling a byte every few seconds held every ``--max-pending`` slot, so
valid requests got 503 for as long as they trickled (the timeout was per read); four clients
declaring 256 MiB bodies made the server allocate a gigabyte before any of it arrived;
``--max-request-mb nan``/``inf`` and ``--read-timeout nan``/``inf`` crashed with a traceback or
served with no timeout at all; and a server reachable from other machines served anyone. Now a
request has a deadline for its headers and another for its body, however it trickles them;
buffers grow with the bytes received; bad limits are one ``calibri: error:`` line naming the
option (exit 2) or a ``ValueError`` naming the parameter; and ``--token-file`` makes ``/score``
and ``/info`` answer 401 without ``Authorization: Bearer TOKEN``.

Every case ends by checking that the server still scores a valid request. Nothing here depends
on how fast the machine is: short server timeouts, generous bounds for what must happen
(polling, never sleeping for a fixed time and expecting the server to have acted).
"""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import math
import select
import socket
import threading
import time
import tracemalloc

import numpy as np
import pytest
from numpy.lib import format as npy_format

from calibri.rewards.base import Reward
from calibri.rewards.protocol import CONTENT_TYPE, TOKEN_ENV
from calibri.rewards.server import RewardServer

TIMEOUT = 10.0
#: How long something that must happen may take on a loaded machine before the case fails.
BOUND = 60.0
TOKEN = "s3cret-token_0123456789"


class PixelMean(Reward):
    """Mean pixel value of each image."""

    def score(self, images, prompts, metadata):
        return images.double().mean(dim=(1, 2, 3)).numpy()


@contextlib.contextmanager
def serving(**options):
    server = RewardServer(PixelMean(), "pixel_mean", port=0, **options).start()
    try:
        yield server
    finally:
        server.close(grace=2)


def npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()


GOOD = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
GOOD_BODY = b"{}\n" + npy(GOOD)
EXPECTED = PixelMean()(GOOD).tolist()


def post(server: RewardServer, data: bytes = GOOD_BODY, headers: dict | None = None,
         method: str = "POST", path: str = "/score") -> tuple[int, dict | None]:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    try:
        connection.request(method, path, body=data, headers={"Content-Type": CONTENT_TYPE, **(headers or {})})
        response = connection.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw) if raw else None)
    finally:
        connection.close()


def assert_serving(server: RewardServer, headers: dict | None = None) -> None:
    status, payload = post(server, headers=headers)
    assert status == 200 and payload["scores"] == EXPECTED, payload


def raw_exchange(server: RewardServer, data: bytes) -> bytes:
    """Send raw bytes, close our side, read until the server closes."""
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def status_of(response: bytes) -> int | None:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else None


def head(length: int | str, extra: bytes = b"") -> bytes:
    return (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: " + CONTENT_TYPE.encode() + b"\r\nContent-Length: "
            + str(length).encode("latin-1") + b"\r\n" + extra + b"\r\n")


# -- slow clients --------------------------------------------------------------------------------
class Trickler(threading.Thread):
    """Sends ``prefix``, then one byte of ``drip`` every 0.1 s until the server answers or closes."""

    def __init__(self, server: RewardServer, prefix: bytes, drip: bytes) -> None:
        super().__init__(daemon=True)
        self.address, self.prefix, self.drip = (server.host, server.port), prefix, drip
        self.outcome: str | int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        with socket.create_connection(self.address, timeout=TIMEOUT) as sock:
            try:
                sock.sendall(self.prefix)
                deadline = time.monotonic() + BOUND
                for i in range(len(self.drip)):
                    if self.stop.is_set() or time.monotonic() > deadline:
                        self.outcome = "still open"
                        return
                    sock.sendall(self.drip[i:i + 1])
                    if select.select([sock], [], [], 0.1)[0]:
                        answer = sock.recv(65536)
                        self.outcome = status_of(answer) if answer else "closed"
                        return
                self.outcome = "drip exhausted"
            except OSError:
                self.outcome = "closed"


NPY_HEADER = npy_format.MAGIC_PREFIX  # enough of an .npy start for the server to keep reading
SLOW = {  # phase: (prefix, drip, whether the trickler holds a --max-pending slot)
    "request-line": (b"", b"POST /" + b"a" * 60000, False),
    "headers": (b"POST /score HTTP/1.1\r\nHost: x\r\n", b"X-Pad: " + b"a" * 60000, False),
    "json-line": (head(8 * 2**20) + b'{"prompts": ["', b"a" * 60000, True),
    "npy-body": (head(8 * 2**20) + b"{}\n" + NPY_HEADER, b"\0" * 60000, True),
}


@pytest.mark.parametrize("phase", sorted(SLOW))
def test_trickling_clients_are_cut_off_and_valid_requests_still_served(phase):
    """Four tricklers (as many as --max-pending slots) against a 2 s whole-request timeout."""
    prefix, drip, holds_a_slot = SLOW[phase]
    with serving(read_timeout=2, max_pending=4) as server:
        tricklers = [Trickler(server, prefix, drip) for _ in range(4)]
        for trickler in tricklers:
            trickler.start()
        try:
            if holds_a_slot:  # let them take every slot before the valid request comes
                deadline = time.monotonic() + BOUND
                while server.health()["in_flight"] < 4 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert server.health()["in_flight"] == 4
            deadline, status = time.monotonic() + BOUND, None
            while time.monotonic() < deadline:
                status, payload = post(server)
                if status == 200:
                    assert payload["scores"] == EXPECTED
                    break
                assert status == 503, payload  # busy, never anything else
            assert status == 200, "valid requests were refused for as long as the clients trickled"
            for trickler in tricklers:
                trickler.join(BOUND + 5)
                assert trickler.outcome in (408, "closed"), trickler.outcome
        finally:
            for trickler in tricklers:
                trickler.stop.set()
        assert_serving(server)


def test_a_request_waiting_for_a_slot_keeps_its_own_time_for_the_body():
    """The body's deadline starts once there is room for it, not when the headers came."""
    with serving(read_timeout=2, max_pending=1) as server:
        holder = Trickler(server, head(8 * 2**20) + b"{}\n", b"\0" * 60000)
        holder.start()
        deadline = time.monotonic() + BOUND
        while server.health()["in_flight"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, payload = post(server)  # waits for the slot, then has 2 s for a body already sent
        assert status in (200, 503), payload
        holder.join(BOUND + 5)
        assert holder.outcome in (408, "closed"), holder.outcome
        assert_serving(server)


# -- huge declared bodies ------------------------------------------------------------------------
def test_declared_sizes_cost_no_memory_until_the_bytes_arrive():
    """Four clients declare 200 MiB each (under the 256 MiB limit), send 64 KiB and wait."""
    declared, sent = 200 * 2**20, 2**16
    tracemalloc.start()
    sockets = []
    try:
        with serving(max_request_bytes=256 * 2**20, read_timeout=BOUND) as server:
            prefix = head(declared) + b"{}\n" + npy_format.MAGIC_PREFIX
            data = prefix + b"\0" * (sent - len(prefix))
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            for _ in range(4):
                sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
                sockets.append(sock)
                sock.sendall(data)
            deadline = time.monotonic() + BOUND
            while server.health()["in_flight"] < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.health()["in_flight"] == 4
            # The server reads what came into its buffers; give it time to (wrongly) allocate.
            grown, deadline = 0, time.monotonic() + 2
            while time.monotonic() < deadline and grown < 64 * 2**20:
                grown = tracemalloc.get_traced_memory()[1] - before
                time.sleep(0.05)
            assert grown < 32 * 2**20, f"{grown / 2**20:.0f} MiB allocated for {4 * sent / 2**10:.0f} KiB received"
            for sock in sockets:
                sock.close()
            assert_serving(server)
    finally:
        for sock in sockets:
            sock.close()
        tracemalloc.stop()


def test_a_received_body_costs_memory_in_proportion():
    """Declared 64 MiB, sent 4 MiB: the buffer holds about what arrived (it doubles as it fills)."""
    declared, sent = 64 * 2**20, 4 * 2**20
    tracemalloc.start()
    try:
        with serving(max_request_bytes=256 * 2**20, read_timeout=BOUND) as server:
            prefix = head(declared) + b"{}\n" + npy_format.MAGIC_PREFIX
            data = prefix + b"\0" * (sent - len(prefix))
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
                sock.sendall(data)
                deadline = time.monotonic() + BOUND
                while tracemalloc.get_traced_memory()[1] - before < sent and time.monotonic() < deadline:
                    time.sleep(0.02)  # until the server has read (most of) it
                grown = tracemalloc.get_traced_memory()[1] - before
            assert sent <= grown < 4 * sent + 8 * 2**20, f"{grown / 2**20:.1f} MiB for {sent / 2**20:.0f} MiB"
            assert_serving(server)
    finally:
        tracemalloc.stop()


# -- malformed and hostile headers ---------------------------------------------------------------
def test_a_connection_flood_gets_503_and_cannot_take_every_thread():
    """More idle connections than ``max_connections``: the extra ones are answered 503 at once
    (no thread each), and once the idle ones go, requests are served again."""
    with serving(max_connections=3, read_timeout=BOUND) as server:
        idle = [socket.create_connection((server.host, server.port), timeout=TIMEOUT) for _ in range(3)]
        try:
            deadline = time.monotonic() + BOUND
            while True:  # the three take their slots as the server accepts them
                response = raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                if status_of(response) == 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert status_of(response) == 503 and b"too many connections" in response, response
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + BOUND
        while True:
            try:
                assert_serving(server)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _headers(*lines: bytes, body: bytes = GOOD_BODY, line_end: bytes = b"\r\n") -> bytes:
    return line_end.join((b"POST /score HTTP/1.1", b"Host: x", *lines, b"", b"")) + body


CL = b"Content-Length: %d" % len(GOOD_BODY)
MALFORMED = {  # case: (raw request, expected status; 200 means served correctly)
    "duplicate content-length": (_headers(CL, b"Content-Length: 5"), 400),
    "duplicate equal content-length": (_headers(CL, CL), 400),
    "content-length plus sign": (_headers(b"Content-Length: +%d" % len(GOOD_BODY)), 400),
    "content-length negative": (_headers(b"Content-Length: -5"), 400),
    "content-length hex": (_headers(b"Content-Length: 0x10"), 400),
    "content-length inner space": (_headers(b"Content-Length: 1 0"), 400),
    "content-length superscript digit": (_headers(b"Content-Length: \xb2"), 400),
    "content-length empty": (_headers(b"Content-Length: "), 400),
    "content-length 5000 digits": (_headers(b"Content-Length: " + b"9" * 5000, body=b""), 413),
    "content-length 10^30": (_headers(b"Content-Length: 1" + b"0" * 30, body=b""), 413),
    "content-length over the limit, no body": (_headers(b"Content-Length: %d" % (2**20 + 1), body=b""), 413),
    "chunked with content-length": (_headers(CL, b"Transfer-Encoding: chunked"), 411),
    "transfer-encoding identity": (_headers(b"Transfer-Encoding: identity"), 411),
    "no content-length": (_headers(body=b""), 411),
    "header without colon": (_headers(b"this is no header", CL), 400),
    "first header a continuation": (_headers(CL).replace(b"Host: x", b" Host: x", 1), 400),
    "nul in a header": (_headers(b"X-A: a\0b", CL), 200),
    "obs-fold continuation": (_headers(CL, b"X-A: a", b" folded"), 200),
    "lf line endings": (_headers(CL, line_end=b"\n"), 200),
    "expect 100-continue": (_headers(CL, b"Expect: 100-continue"), 200),
    "absolute-form target": (_headers(CL).replace(b"POST /score", b"POST http://x/score", 1), 200),
    "header line of 70000 bytes": (_headers(b"X-A: " + b"a" * 70000, CL), 431),
    "150 headers": (_headers(*[b"X-A: a"] * 150, CL), 431),
    "request line of 70000 bytes": (b"POST /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    "http/0.9 post": (b"POST /score\r\n", 400),
    "http/2 request line": (b"POST /score HTTP/2.0\r\n\r\n", 400),
    "binary request line": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    "non-ascii path": (_headers(CL).replace(b"/score", "/scöre".encode(), 1), 404),
    "content-type not ours": (_headers(CL, b"Content-Type: image/png"), 415),
}


@pytest.fixture(scope="module")
def server():
    with serving(max_batch=4, max_request_bytes=2**20, read_timeout=5) as server:
        yield server


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_http_gets_a_4xx_or_is_served_correctly(server, case):
    data, expected = MALFORMED[case]
    response = raw_exchange(server, data)
    if b"HTTP/1.1 100 Continue" in response.split(b"\r\n\r\n", 1)[0]:
        response = response.split(b"\r\n\r\n", 1)[1]
    assert status_of(response) == expected, response[:300]
    payload = json.loads(response.split(b"\r\n\r\n", 1)[1])
    if expected == 200:
        assert payload["scores"] == EXPECTED
    else:
        assert payload["status"] == expected and payload["error"]
    assert_serving(server)


# -- limits that are not numbers -----------------------------------------------------------------
BAD_OPTIONS = [(option, value) for option in ("--max-request-mb", "--read-timeout")
               for value in ("nan", "inf", "-inf", "0", "-1", "1e300", "ten")]


@pytest.mark.parametrize("option, value", BAD_OPTIONS, ids=[f"{o}={v}" for o, v in BAD_OPTIONS])
def test_limits_that_are_not_finite_positive_numbers_are_one_line_errors(cli_inproc, monkeypatch, option, value):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with socket.socket() as busy:  # had the option been taken, the command would fail on the port, not hang
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = cli_inproc("reward", "serve", "brightness", "--port", str(busy.getsockname()[1]), option, value)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calibri: error:") and option in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "cannot listen" not in result.stderr


BAD_ARGUMENTS = [("read_timeout", value) for value in (math.nan, math.inf, -math.inf, 0, -1.0, 1e12, True, "60")]
BAD_ARGUMENTS += [("max_request_bytes", value) for value in (math.nan, math.inf, 0, -1, 1.5, None)]
BAD_ARGUMENTS += [("max_batch", value) for value in (math.nan, 0, -3)]
BAD_ARGUMENTS += [("max_pending", value) for value in (0, math.inf)]
BAD_ARGUMENTS += [("token", value) for value in ("", "   ", "two words", "naïve", "a\nb", 5)]


@pytest.mark.parametrize("name, value", BAD_ARGUMENTS, ids=[f"{n}={v!r}" for n, v in BAD_ARGUMENTS])
def test_the_server_refuses_bad_limits_with_value_error(name, value):
    with pytest.raises(ValueError, match=f"^{name}"):
        RewardServer(PixelMean(), "x", port=0, **{name: value})


# -- authentication ------------------------------------------------------------------------------
AUTH = {  # case: (method, path, Authorization header values, expected status)
    "score without a token": ("POST", "/score", [], 401),
    "score with a wrong token": ("POST", "/score", [f"Bearer {TOKEN}x"], 401),
    "score with a token prefix": ("POST", "/score", [f"Bearer {TOKEN[:-1]}"], 401),
    "score with an empty token": ("POST", "/score", ["Bearer "], 401),
    "score with basic auth": ("POST", "/score", [f"Basic {TOKEN}"], 401),
    "score with the bare token": ("POST", "/score", [TOKEN], 401),
    "score with a right and a wrong header": ("POST", "/score", [f"Bearer {TOKEN}", "Bearer nope"], 401),
    "score with non-ascii bytes": ("POST", "/score", ["Bearer s3cr\xe9t"], 401),
    "info without a token": ("GET", "/info", [], 401),
    "head info without a token": ("HEAD", "/info", [], 401),
    "health without a token": ("GET", "/health", [], 200),
    "score with the token": ("POST", "/score", [f"Bearer {TOKEN}"], 200),
    "score with a lowercase scheme": ("POST", "/score", [f"bearer {TOKEN}"], 200),
    "score with extra spaces": ("POST", "/score", [f"Bearer   {TOKEN}  "], 200),
    "info with the token": ("GET", "/info", [f"Bearer {TOKEN}"], 200),
}


@pytest.fixture(scope="module")
def guarded():
    with serving(read_timeout=5, token=TOKEN) as server:
        yield server


@pytest.mark.parametrize("case", sorted(AUTH))
def test_a_token_server_answers_401_to_requests_without_its_token(guarded, case):
    method, path, values, expected = AUTH[case]
    lines = b"".join(b"Authorization: " + value.encode("latin-1") + b"\r\n" for value in values)
    data = GOOD_BODY if method == "POST" else b""
    request = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {CONTENT_TYPE}\r\n".encode()
               + (b"Content-Length: %d\r\n" % len(data) if data else b"") + lines + b"\r\n" + data)
    response = raw_exchange(guarded, request)
    assert status_of(response) == expected, response[:300]
    head_, _, body = response.partition(b"\r\n\r\n")
    if method == "HEAD":
        return
    payload = json.loads(body)
    if expected == 401:
        assert b"WWW-Authenticate: Bearer" in head_ and payload["status"] == 401
        assert TOKEN not in payload["error"]
    elif path == "/score":
        assert payload["scores"] == EXPECTED


def test_an_unauthenticated_body_is_never_read_or_held(guarded):
    """401 comes from the headers: a client declaring a body it never sends takes no slot."""
    with socket.create_connection((guarded.host, guarded.port), timeout=TIMEOUT) as sock:
        sock.sendall(head(2**20))
        answer = sock.recv(65536)
    assert status_of(answer) == 401
    assert_serving(guarded, headers={"Authorization": f"Bearer {TOKEN}"})


TOKEN_FILES = {  # case: (file contents or None for no file, the start of the message)
    "missing file": (None, "Invalid value for '--token-file'"),
    "empty file": ("", "the token is empty"),
    "blank file": ("  \n\n", "the token is empty"),
    "token with a space": ("two words\n", "the token must be printable ASCII without spaces"),
    "not ascii": ("naïve-token\n", "the token must be printable ASCII without spaces"),
}


@pytest.mark.parametrize("case", sorted(TOKEN_FILES))
def test_bad_token_files_are_one_line_errors(cli_inproc, monkeypatch, tmp_path, case):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    contents, fragment = TOKEN_FILES[case]
    path = tmp_path / "token"
    if contents is not None:
        path.write_text(contents, encoding="utf-8")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = cli_inproc("reward", "serve", "brightness", "--port", str(busy.getsockname()[1]),
                            "--token-file", path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert "--token-file" in lines[0]


@pytest.mark.parametrize("value", ["two words", "naïve", "a" * 5000])
def test_a_bad_token_in_the_environment_is_a_one_line_error(cli_inproc, monkeypatch, value):
    monkeypatch.setenv(TOKEN_ENV, value)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = cli_inproc("reward", "serve", "brightness", "--port", str(busy.getsockname()[1]))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and TOKEN_ENV in lines[0] and "Traceback" not in result.stderr, result.stderr
