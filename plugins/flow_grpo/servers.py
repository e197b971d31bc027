"""Clients for Flow-GRPO's reward servers, made safe to point a calibration at.

* ``flowgrpo.geneval`` and ``flowgrpo.deqa``: the GenEval / DeQA protocol. One HTTP POST per
  batch whose body is a pickle of ``{"images": [JPEG bytes], "meta_datas": [...], "only_strict":
  bool}``; the answer is a pickle with ``scores``, ``rewards``, ``strict_rewards``,
  ``group_rewards`` and ``group_strict_rewards``. Pickle is how these servers talk, and
  unpickling runs code the bytes name, so the client refuses to start unless the config says
  ``allow_pickle: true``, talks only to loopback hosts unless ``allow_remote: true``, and reads
  answers with :mod:`.safe_pickle`, which accepts plain data only (NumPy numeric arrays become
  lists). The request pickle is produced here, from plain data.
* ``flowgrpo.unifiedreward``: an OpenAI-compatible chat server (e.g. sglang serving
  UnifiedReward). Each image, resized to 512×512, goes as a base64 PNG data URL with a question
  naming the prompt; the score is the number after ``Final Score:`` in the answer, divided by 5
  (0 when the answer has none). Plain JSON: no pickle.

Values: GenEval's per-image score is its partial credit in [0, 1] (``scores``); DeQA's is its
quality score / 5. The GenEval details (:meth:`PickleServerReward.score_with_details`) are named
as Flow-GRPO logs them — ``accuracy``, ``strict_accuracy``, ``<tag>_accuracy``,
``<tag>_strict_accuracy`` — and hold NaN where the server sent −10 (the image's tag is another
one): a mean over a detail must skip NaN (``numpy.nanmean``), which is exactly Flow-GRPO's "mean
over values ≠ −10". A −10 in the per-image ``scores`` themselves becomes NaN too, which calibri
counts as a failed evaluation rather than averaging a sentinel in.

Images are made 8-bit as Flow-GRPO does, ``round(255 · x)``. Every request has a timeout; errors
are one line naming the server's URL.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import math
import pickle
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from calibri.rewards.base import Reward, batch_text, to_canonical
from calibri.rewards.remote import (RewardServerError, RewardServerUnavailable, _describe, _error_text, _parse_url,
                                    _UnixHTTPConnection)
from calibri.rewards.server import is_loopback

from .safe_pickle import UnsafePickleError, loads

GENEVAL_URL = "http://127.0.0.1:18085"
DEQA_URL = "http://127.0.0.1:18086"
UNIFIEDREWARD_URL = "http://127.0.0.1:17140"
#: Sent back by a GenEval server for a tag an image does not have.
NOT_APPLICABLE = -10
#: Largest answer read from a server.
MAX_RESPONSE_BYTES = 64 * 2**20

DEFAULT_QUESTION = (
    "You are shown an image generated from the caption: \"{prompt}\". Rate how well the image matches "
    "the caption and how good it looks, from 1 (poor) to 5 (excellent). Explain briefly, then end your "
    "answer with a line of the form 'Final Score: <number>'.")
_FINAL_SCORE = re.compile(r"Final Score:\s*\**\s*([-+]?\d+(?:\.\d+)?)", re.IGNORECASE)


def to_uint8(images: Any) -> np.ndarray:
    """A canonical batch (N×3×H×W in [0, 1]) → N×H×W×3 uint8, rounded as Flow-GRPO rounds."""
    array = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def encode_image(pixels: np.ndarray, fmt: str, quality: int = 75, size: int | None = None) -> bytes:
    """One H×W×3 uint8 image as ``fmt`` (JPEG or PNG) bytes, resized to ``size``² if given."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels))
    if size is not None:
        image = image.resize((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def as_number(value: Any, what: str) -> float:
    """``value`` as a float (NumPy numbers arrive as Python ones); anything else is a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is {type(value).__name__} {value!r}, not a number")
    return float(value)


def per_image(values: Any, n: int, what: str) -> np.ndarray:
    """``n`` numbers, −10 → NaN (the server's "not applicable")."""
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(f"{what}: expected a list of {n} numbers, got {got}")
    out = np.asarray([as_number(v, what) for v in values], dtype=np.float64)
    out[out == NOT_APPLICABLE] = np.nan
    return out


def geneval_details(answer: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
    """Flow-GRPO's GenEval detail names from an answer's optional parts (−10 → NaN)."""
    details: dict[str, np.ndarray] = {}
    for key, name in (("rewards", "accuracy"), ("strict_rewards", "strict_accuracy")):
        if answer.get(key) is not None:
            details[name] = per_image(answer[key], n, key)
    for key, suffix in (("group_strict_rewards", "_strict_accuracy"), ("group_rewards", "_accuracy")):
        groups = answer.get(key)
        if groups is None:
            continue
        if not isinstance(groups, Mapping):
            raise ValueError(f"{key}: expected a mapping of tag → per-image values")
        for tag, values in groups.items():
            details[f"{tag}{suffix}"] = per_image(values, n, f"{key}[{tag!r}]")
    return details


def merge_details(parts: Sequence[tuple[int, Mapping[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """Per-batch details ``(batch size, {name: values})`` → one array per name (NaN where a batch
    lacked the name: its images had no such tag)."""
    names = list(dict.fromkeys(name for _, details in parts for name in details))
    return {name: np.concatenate([np.asarray(details[name], dtype=np.float64) if name in details
                                  else np.full(count, np.nan) for count, details in parts]) for name in names}


class _Endpoint:
    """One server URL: POSTs with a timeout, retries on refused connections and 5xx, one-line
    errors naming the URL (shared by both protocols)."""

    def __init__(self, url: str, timeout: float, retries: int, backoff: float = 0.5) -> None:
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a finite number of seconds above 0, got {timeout!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries!r}")
        self.scheme, self.host, self.port, self.base, self.url = _parse_url(url)
        self.timeout, self.retries, self.backoff = float(timeout), retries, backoff

    @property
    def loopback(self) -> bool:
        return self.scheme == "unix" or is_loopback(self.host)

    def _connection(self) -> http.client.HTTPConnection:
        if self.scheme == "unix":
            return _UnixHTTPConnection(self.host, timeout=self.timeout)
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def post(self, path: str, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> bytes:
        """The answer's body; :class:`RewardServerUnavailable` if nothing answers,
        :class:`RewardServerError` for a timeout, an HTTP error or an oversized answer."""
        target = (self.base + path) or "/"
        failure, status, attempts = "", None, 0
        while attempts <= self.retries:
            if attempts:
                time.sleep(min(self.backoff * 2 ** (attempts - 1), 10.0))
            attempts += 1
            connection = self._connection()
            try:
                connection.request("POST", target, body=body,
                                   headers={"Content-Type": content_type, **dict(headers or {})})
                response = connection.getresponse()
                data = response.read(MAX_RESPONSE_BYTES + 1)
            except TimeoutError:
                raise RewardServerError(f"no answer from the reward server at {self.url} within "
                                        f"{self.timeout:g} s (timeout)") from None
            except (OSError, http.client.HTTPException) as exc:
                failure, status = _describe(exc, self.host), None
                continue
            finally:
                connection.close()
            if len(data) > MAX_RESPONSE_BYTES:
                raise RewardServerError(f"reward server at {self.url} answered more than "
                                        f"{MAX_RESPONSE_BYTES // 2**20} MiB", response.status)
            if response.status < 400:
                return data
            failure, status = f"HTTP {response.status}: {_error_text(data)}", response.status
            if response.status < 500:
                break
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        if status is None:
            raise RewardServerUnavailable(f"no reward server at {self.url}: {failure}{tries}")
        raise RewardServerError(f"reward server at {self.url} failed: {failure}{tries}", status)


class PickleServerReward(Reward):
    """A reward from a GenEval/DeQA-protocol server (see the module docstring). ``allow_pickle``
    must be true: the protocol is pickle both ways. ``allow_remote`` lifts the loopback-only rule.
    ``scale`` divides the per-image ``scores`` (default 1 for GenEval, 5 for DeQA).
    ``only_strict`` is sent as is (GenEval then computes only the strict rewards, as in
    Flow-GRPO's training). ``jpeg_quality``: the quality images are sent at (75, PIL's default,
    which Flow-GRPO's clients use). Each ``batch_size`` images go in one
    request, with ``timeout`` seconds to answer; refused connections and 5xx answers are retried
    ``retries`` times."""

    higher_is_better = True
    uses_prompt = True
    needs = "cpu"
    label = "reward"
    default_url = GENEVAL_URL
    default_scale = 1.0

    def __init__(self, url: str | None = None, *, allow_pickle: bool = False, allow_remote: bool = False,
                 timeout: float = 120.0, retries: int = 2, only_strict: bool = True, jpeg_quality: int = 75,
                 scale: float | None = None, batch_size: int = 64, device: str = "cpu") -> None:
        super().__init__(batch_size=batch_size, device=device)
        self.endpoint = _Endpoint(url or self.default_url, timeout, retries)
        if allow_pickle is not True:
            raise ValueError(f"allow_pickle: the {self.label} server at {self.endpoint.url} speaks pickle, which "
                             "can run code in this process when read; set allow_pickle: true if you trust it "
                             "(answers are read with a restricted unpickler)")
        if not allow_remote and not self.endpoint.loopback:
            raise ValueError(f"url: {self.endpoint.url} is not a loopback address; a pickle server elsewhere "
                             "needs allow_remote: true (prefer an SSH tunnel to a loopback port)")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {jpeg_quality}")
        scale = self.default_scale if scale is None else scale
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number above 0, got {scale}")
        self.only_strict, self.jpeg_quality, self.scale = bool(only_strict), int(jpeg_quality), float(scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.endpoint.url!r})"

    def request(self, images: Any, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One batch's answer, read safely and checked to be a mapping with ``scores``."""
        pixels = to_uint8(images)
        meta_datas = []
        for prompt, meta in zip(prompts, metadata):
            row = dict(meta)
            row.setdefault("prompt", prompt)  # the server reads metadata["prompt"]
            meta_datas.append(row)
        body = pickle.dumps({"images": [encode_image(p, "JPEG", self.jpeg_quality) for p in pixels],
                             "meta_datas": meta_datas, "only_strict": self.only_strict})
        data = self.endpoint.post("", body, "application/octet-stream")
        try:
            answer = loads(data)
        except UnsafePickleError as exc:
            raise RewardServerError(f"reward server at {self.endpoint.url} sent an answer calibri will not "
                                    f"read: {exc}") from None
        if not isinstance(answer, Mapping) or "scores" not in answer:
            raise RewardServerError(f"reward server at {self.endpoint.url} answered a "
                                    f"{type(answer).__name__} without 'scores'")
        return dict(answer)

    def score_with_details(self, images: Any, prompts: Sequence[str] | None = None,
                           metadata: Sequence[Mapping[str, Any]] | None = None
                           ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Per-image scores (/ ``scale``) and the answer's details (see the module docstring)."""
        canonical = to_canonical(images)
        n = canonical.shape[0]
        prompts, metadata = batch_text(n, prompts, metadata)
        scores, parts = [], []
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            answer = self.request(canonical[start:stop], prompts[start:stop], metadata[start:stop])
            try:
                scores.append(per_image(answer["scores"], stop - start, "scores") / self.scale)
                parts.append((stop - start, self.details(answer, stop - start)))
            except ValueError as exc:
                raise RewardServerError(f"reward server at {self.endpoint.url} answered badly: {exc}") from None
        return np.concatenate(scores), merge_details(parts)

    def details(self, answer: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
        return {}

    def score(self, images, prompts, metadata):
        return self.score_with_details(images, prompts, metadata)[0]


class GenEvalReward(PickleServerReward):
    """GenEval's object-level check by a Flow-GRPO GenEval server: partial credit in [0, 1]."""

    label = "GenEval"
    default_url = GENEVAL_URL

    def details(self, answer: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
        return geneval_details(answer, n)


class DeQAReward(PickleServerReward):
    """DeQA-Score image quality by a Flow-GRPO DeQA server, divided by 5 (Flow-GRPO's scale)."""

    label = "DeQA"
    default_url = DEQA_URL
    default_scale = 5.0
    uses_prompt = False


class UnifiedReward(Reward):
    """UnifiedReward (or any vision chat model) on an OpenAI-compatible server: the number after
    ``Final Score:`` in its answer / ``scale`` (5), 0 when it gives none.

    ``url``: the server's root or its ``/v1`` base; requests go to ``/v1/chat/completions``.
    ``question``: the text sent with each image, ``{prompt}`` standing for the image's prompt
    (Flow-GRPO users may paste the question their setup used). ``image_size``: images are
    resized to this square before sending (512, as Flow-GRPO does). ``workers`` requests run at
    once; each has ``timeout`` seconds. ``api_key``: sent as a bearer token if given."""

    higher_is_better = True
    uses_prompt = True
    needs = "cpu"

    def __init__(self, url: str = UNIFIEDREWARD_URL, *, model: str = "UnifiedReward", question: str = DEFAULT_QUESTION,
                 image_size: int = 512, max_tokens: int = 512, temperature: float = 0.0, scale: float = 5.0,
                 timeout: float = 120.0, retries: int = 2, workers: int = 8, api_key: str | None = None,
                 batch_size: int = 64, device: str = "cpu") -> None:
        super().__init__(batch_size=batch_size, device=device)
        self.endpoint = _Endpoint(url, timeout, retries)
        if "{prompt}" not in question:
            raise ValueError("question must contain {prompt}, where the image's prompt goes")
        if image_size < 1 or max_tokens < 1 or workers < 1:
            raise ValueError("image_size, max_tokens and workers must be at least 1")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number above 0, got {scale}")
        self.model, self.question, self.image_size = model, question, int(image_size)
        self.max_tokens, self.temperature, self.scale = int(max_tokens), float(temperature), float(scale)
        self.workers, self.api_key = int(workers), api_key
        self._path = "/chat/completions" if self.endpoint.base.endswith("/v1") else "/v1/chat/completions"

    def __repr__(self) -> str:
        return f"UnifiedReward(url={self.endpoint.url!r}, model={self.model!r})"

    def ask(self, pixels: np.ndarray, prompt: str) -> str:
        """The model's answer about one H×W×3 uint8 image."""
        png = base64.b64encode(encode_image(pixels, "PNG", size=self.image_size)).decode("ascii")
        body = {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                    {"type": "text", "text": self.question.replace("{prompt}", prompt)}]}]}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        data = self.endpoint.post(self._path, json.dumps(body).encode("utf-8"), "application/json", headers)
        try:
            content = json.loads(data)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RewardServerError(f"reward server at {self.endpoint.url} did not answer an OpenAI-style chat "
                                    "completion") from None
        return content if isinstance(content, str) else ""

    def parse(self, answer: str) -> float:
        """``Final Score: X`` → X / scale; 0 when absent."""
        match = _FINAL_SCORE.search(answer)
        return float(match.group(1)) / self.scale if match else 0.0

    def score(self, images, prompts, metadata):
        pixels = to_uint8(images)
        with ThreadPoolExecutor(max_workers=min(self.workers, len(pixels))) as pool:
            answers = list(pool.map(self.ask, pixels, prompts))
        return np.asarray([self.parse(answer) for answer in answers], dtype=np.float64)


__all__ = ["DEFAULT_QUESTION", "DEQA_URL", "GENEVAL_URL", "NOT_APPLICABLE", "UNIFIEDREWARD_URL", "DeQAReward",
           "GenEvalReward", "PickleServerReward", "UnifiedReward", "encode_image", "geneval_details",
           "merge_details", "per_image", "to_uint8"]
