"""Shared plumbing of the model rewards: options, loading, errors, image conversion, heads, cache.

Nothing here imports torch, transformers or PIL at module import time: the plugin module is
loaded whenever the registry is built, on machines without those packages too. They are imported
when a reward is built (:func:`require`), and a missing one becomes a one-line
:class:`~calibri.core.errors.UserError` that names the pip extra to install.
"""
from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from ...core.errors import UserError
from ..base import Reward

#: The pip extra that installs what the model rewards import.
EXTRA = "rewards"

#: ``org/name`` or a legacy ``name`` (a Hugging Face hub id); a hub file is ``org/name/path/in/repo``.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_HUB_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*/[^\s]+$")

#: Import names whose pip distribution is called differently.
_DISTRIBUTIONS = {"PIL": "Pillow"}

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def one_line(text: Any, limit: int = 300) -> str:
    """``text`` on one line (first non-empty line, whitespace collapsed, at most ``limit`` chars)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = re.sub(r"\s+", " ", lines[0]) if lines else type(text).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def fail(reward: str, message: str) -> UserError:
    """The one-line error every model reward raises for a user-fixable problem."""
    return UserError(one_line(f"reward {reward!r}: {message}", limit=600))


def require(reward: str, *modules: str) -> None:
    """Import ``modules`` or raise a one-line :class:`UserError` naming the pip extra."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing = (getattr(exc, "name", None) or module).split(".")[0]
            missing = _DISTRIBUTIONS.get(missing, missing)
            raise fail(reward, f"needs the Python package {missing!r}, which is not installed "
                               f"(pip install 'calibri[{EXTRA}]')") from None


def resolve_device(device: str | None) -> str:
    """``"auto"``/``None`` → ``"cuda"`` when available, else ``"cpu"``; anything else unchanged."""
    if device in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_dtype(reward: str, dtype: str | None, device: str, accelerator_default: str = "float32") -> Any:
    """A torch dtype from its name; ``"auto"`` is ``accelerator_default`` off the CPU, float32 on it."""
    import torch

    name = str(dtype or "auto").lower().replace("torch.", "")
    if name == "auto":
        name = "float32" if device == "cpu" else accelerator_default
    if name not in _DTYPES:
        raise fail(reward, f"unknown dtype {dtype!r} (use auto, float32, float16 or bfloat16)")
    return getattr(torch, _DTYPES[name])


# -- where weights come from ---------------------------------------------------------------------
def is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "~"))


def model_source(reward: str, what: str, path: str | os.PathLike) -> tuple[str, bool]:
    """``(source, is_local)`` for a model directory: an existing local path or a hub id.

    A path that exists nowhere and is not shaped like ``org/name`` is a one-line error."""
    text = os.path.expanduser(os.fspath(path))
    if os.path.exists(text):
        return os.path.abspath(text), True
    if is_hub_id(text):
        return text, False
    raise fail(reward, f"{what} path {os.fspath(path)!r} does not exist")


def hub_hint(allow_download: bool) -> str:
    if allow_download:
        return "could not be downloaded"
    return ("is not a local path and is not in the Hugging Face cache (downloads are off: "
            "give a local path, or set allow_download: true)")


def load_pretrained(reward: str, what: str, loader: Callable[..., Any], source: str, is_local: bool,
                    allow_download: bool, **kwargs: Any) -> Any:
    """``loader(source, local_files_only=..., **kwargs)`` with failures as one-line errors."""
    try:
        return loader(source, local_files_only=not allow_download, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for bad folders
        if is_local:
            raise fail(reward, f"cannot load the {what} from {source!r}: {type(exc).__name__}: {one_line(exc)}") \
                from None
        raise fail(reward, f"{what} {source!r} {hub_hint(allow_download)} ({type(exc).__name__}: "
                           f"{one_line(exc, 160)})") from None


def resolve_file(reward: str, what: str, spec: str | os.PathLike | None, allow_download: bool,
                 default_names: Sequence[str] = (), search_dirs: Iterable[str] = ()) -> str | None:
    """A weight file from a local path, a directory holding one of ``default_names``, or a hub
    file ``org/repo/file`` (from the cache unless ``allow_download``). ``spec=None`` searches
    ``search_dirs`` for ``default_names`` and returns ``None`` when none is there."""
    if spec is None:
        for directory in search_dirs:
            for name in default_names:
                candidate = os.path.join(directory, name)
                if os.path.isfile(candidate):
                    return candidate
        return None
    text = os.path.expanduser(os.fspath(spec))
    if os.path.isfile(text):
        return os.path.abspath(text)
    if os.path.isdir(text):
        found = resolve_file(reward, what, None, allow_download, default_names, [text])
        if found is None:
            names = ", ".join(default_names) or "a weight file"
            raise fail(reward, f"{what} directory {os.fspath(spec)!r} holds none of: {names}")
        return found
    if _HUB_FILE.match(text) and not text.startswith((".", "~", "/")):
        org, repo, filename = text.split("/", 2)
        try:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(repo_id=f"{org}/{repo}", filename=filename, local_files_only=not allow_download)
        except Exception as exc:
            raise fail(reward, f"{what} {os.fspath(spec)!r} {hub_hint(allow_download)} ({type(exc).__name__})") \
                from None
    raise fail(reward, f"{what} path {os.fspath(spec)!r} does not exist")


def load_weights(reward: str, what: str, file: str) -> dict[str, Any]:
    """A state dict from ``.safetensors`` or a torch pickle (tensors only: ``weights_only``)."""
    import torch

    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(file, device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as exc:
        raise fail(reward, f"cannot read the {what} {file!r}: {type(exc).__name__}: {one_line(exc)}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise fail(reward, f"the {what} {file!r} is not a state dict of tensors")
    return dict(state)


# -- a process-wide cache, so that a model loads once however many rewards use it ----------------
_CACHE: dict[tuple, Any] = {}


def cached(key: tuple, build: Callable[[], Any]) -> Any:
    """``build()`` once per ``key`` in this process."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def clear_model_cache() -> None:
    """Forget every loaded model (frees their memory once no reward holds them)."""
    _CACHE.clear()


# -- images --------------------------------------------------------------------------------------
def to_uint8(images: Any) -> list[np.ndarray]:
    """A canonical batch → H×W×3 uint8 arrays, rounded as ``(x * 255).round()`` (Flow-GRPO's)."""
    import torch

    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(image) for image in array]


def to_pil(images: Any) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(image) for image in to_uint8(images)]


def size_value(size: Any, *keys: str) -> int | None:
    """A field of an image processor's size dict (a dict, a SizeDict or an int)."""
    if isinstance(size, int):
        return size
    for key in keys:
        value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
        if value is not None:
            return int(value)
    return None


def clip_style_tensor(images: Any, shortest_edge: int, crop: tuple[int, int], mean: Sequence[float],
                      std: Sequence[float], device: str, dtype: Any) -> Any:
    """CLIP-style preprocessing on the tensor itself, on ``device`` and without rounding to 8 bits:
    bicubic (antialiased) resize of the shorter side to ``shortest_edge``, centre crop, normalise."""
    import torch
    import torch.nn.functional as F

    x = images.to(device=device, dtype=torch.float32)
    height, width = x.shape[-2:]
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    size = (new_short, new_long) if height <= width else (new_long, new_short)
    if size != (height, width):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    crop_h, crop_w = crop
    top, left = max((x.shape[-2] - crop_h) // 2, 0), max((x.shape[-1] - crop_w) // 2, 0)
    x = x[..., top: top + crop_h, left: left + crop_w]
    mean_t = torch.tensor(list(mean), device=device, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), device=device, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean_t) / std_t).to(dtype)


# -- heads: stacks of Linear layers read from a state dict ----------------------------------------
def linear_stack_prefix(state: Mapping[str, Any], candidates: Sequence[str]) -> str | None:
    """The first of ``candidates`` under which ``state`` holds ``<prefix><i>.weight`` keys."""
    for prefix in candidates:
        if any(re.match(re.escape(prefix) + r"\d+\.weight$", key) for key in state) or f"{prefix}weight" in state:
            return prefix
    return None


def build_linear_stack(reward: str, what: str, state: Mapping[str, Any], prefix: str, activation: str | None) -> Any:
    """An ``nn.Module`` applying the Linear layers ``<prefix><i>`` in index order.

    ``activation`` (``"relu"`` or ``None``) goes between consecutive layers, never after the last;
    dropout layers of the original (which hold no weights) are identities at inference. A single
    ``<prefix>weight`` (no index) is one Linear layer."""
    import torch
    from torch import nn

    if f"{prefix}weight" in state:
        indices: list[str] = [""]
    else:
        found = {int(m.group(1)) for key in state if (m := re.match(re.escape(prefix) + r"(\d+)\.weight$", key))}
        indices = [f"{i}." for i in sorted(found)]
    if not indices:
        raise fail(reward, f"the {what} holds no Linear layers under {prefix!r}")
    layers = []
    previous_out = None
    for index in indices:
        weight = state[f"{prefix}{index}weight"]
        bias = state.get(f"{prefix}{index}bias")
        if weight.dim() != 2 or (previous_out is not None and weight.shape[1] != previous_out):
            raise fail(reward, f"the {what} has inconsistent layer shapes at {prefix}{index}weight "
                               f"({tuple(weight.shape)})")
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight.float())
            if bias is not None:
                layer.bias.copy_(bias.float())
        layers.append(layer)
        previous_out = weight.shape[0]

    class LinearStack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(layers)
            self.in_features = layers[0].in_features
            self.out_features = layers[-1].out_features

        def forward(self, x: Any) -> Any:
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if activation == "relu" and i < len(self.layers) - 1:
                    x = torch.relu(x)
            return x

    return LinearStack().eval().requires_grad_(False)


def features(output: Any) -> Any:
    """Embeddings from ``get_image_features``/``get_text_features`` (a tensor, or an output whose
    ``pooler_output`` is the projected embedding, depending on the transformers version)."""
    if hasattr(output, "pooler_output") and not hasattr(output, "dim"):
        return output.pooler_output
    return output


class ModelReward(Reward):
    """A reward backed by a learned model: common options and bookkeeping.

    Subclasses set :attr:`reward_name` and load their model(s) in ``__init__`` through
    :func:`cached`, so that the same weights on the same device load once per process.
    """

    reward_name: ClassVar[str] = "model"

    def __init__(self, *, batch_size: int, device: str | None, allow_download: bool) -> None:
        require(self.reward_name, "torch")
        super().__init__(batch_size=batch_size, device=resolve_device(device))
        self.allow_download = bool(allow_download)

    def _check_prompts(self, prompts: Sequence[str]) -> list[str]:
        return ["" if prompt is None else str(prompt) for prompt in prompts]
