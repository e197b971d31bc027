"""The reward server (``calibri reward serve``) and the ``remote`` reward.

Servers listen on 127.0.0.1 with an ephemeral port (or on a Unix socket in a temporary folder),
in a background thread; one test runs the real command in a subprocess. Every request has a
timeout and every loop a fixed count. This module is also a plugin (``--plugin
test_reward_server``) registering ``pixel_mean_test``.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import http.client
import io
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.lib import format as npy_format

from calibri.core.errors import ConfigError, UserError
from calibri.core.hookspecs import hookimpl
from calibri.rewards.base import Reward
from calibri.rewards.protocol import CONTENT_TYPE, HEADER_KEYS, TOKEN_ENV
from calibri.rewards.remote import (RemoteReward, RewardRequestError, RewardServerError, RewardServerUnavailable,
                                    parse_options)
from calibri.rewards.server import RewardServer, is_loopback

from conftest import cli_command, cli_env

TIMEOUT = 10.0
FUZZ = settings(max_examples=80, deadline=3000, database=None, suppress_health_check=[HealthCheck.too_slow])


# -- test rewards --------------------------------------------------------------------------------
class PixelMean(Reward):
    """Mean pixel value of each image (float64), times ``scale``."""

    def __init__(self, batch_size: int = 16, device: str = "cpu", scale: float = 1.0) -> None:
        super().__init__(batch_size=batch_size, device=device)
        self.scale = scale

    def score(self, images, prompts, metadata):
        return images.double().mean(dim=(1, 2, 3)).numpy() * self.scale


class Prompted(Reward):
    """Uses the prompt and metadata; lower is better."""

    uses_prompt = True
    higher_is_better = False
    needs = "cuda"

    def score(self, images, prompts, metadata):
        return [float(images[i].double().mean()) + len(prompt) + float(meta.get("bonus", 0))
                for i, (prompt, meta) in enumerate(zip(prompts, metadata))]


class Exclusive(PixelMean):
    """Fails if two threads score with this instance at once."""

    def __init__(self) -> None:
        super().__init__()
        self._busy = threading.Lock()
        self.calls = 0

    def score(self, images, prompts, metadata):
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("scored by two threads at once")
        try:
            self.calls += 1
            time.sleep(0.002)
            return super().score(images, prompts, metadata)
        finally:
            self._busy.release()


class Slow(PixelMean):
    """Waits for ``release`` (at most ``delay`` s) before scoring."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.release = threading.Event()

    def score(self, images, prompts, metadata):
        self.release.wait(self.delay)
        return super().score(images, prompts, metadata)


class Failing(PixelMean):
    """Raises ``error`` on its first ``failures`` calls."""

    def __init__(self, failures: int, error: type[Exception] = RuntimeError) -> None:
        super().__init__()
        self.failures, self.error, self.calls = failures, error, 0

    def score(self, images, prompts, metadata):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return super().score(images, prompts, metadata)


class Hoarder(PixelMean):
    """Keeps every batch it scored (so the server must not reuse their memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def score(self, images, prompts, metadata):
        self.kept.append((images, images.clone()))
        return super().score(images, prompts, metadata)


@hookimpl
def calibri_register_rewards(register):
    register("pixel_mean_test", PixelMean)


# -- helpers -------------------------------------------------------------------------------------
@contextlib.contextmanager
def serving(rewards, name: str = "test", **options):
    server = RewardServer(rewards, name, port=0, **options).start()
    try:
        yield server
    finally:
        server.close(grace=2)


def client(server: RewardServer, **options) -> RemoteReward:
    options = {"timeout": TIMEOUT, "backoff": 0.01, **options}
    return RemoteReward(server.url, **options)


def npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()


def body(array: np.ndarray | None, header: dict | bytes | None = None) -> bytes:
    line = header if isinstance(header, bytes) else json.dumps(header or {}).encode()
    return line + b"\n" + (npy(array) if array is not None else b"")


def request(server: RewardServer, method: str, path: str, data: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict | None, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    try:
        connection.request(method, path, body=data, headers={"Content-Type": CONTENT_TYPE, **(headers or {})})
        response = connection.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw) if raw else None), response
    finally:
        connection.close()


def post(server: RewardServer, data: bytes, **kwargs) -> tuple[int, dict | None]:
    status, payload, _ = request(server, "POST", "/score", data, **kwargs)
    return status, payload


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
    if not response.startswith(b"HTTP/"):
        return None
    return int(response.split(b" ", 2)[1])


def images_nhwc(n: int = 2, h: int = 5, w: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def canonical(n: int = 3, h: int = 6, w: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, 3, h, w), dtype=np.float32))


def assert_serving(server: RewardServer) -> None:
    array = images_nhwc(1)
    status, payload = post(server, body(array))
    assert status == 200, payload
    assert payload["scores"] == PixelMean()(array).tolist()


@pytest.fixture(scope="module")
def fuzz_server():
    with serving(PixelMean(), "pixel_mean", max_batch=4, max_request_bytes=2**20, read_timeout=2) as server:
        yield server


# -- scores --------------------------------------------------------------------------------------
def test_remote_scores_equal_in_process_exactly():
    from calibri.rewards.offline import Sharpness

    images = canonical(5, 24, 20)
    with serving(Sharpness(), "sharpness") as server:
        remote = client(server)
        expected = Sharpness()(images)
        got = remote(images)
        assert got.dtype == np.float64 and np.array_equal(got, expected)
        assert np.array_equal(remote(images.numpy().transpose(0, 2, 3, 1)), expected)  # any accepted form
        uint8 = images_nhwc(4, 9, 11)  # 8-bit images: the uint8 encoding is exact for them
        assert np.array_equal(client(server, encoding="uint8")(uint8), Sharpness()(uint8))
        assert np.array_equal(remote(uint8), Sharpness()(uint8))


def test_prompts_metadata_and_attributes_come_from_the_server():
    images = canonical(3)
    prompts, metadata = ["a", "bb", "ccc"], [{"bonus": 1}, {}, {"bonus": 2.5}]
    with serving(Prompted(), "prompted") as server:
        remote = client(server)
        assert np.array_equal(remote(images, prompts, metadata), Prompted()(images, prompts, metadata))
        assert remote.higher_is_better is False and remote.uses_prompt is True and remote.needs == "cuda"
        with pytest.raises(ValueError, match="3 images but 2 prompts"):
            remote(images, prompts[:2])


def test_batches_are_split_to_the_server_limits():
    images = canonical(11, 8, 8)
    expected = PixelMean()(images)
    with serving(PixelMean(), max_batch=3, max_request_bytes=4 * images[0].numel() * 4 + 8192) as server:
        assert np.array_equal(client(server, batch_size=16)(images), expected)
        assert server.health()["requests"] >= 4
    with serving(PixelMean(), max_request_bytes=1000) as server:
        with pytest.raises(ValueError, match="does not fit in a request"):
            client(server)(images)


def test_health_and_info():
    options = {"alpha": 1, "api_key": "s3cret"}
    with serving(Prompted(), "prompted", max_batch=7, max_request_bytes=12345, options=options) as server:
        status, health, _ = request(server, "GET", "/health")
        assert status == 200 and health["status"] == "ok" and health["reward"] == "prompted"
        status, info, response = request(server, "GET", "/info")
        assert status == 200 and response.getheader("Content-Type") == "application/json"
        assert info["reward"] == "prompted" and info["higher_is_better"] is False and info["uses_prompt"] is True
        assert info["needs"] == "cuda" and info["max_batch"] == 7 and info["max_request_bytes"] == 12345
        assert info["protocol"] == 1 and info["options"] == {"alpha": 1, "api_key": "<hidden>"}
        assert set(info["dtypes"]) == {"uint8", "float32"} and info["workers"] == 1
        status, _, response = request(server, "HEAD", "/health")
        assert status == 200 and response.getheader("Content-Length")


# -- malformed input -----------------------------------------------------------------------------
GOOD = images_nhwc(2)
FLOATS = GOOD.astype(np.float32) / 255


def _object_npy() -> bytes:
    stream = io.BytesIO()
    npy_format.write_array_header_1_0(stream, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    return stream.getvalue() + b"\0" * 8


MALFORMED = {
    "bad json": (b"{nope\n" + npy(GOOD), 400, "bad JSON header"),
    "json not an object": (body(GOOD, b"[1, 2]"), 400, "expected an object"),
    "unknown header key": (body(GOOD, {"prompt": ["x", "y"]}), 400, "unknown key 'prompt'"),
    "bad layout": (body(GOOD, {"layout": "chw"}), 400, "layout must be one of"),
    "other protocol": (body(GOOD, {"protocol": 2}), 400, "unsupported protocol"),
    "prompts not strings": (body(GOOD, {"prompts": ["a", 3]}), 400, "prompts[1] must be a string"),
    "metadata not objects": (body(GOOD, {"metadata": [{}, []]}), 400, "metadata[1] must be an object"),
    "prompts count": (body(GOOD, {"prompts": ["a"]}), 400, "2 images but 1 prompts"),
    "metadata count": (body(GOOD, {"metadata": [{}] * 3}), 400, "2 images but 3 metadata"),
    "no newline": (b'{"prompts": []}', 400, "JSON header line ended by a newline"),
    "not npy": (b"{}\n" + b"PNG....", 400, "bad npy"),
    "truncated npy": (body(GOOD)[:-5], 400, "truncated"),
    "trailing bytes": (body(GOOD) + b"xx", 400, "trailing bytes"),
    "npy header garbage": (b"{}\n\x93NUMPY\x01\x00\x10\x00{'descr': oops}  \n", 400, "bad npy header"),
    "object dtype": (b"{}\n" + _object_npy(), 400, "wrong dtype"),
    "float64": (body(FLOATS.astype(np.float64)), 400, "wrong dtype: expected uint8 or float32 images, got float64"),
    "int16": (body(GOOD.astype(np.int16)), 400, "got int16"),
    "3-d": (body(GOOD[0]), 400, "wrong shape"),
    "4 channels": (body(np.zeros((1, 4, 4, 4), np.uint8)), 400, "wrong shape"),
    "nchw given as nhwc": (body(GOOD.transpose(0, 3, 1, 2).copy()), 400, "wrong shape"),
    "empty batch": (body(np.zeros((0, 4, 4, 3), np.uint8)), 400, "no images"),
    "zero-size image": (body(np.zeros((1, 0, 4, 3), np.uint8)), 400, "at least 1×1"),
    "nan": (body(np.where(FLOATS > 0.5, np.nan, FLOATS).astype(np.float32)), 400, "NaN"),
    "infinity": (body(np.full((1, 2, 2, 3), np.inf, np.float32)), 400, "NaN or infinite"),
    "out of range": (body(FLOATS * 1.5), 400, "out of range"),
    "negative": (body(FLOATS - 0.5), 400, "out of range"),
    "too many images": (body(np.zeros((5, 2, 2, 3), np.uint8)), 413, "at most 4 per request"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_get_a_4xx_naming_the_problem(fuzz_server, case):
    data, expected, fragment = MALFORMED[case]
    status, payload = post(fuzz_server, data)
    assert status == expected, payload
    assert payload["status"] == expected and fragment in payload["error"]
    assert_serving(fuzz_server)


def test_the_connection_survives_a_rejected_request(fuzz_server):
    connection = http.client.HTTPConnection(fuzz_server.host, fuzz_server.port, timeout=TIMEOUT)
    try:
        for data, expected in ((body(GOOD, b"[]"), 400), (body(GOOD), 200), (body(FLOATS * 2), 400), (body(GOOD), 200)):
            connection.request("POST", "/score", body=data, headers={"Content-Type": CONTENT_TYPE})
            response = connection.getresponse()
            assert response.status == expected
            response.read()
    finally:
        connection.close()


def test_paths_methods_and_http_errors(fuzz_server):
    status, payload, _ = request(fuzz_server, "GET", "/nope")
    assert status == 404 and "unknown path '/nope'" in payload["error"]
    status, payload, response = request(fuzz_server, "GET", "/score")
    assert status == 405 and response.getheader("Allow") == "POST" and "not allowed" in payload["error"]
    status, payload, response = request(fuzz_server, "DELETE", "/health")
    assert status == 405 and response.getheader("Allow") == "GET, HEAD"
    status, _, _ = request(fuzz_server, "BREW", "/info", b"coffee")
    assert status == 405
    status, payload, _ = request(fuzz_server, "POST", "/score?x=1", body(GOOD), headers={"Content-Type": "image/png"})
    assert status == 415 and "application/x-calibri-reward" in payload["error"]
    status, payload = post(fuzz_server, body(GOOD), headers={"Content-Length": "12x"})
    assert status == 400 and "bad Content-Length" in payload["error"]

    def raw(data: bytes) -> tuple[int | None, bytes]:
        response = raw_exchange(fuzz_server, data)
        return status_of(response), response

    assert raw(b"POST /score HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 411
    chunked = raw(b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert chunked[0] == 411 and b"Content-Length" in chunked[1]
    assert raw(b"GET /health HTTP/2.0\r\n\r\n")[0] == 400
    assert raw(b"\x00\x01garbage\r\n\r\n")[0] == 400
    assert raw(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")[0] == 414
    assert raw(b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 150 + b"\r\n")[0] == 431
    assert raw(b"") == (None, b"")
    assert_serving(fuzz_server)


def test_oversized_requests_get_413_and_the_server_carries_on(fuzz_server):
    # Declared too large: answered from the headers, before any of the body is read.
    with socket.create_connection((fuzz_server.host, fuzz_server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000000\r\n\r\n" + b"x" * 1000)
        head = b""
        for _ in range(100):  # headers and body may come in separate segments
            chunk = sock.recv(65536)
            head += chunk
            if not chunk or head.endswith(b"}"):
                break
    assert status_of(head) == 413 and b"at most 1048576" in head
    # Really sent (3 MiB against a 1 MiB limit): the client still gets to read the answer.
    big = body(np.zeros((1, 1024, 1024, 3), np.uint8))
    status, payload = post(fuzz_server, big)
    assert status == 413 and "request too large" in payload["error"]
    with pytest.raises(RewardRequestError, match="HTTP 413"):
        remote = client(fuzz_server)
        remote._info = {**remote.info(), "max_request_bytes": 10**9}  # pretend the limit is larger
        remote(torch.zeros(1, 3, 600, 600))
    assert_serving(fuzz_server)


def test_slow_and_piled_up_requests_time_out_with_4xx_and_503():
    slow = Slow(delay=5)
    with serving(slow, read_timeout=0.3, max_pending=1) as server:
        with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:  # body never comes
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}\n")
            assert status_of(sock.recv(65536)) == 408
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, server, body(GOOD))  # holds the only pending slot
            deadline = time.monotonic() + TIMEOUT
            while server.health()["in_flight"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            status, payload = post(server, body(GOOD))
            assert status == 503 and "server busy" in payload["error"]
            slow.release.set()
            assert first.result(timeout=TIMEOUT)[0] == 200


# -- rewards that fail ---------------------------------------------------------------------------
def test_reward_errors_5xx_are_retried_a_bounded_number_of_times_4xx_never():
    failing = Failing(failures=10)
    with serving(failing) as server:
        remote = client(server, retries=2)
        with pytest.raises(RewardServerError, match=r"failed: HTTP 500: reward 'test' failed: RuntimeError: "
                                                    r"failure 3 \(after 3 attempts\)") as error:
            remote(canonical(2))
        assert failing.calls == 3 and error.value.status == 500
        assert not isinstance(error.value, ValueError)
    flaky = Failing(failures=2)
    with serving(flaky) as server:
        assert np.array_equal(client(server, retries=2)(canonical(2)), PixelMean()(canonical(2)))
        assert flaky.calls == 3
    picky = Failing(failures=10, error=ValueError)
    with serving(picky) as server:
        with pytest.raises(RewardRequestError, match="HTTP 422") as error:
            client(server, retries=3)(canonical(2))
        assert picky.calls == 1 and isinstance(error.value, ValueError)
        with pytest.raises(ValueError, match="HTTP 400.*NaN"):  # the server checks the values
            client(server)(torch.full((1, 3, 2, 2), float("nan")))
        with pytest.raises(ValueError, match="NaN"):  # checked before quantising
            client(server, encoding="uint8")(torch.full((1, 3, 2, 2), float("nan")))
        assert picky.calls == 1
        assert client(server).health()["status"] == "ok"


def test_kept_inputs_are_never_overwritten():
    hoarder = Hoarder()
    with serving(hoarder) as server:
        remote = client(server)
        for seed in range(4):
            remote(canonical(2, 8, 8, seed=seed))
        assert len(hoarder.kept) == 4
        for kept, copy_ in hoarder.kept:
            assert torch.equal(kept, copy_)
    with serving(PixelMean()) as server:
        remote = client(server)
        for seed in range(3):
            remote(canonical(2, 8, 8, seed=seed))
        assert len(server._buffers) == 1  # one buffer, reused


# -- concurrency ---------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_clients_get_their_own_scores(workers):
    rewards = [Exclusive() for _ in range(workers)]
    with serving(rewards, max_pending=3) as server:
        shared = client(server)

        def work(thread: int) -> list[bool]:
            results = []
            for i in range(5):
                images = canonical(1 + (thread + i) % 4, 8 + thread, 8 + i, seed=100 * thread + i)
                results.append(bool(np.array_equal(shared(images), PixelMean()(images))))
            return results

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(work, thread) for thread in range(8)]
            results = [ok for future in futures for ok in future.result(timeout=60)]
        assert results == [True] * 40
        assert sum(reward.calls for reward in rewards) == 40


def test_close_waits_for_requests_in_flight():
    slow = Slow(delay=5)
    server = RewardServer(slow, "slow", port=0).start()
    remote = client(server)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(remote, canonical(2))
        deadline = time.monotonic() + TIMEOUT
        while server.health()["in_flight"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        threading.Timer(0.2, slow.release.set).start()
        start = time.monotonic()
        server.close(grace=5)
        assert 0.1 < time.monotonic() - start < 4
        assert np.array_equal(future.result(timeout=TIMEOUT), PixelMean()(canonical(2)))
    with pytest.raises(RewardServerUnavailable, match="connection refused"):
        RemoteReward(server.url, retries=0, timeout=2)(canonical(1))


# -- the client when things go wrong -------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_client_without_a_server_fails_with_one_line():
    port = _free_port()
    remote = RemoteReward(f"http://127.0.0.1:{port}", retries=2, backoff=0.05, timeout=2)
    start = time.monotonic()
    with pytest.raises(RewardServerUnavailable) as error:
        remote(canonical(1))
    assert str(error.value) == f"no reward server at http://127.0.0.1:{port}: connection refused (after 3 attempts)"
    assert isinstance(error.value, UserError) and 0.1 <= time.monotonic() - start < 2
    with pytest.raises(RewardServerUnavailable, match="no reward server"):
        remote.higher_is_better
    with pytest.raises(RewardServerUnavailable, match="no such socket file"):
        RemoteReward("unix:/nonexistent/reward.sock", retries=0)(canonical(1))


def test_client_timeout_is_not_retried():
    slow = Slow(delay=5)
    with serving(slow) as server:
        remote = client(server, timeout=0.3, retries=3)
        remote.info()
        start = time.monotonic()
        with pytest.raises(RewardServerError, match=r"within 0.3 s \(timeout\)"):
            remote(canonical(1))
        assert time.monotonic() - start < 1.5
        slow.release.set()


def test_a_connection_closed_by_the_server_is_reopened_without_a_retry():
    with serving(PixelMean(), read_timeout=0.2) as server:
        remote = client(server, retries=0)
        remote(canonical(1))
        time.sleep(0.5)  # the server drops the idle kept-alive connection
        assert np.array_equal(remote(canonical(2)), PixelMean()(canonical(2)))


def test_not_a_reward_server():
    with serving(PixelMean()) as server:
        remote = RemoteReward(server.url + "/nested", retries=0, timeout=TIMEOUT)
        with pytest.raises(RewardRequestError, match="HTTP 404.*unknown path '/nested/info'"):
            remote(canonical(1))


# -- the remote reward in the registry -----------------------------------------------------------
def test_remote_is_registered_and_validates_its_options():
    from calibri.rewards.combine import build_reward

    with serving(PixelMean()) as server:
        remote = build_reward({"name": "remote", "options": {"url": server.url, "timeout": 5, "retries": 1}})
        assert isinstance(remote, RemoteReward) and remote.timeout == 5.0 and remote.retries == 1
        assert np.array_equal(remote(canonical(2)), PixelMean()(canonical(2)))
        clone = copy.deepcopy(remote)  # no connection or lock travels with it
        assert np.array_equal(clone(canonical(2)), PixelMean()(canonical(2)))
    with pytest.raises(ConfigError, match=r"reward.options.encoding"):
        build_reward({"name": "remote", "options": {"encoding": "jpeg"}})
    with pytest.raises(ConfigError, match="url must be"):
        build_reward({"name": "remote", "options": {"url": "ftp://x"}})
    with pytest.raises(ConfigError, match="retries must be 0 or more"):
        build_reward({"name": "remote", "options": {"retries": -1}})
    assert RemoteReward("http://example.org:81/base/").url == "http://example.org:81/base"
    assert RemoteReward("unix:///tmp/r.sock").url == "unix:/tmp/r.sock"


# -- tokens --------------------------------------------------------------------------------------
def test_a_token_server_scores_for_clients_with_its_token(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    images = canonical(2)
    expected = PixelMean()(images)
    token_file = tmp_path / "token"
    token_file.write_text("tok-0123456789\n")
    with serving(PixelMean(), token="tok-0123456789", options={"token": "tok-0123456789"}) as server:
        assert np.array_equal(client(server, token="tok-0123456789")(images), expected)
        assert np.array_equal(client(server, token_file=str(token_file))(images), expected)
        monkeypatch.setenv(TOKEN_ENV, "tok-0123456789")
        assert np.array_equal(client(server)(images), expected)
        assert client(server).info()["options"] == {"token": "<hidden>"}
        monkeypatch.delenv(TOKEN_ENV)
        with pytest.raises(RewardRequestError, match=r"HTTP 401\): this server needs a token.*token_file") as error:
            client(server)(images)
        assert error.value.status == 401 and isinstance(error.value, ValueError)
        with pytest.raises(RewardRequestError, match=r"HTTP 401\): wrong token"):
            client(server, token="tok-0123456788")(images)
        assert client(server).health()["status"] == "ok"  # liveness probes need no token
    with serving(PixelMean()) as server:  # a server without a token ignores one
        assert np.array_equal(client(server, token="anything")(images), expected)


def test_remote_token_options_are_checked(tmp_path, monkeypatch):
    from calibri.rewards.combine import build_reward

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="give token or token_file, not both"):
        RemoteReward(token="a", token_file=str(tmp_path / "t"))
    with pytest.raises(ConfigError, match=r"reward.options: reward 'remote': token_file: cannot read .*No such file"):
        build_reward({"name": "remote", "options": {"token_file": str(tmp_path / "missing")}})
    with pytest.raises(ConfigError, match="token: the token must be printable ASCII without spaces"):
        build_reward({"name": "remote", "options": {"token": "two words"}})
    monkeypatch.setenv(TOKEN_ENV, "bad token")
    with pytest.raises(ValueError, match=f"{TOKEN_ENV}: the token must be printable ASCII"):
        RemoteReward()
    assert "tok" not in repr(RemoteReward(token="tok-secret"))


# -- Unix sockets --------------------------------------------------------------------------------
def test_unix_socket_server(tmp_path):
    path = tmp_path / "reward.sock"
    images = canonical(4, 10, 12)
    with serving(PixelMean(), unix_socket=path) as server:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert server.url == f"unix:{path}"
        assert np.array_equal(RemoteReward(server.url, timeout=TIMEOUT)(images), PixelMean()(images))
        with pytest.raises(OSError, match="already listening"):
            RewardServer(PixelMean(), "again", unix_socket=path)
    assert not path.exists()
    stale = socket.socket(socket.AF_UNIX)  # a socket file nobody listens on any more
    stale.bind(str(path))
    stale.close()
    with serving(PixelMean(), unix_socket=path) as server:
        assert np.array_equal(RemoteReward(server.url, timeout=TIMEOUT)(images), PixelMean()(images))
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        RewardServer(PixelMean(), "file", unix_socket=path)


# -- the command ---------------------------------------------------------------------------------
def test_serve_command_end_to_end(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    (tmp_path / "token").write_text("e2e-token-0123\n")
    proc = subprocess.Popen(cli_command("reward", "serve", "pixel_mean_test", "--plugin", "test_reward_server",
                                        "--port", "0", "--option", "scale=2", "--max-batch", "8", "--log-requests",
                                        "--token-file", "token", "--read-timeout", "30"),
                            cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _read_line(proc, timeout=60)
        assert line.startswith("calibri: serving reward 'pixel_mean_test' at http://127.0.0.1:"), line
        assert "clients need the token from --token-file" in line
        url = line.split(" at ")[1].split()[0]
        remote = RemoteReward(url, timeout=TIMEOUT, retries=0, token_file=str(tmp_path / "token"))
        images = canonical(3)
        assert np.array_equal(remote(images), PixelMean(scale=2)(images))
        assert remote.info()["max_batch"] == 8 and remote.info()["options"] == {"scale": 2}
        assert remote.info()["read_timeout"] == 30
        with pytest.raises(RewardRequestError, match="HTTP 401"):
            RemoteReward(url, timeout=TIMEOUT, retries=0)(images)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "reward server stopped" in out and "POST '/score' 200" in err and "GET '/info' 401" in err


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not lines or not lines[0]:
        proc.kill()
        raise AssertionError(f"the server did not start: {proc.communicate()[1]}")
    return lines[0]


def test_serve_command_refuses_mistakes(cli_inproc):
    result = cli_inproc("reward", "serve", "brightness", "--host", "0.0.0.0")
    assert result.returncode == 2 and "refusing to listen on '0.0.0.0'" in result.stderr
    assert "--allow-remote" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = cli_inproc("reward", "serve", "no_such_reward", "--port", "0")
    assert result.returncode == 2 and "unknown reward 'no_such_reward'" in result.stderr
    result = cli_inproc("reward", "serve", "brightness", "--option", "novalue", "--port", "0")
    assert result.returncode == 2 and "expected KEY=VALUE" in result.stderr
    result = cli_inproc("reward", "serve", "jpeg_compressibility", "--option", "nope=1", "--port", "0")
    assert result.returncode == 2 and "reward.options.nope: unknown option" in result.stderr
    result = cli_inproc("reward", "serve", "brightness", "--unix-socket", "s.sock", "--port", "1")
    assert result.returncode == 2 and "either --unix-socket or --host/--port" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = cli_inproc("reward", "serve", "brightness", "--port", str(busy.getsockname()[1]))
    assert result.returncode == 2 and "cannot listen on 127.0.0.1:" in result.stderr


def test_option_parsing_and_loopback_detection():
    assert parse_options(["quality=90", "name=a b", "flag=true", "empty=", "list=[1, 2]"]) == {
        "quality": 90, "name": "a b", "flag": True, "empty": "", "list": [1, 2]}
    with pytest.raises(ConfigError, match="given twice"):
        parse_options(["a=1", "a=2"])
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("::")


# -- fuzzing the server's input handling ---------------------------------------------------------
def _check_4xx(server: RewardServer, data: bytes, allow_ok: bool = False) -> dict | None:
    status, payload = post(server, data)
    assert 400 <= status < 500 or (allow_ok and status == 200), (status, payload)
    assert isinstance(payload, dict) and ("error" in payload or "scores" in payload)
    return payload if status == 200 else None


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bodies(fuzz_server, data):
    _check_4xx(fuzz_server, data)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


@FUZZ
@given(st.one_of(JSON_VALUES, st.dictionaries(st.sampled_from(HEADER_KEYS + ("extra",)), JSON_VALUES, max_size=4)))
def test_fuzz_random_json_headers(fuzz_server, header):
    payload = _check_4xx(fuzz_server, body(GOOD, json.dumps(header).encode()), allow_ok=True)
    if payload is not None:
        assert payload["scores"] == PixelMean()(GOOD).tolist()


@FUZZ
@given(st.data())
def test_fuzz_truncated_requests(fuzz_server, data):
    good = body(GOOD, {"prompts": ["a", "b"], "layout": "nhwc"})
    cut = data.draw(st.integers(0, len(good) - 1))
    _check_4xx(fuzz_server, good[:cut])


@FUZZ
@given(st.binary(min_size=1, max_size=300))
def test_fuzz_raw_http(fuzz_server, data):
    response = raw_exchange(fuzz_server, data)
    status = status_of(response)
    assert response == b"" or status is None or 400 <= status < 500, response[:200]


@st.composite
def image_arrays(draw):
    layout = draw(st.sampled_from(["nhwc", "nchw"]))
    mode = draw(st.sampled_from(["valid", "near", "any"]))
    if mode == "valid":  # well-formed; the values may still be out of range
        dtype = draw(st.sampled_from(["u1", "<f4", ">f4"]))
        n, h, w, c = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), 3
    else:
        dtype = draw(st.sampled_from(["u1", "<f4", ">f4", "<f8", "<i2", "|b1", "<f2", "<c8"]))
        n, h, w = draw(st.integers(0, 5)), draw(st.integers(0, 3)), draw(st.integers(0, 3))
        c = draw(st.sampled_from([3, 1, 4]))
    if mode == "any":
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4))
    else:
        shape = (n, h, w, c) if layout == "nhwc" else (n, c, h, w)
    in_range = dtype in ("<f4", ">f4") and draw(st.booleans())
    elements = st.floats(0, 1, width=32) if in_range else None
    return draw(hnp.arrays(np.dtype(dtype), shape, elements=elements)), layout


@FUZZ
@given(image_arrays())
def test_fuzz_arrays_of_any_shape_and_dtype(fuzz_server, case):
    array, layout = case
    status, payload = post(fuzz_server, body(array, {"layout": layout}))
    event(f"HTTP {status}")
    channels = (array.shape[-1] if layout == "nhwc" else array.shape[1]) if array.ndim == 4 else None
    dims_ok = channels == 3 and min(array.shape) > 0
    valid = array.dtype.kind == "u" or (array.dtype.kind == "f" and array.dtype.itemsize == 4)
    if not (valid and dims_ok):
        assert 400 <= status < 500, (status, payload)
        return
    native = array.astype(array.dtype.newbyteorder("="))
    try:
        expected = PixelMean()(native if layout == "nhwc" else torch.from_numpy(native)).tolist()
    except ValueError:
        expected = None
    if array.shape[0] > 4:
        assert status == 413, payload
    elif expected is None:
        assert status == 400, payload
    else:
        assert status == 200 and payload["scores"] == expected, payload
