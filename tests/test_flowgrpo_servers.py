"""Clients of Flow-GRPO's reward servers, against stub servers on 127.0.0.1: the GenEval/DeQA pickle
protocol (opt-in, loopback only, answers read with a restricted unpickler) and the OpenAI-style
UnifiedReward chat API."""
from __future__ import annotations

import base64
import io
import json
import os
import pickle
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from calibri.core.errors import ConfigError, UserError
from calibri.plugins.flow_grpo.safe_pickle import UnsafePickleError, loads
from calibri.plugins.flow_grpo.servers import DeQAReward, GenEvalReward, UnifiedReward
from calibri.rewards.combine import build_reward
from calibri.rewards.remote import RewardServerError, RewardServerUnavailable

FIELD = "objective.options.reward"
Respond = Callable[[str, dict, bytes], tuple[int, bytes]]


class Stub:
    """An HTTP server in a thread answering every POST with ``respond(path, headers, body)``."""

    def __init__(self, respond: Respond) -> None:
        self.requests: list[tuple[str, dict, bytes]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stub.requests.append((self.path, dict(self.headers), body))
                status, answer = respond(self.path, dict(self.headers), body)
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers: list[Stub] = []

    def start(respond: Respond) -> Stub:
        servers.append(Stub(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def batch(n: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


PROMPTS = ["a photo of two wine glasses", "a photo of a bench", "a photo of a red car"]
METADATA = [{"tag": "counting", "prompt": PROMPTS[0]}, {"tag": "single_object"},
            {"tag": "colors", "prompt": PROMPTS[2]}]


def geneval_server(request: dict) -> dict:
    """What a GenEval server answers: per-image scores; per-tag lists with −10 for other tags.
    NumPy values, as the real servers compute them."""
    from PIL import Image

    tags = [meta["tag"] for meta in request["meta_datas"]]
    for data in request["images"]:
        assert Image.open(io.BytesIO(data)).format == "JPEG"
    scores = np.asarray([0.25 * (i + 1) for i in range(len(tags))])
    groups = {tag: np.asarray([1.0 if t == tag else -10.0 for t in tags]) for tag in sorted(set(tags))}
    return {"scores": scores, "rewards": [np.float64(s) for s in scores], "strict_rewards": [0.0] * len(tags),
            "group_rewards": groups, "group_strict_rewards": {tag: v.tolist() for tag, v in groups.items()}}


# -- the GenEval / DeQA protocol -------------------------------------------------------------------------
def test_geneval_scores_details_and_the_request_format(stub):
    server = stub(lambda path, headers, body: (200, pickle.dumps(geneval_server(pickle.loads(body)))))
    reward = build_reward({"name": "flowgrpo.geneval", "options": {"url": server.url, "allow_pickle": True,
                                                                   "batch_size": 2}}, field=FIELD)
    total, details = reward.score_with_details(batch(), PROMPTS, METADATA)
    np.testing.assert_allclose(total, [0.25, 0.5, 0.25])  # two requests: a batch of 2, then 1
    assert len(server.requests) == 2
    request = pickle.loads(server.requests[0][2])
    assert set(request) == {"images", "meta_datas", "only_strict"} and request["only_strict"] is True
    assert [m["prompt"] for m in request["meta_datas"]] == PROMPTS[:2]  # filled in where missing
    assert server.requests[0][0] == "/"
    # −10 ("this image has another tag") is NaN: excluded from means, as Flow-GRPO's mean over values ≠ −10.
    np.testing.assert_array_equal(details["counting_accuracy"], [1.0, np.nan, np.nan])
    np.testing.assert_array_equal(details["single_object_strict_accuracy"], [np.nan, 1.0, np.nan])
    np.testing.assert_array_equal(details["colors_accuracy"], [np.nan, np.nan, 1.0])  # only in the second batch
    assert details["accuracy"].tolist() == [0.25, 0.5, 0.25] and details["strict_accuracy"].tolist() == [0, 0, 0]
    assert np.nanmean(details["counting_accuracy"]) == 1.0


def test_flowgrpo_reward_fn_with_servers_sums_and_logs(stub):
    geneval = stub(lambda path, headers, body: (200, pickle.dumps(geneval_server(pickle.loads(body)), protocol=2)))
    deqa = stub(lambda path, headers, body: (200, pickle.dumps({"scores": np.asarray([4.0, 2.5, 5.0])})))
    reward = build_reward({"name": "flowgrpo", "options": {
        "reward_fn": {"geneval": 1.0, "deqa": 0.5},
        "reward_options": {"geneval": {"url": geneval.url, "allow_pickle": True},
                           "deqa": {"url": deqa.url, "allow_pickle": True}}}}, field=FIELD)
    total, details = reward.score_with_details(batch(), PROMPTS, METADATA)
    np.testing.assert_allclose(details["deqa"], [0.8, 0.5, 1.0])  # DeQA / 5
    np.testing.assert_allclose(details["geneval"], [0.25, 0.5, 0.75])
    np.testing.assert_allclose(total, details["geneval"] + 0.5 * details["deqa"])
    assert "counting_accuracy" in details and "strict_accuracy" in details


def test_a_score_of_minus_10_is_not_averaged_in(stub):
    server = stub(lambda path, headers, body: (200, pickle.dumps({"scores": [1.0, -10, 0.5]})))
    reward = GenEvalReward(server.url, allow_pickle=True)
    scores = reward(batch(), PROMPTS, METADATA)
    assert scores[0] == 1.0 and np.isnan(scores[1]) and scores[2] == 0.5


def test_the_pickle_protocol_needs_allow_pickle():
    for name in ("flowgrpo.geneval", "flowgrpo.deqa"):
        with pytest.raises(ConfigError) as caught:
            build_reward({"name": name, "options": {}}, field=FIELD)
        assert caught.value.field == f"{FIELD}.options"
        assert "allow_pickle: the" in caught.value.message and "set allow_pickle: true" in caught.value.message
        assert "\n" not in str(caught.value)


def test_non_loopback_hosts_are_refused_unless_allowed():
    remote = "http://192.0.2.7:18085"  # TEST-NET-1: never a loopback address
    with pytest.raises(ConfigError) as caught:
        build_reward({"name": "flowgrpo.geneval", "options": {"url": remote, "allow_pickle": True}}, field=FIELD)
    assert "url: http://192.0.2.7:18085 is not a loopback address" in caught.value.message
    assert "allow_remote: true" in caught.value.message
    assert DeQAReward(remote, allow_pickle=True, allow_remote=True).endpoint.url == remote
    assert GenEvalReward("http://localhost:18085", allow_pickle=True).endpoint.loopback


def test_a_malicious_answer_is_refused_and_runs_nothing(stub, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = pickle.dumps({"scores": [1.0, 1.0, 1.0], "extra": Exploit()})
    server = stub(lambda path, headers, body: (200, hostile))
    reward = GenEvalReward(server.url, allow_pickle=True)
    with pytest.raises(RewardServerError) as caught:
        reward(batch(), PROMPTS, METADATA)
    message = str(caught.value)
    assert server.url in message and "will not read" in message and "refusing to load" in message
    assert "\n" not in message
    time.sleep(0.2)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps(np.asarray(["text"])),                       # string array
    pickle.dumps(np.asarray([1, "x"], dtype=object)),         # object array
    pickle.dumps(torch.zeros(2)),                             # any other class
    pickle.dumps(np.dtype([("a", "f4")])),                    # structured dtype
    b"\x80\x04K",                                             # truncated
])
def test_the_restricted_unpickler_accepts_plain_data_only(payload):
    with pytest.raises(UnsafePickleError):
        loads(payload)


def test_numpy_numbers_and_arrays_become_plain_python():
    answer = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float64(0.5), "c": np.asarray([True, False]),
              "d": np.asarray([[1, 2], [3, 4]], dtype=">i8", order="F"), "e": (1, "x", b"y", None), "f": {1, 2}}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        plain = loads(pickle.dumps(answer, protocol=protocol))
        assert plain == {"a": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], "b": 0.5, "c": [True, False], "d": [[1, 2], [3, 4]],
                         "e": (1, "x", b"y", None), "f": {1, 2}}
        assert type(plain["b"]) is float


def test_bad_answers_are_one_line_errors_naming_the_url(stub):
    answers = iter([(200, pickle.dumps({"rewards": []})), (200, pickle.dumps({"scores": [1.0]})),
                    (500, b"boom"), (404, b"no such route")])
    server = stub(lambda path, headers, body: next(answers))
    reward = GenEvalReward(server.url, allow_pickle=True, retries=0)
    for expected in ("without 'scores'", "expected a list of 3 numbers, got 1", "failed: HTTP 500: boom",
                     "failed: HTTP 404: no such route"):
        with pytest.raises(RewardServerError) as caught:
            reward(batch(), PROMPTS, METADATA)
        assert server.url in str(caught.value) and expected in str(caught.value), str(caught.value)
        assert "\n" not in str(caught.value)


def test_a_server_that_is_down_is_a_one_line_error_naming_the_url():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    for reward in (GenEvalReward(url, allow_pickle=True, retries=1, timeout=5),
                   UnifiedReward(url, retries=0, timeout=5)):
        start = time.monotonic()
        with pytest.raises(RewardServerUnavailable) as caught:
            reward(batch(1), PROMPTS[:1], METADATA[:1])
        assert isinstance(caught.value, UserError)
        assert str(caught.value).startswith(f"no reward server at {url}: connection refused")
        assert "\n" not in str(caught.value) and time.monotonic() - start < 5


def test_a_server_that_does_not_answer_in_time_is_an_error(stub):
    def slow(path, headers, body):
        time.sleep(1.5)
        return 200, pickle.dumps({"scores": [1.0]})

    server = stub(slow)
    reward = GenEvalReward(server.url, allow_pickle=True, timeout=0.3)
    with pytest.raises(RewardServerError, match=rf"no answer from the reward server at {server.url} within 0.3 s"):
        reward(batch(1), PROMPTS[:1], METADATA[:1])


# -- UnifiedReward: an OpenAI-style chat API ----------------------------------------------------------------
def chat_server(answers: dict[str, str]) -> Respond:
    """Answers each chat completion by looking up the prompt named in its question."""

    def respond(path: str, headers: dict, body: bytes) -> tuple[int, bytes]:
        request = json.loads(body)
        text = request["messages"][0]["content"][1]["text"]
        prompt = next(p for p in answers if p in text)
        return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": answers[prompt]}}]}).encode()

    return respond


def test_unifiedreward_parses_final_score_over_5(stub):
    from PIL import Image

    answers = {PROMPTS[0]: "Good alignment.\nFinal Score: 4", PROMPTS[1]: "Final Score: 3.5 overall",
               PROMPTS[2]: "I cannot rate this."}
    server = stub(chat_server(answers))
    reward = build_reward({"name": "flowgrpo.unifiedreward", "options": {"url": server.url, "model": "ur-test",
                                                                         "api_key": "k"}}, field=FIELD)
    scores = reward(batch(size=20), PROMPTS, METADATA)
    np.testing.assert_allclose(scores, [0.8, 0.7, 0.0])  # / 5; 0 when no "Final Score:"
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Content-Type"] == "application/json"
    assert headers["Authorization"] == "Bearer k"
    request = json.loads(body)
    assert request["model"] == "ur-test"
    url = request["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (512, 512)


def test_unifiedreward_with_a_v1_base_url_and_bad_answers(stub):
    server = stub(lambda path, headers, body: (200, b'{"not": "a completion"}'))
    reward = UnifiedReward(f"{server.url}/v1", retries=0)
    with pytest.raises(RewardServerError, match="did not answer an OpenAI-style chat completion"):
        reward(batch(1), PROMPTS[:1])
    assert server.requests[0][0] == "/v1/chat/completions"
    with pytest.raises(ConfigError, match="question must contain"):
        build_reward({"name": "flowgrpo.unifiedreward", "options": {"question": "rate it"}}, field=FIELD)
