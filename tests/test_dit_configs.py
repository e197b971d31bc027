"""The bundled DiT transformer configs (``calibri.plugins.dit/configs``).

Each file is a model's published diffusers ``transformer/config.json``. The tests build every
transformer on the meta device (no weights, no memory, no download) and check the block layout and
the size of the checkpoint the config describes.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import calibri.plugins.dit  # noqa: E402

CONFIG_DIR = Path(calibri.plugins.dit.__file__).resolve().parent / "configs"

#: file name -> (diffusers class, nominal size of the released transformer in parameters)
MODELS = {
    "flux.1-dev.json": ("FluxTransformer2DModel", 11.9e9),
    "flux.1-schnell.json": ("FluxTransformer2DModel", 11.9e9),
    "sd3.5-medium.json": ("SD3Transformer2DModel", 2.5e9),
    "sd3.5-large.json": ("SD3Transformer2DModel", 8.1e9),
    "qwen-image.json": ("QwenImageTransformer2DModel", 20e9),
    "sana-1600m-1024px.json": ("SanaTransformer2DModel", 1.6e9),
    "chroma1-hd.json": ("ChromaTransformer2DModel", 8.9e9),
}

#: relative tolerance on the size
SIZE_RTOL = 0.03

#: keys published in a config that the current diffusers class no longer takes (ignored on load)
LEGACY_KEYS = {
    "QwenImageTransformer2DModel": {"pooled_projection_dim"},
}

_models: dict[str, object] = {}


def load_config(name: str) -> dict:
    return json.loads((CONFIG_DIR / name).read_text(encoding="utf-8"))


def build(name: str):
    """The transformer for a config file, on the meta device (cached: built once per file)."""
    if name not in _models:
        config = load_config(name)
        cls = getattr(diffusers, config["_class_name"])
        with torch.device("meta"):
            _models[name] = cls.from_config(config)
    return _models[name]


def checkpoint_size(model) -> int:
    """Number of values in the state dict: parameters plus persistent buffers.

    This is what the released checkpoint holds; for SD3.5 it includes the fixed sin-cos position
    table ``pos_embed.pos_embed`` (a buffer in diffusers, a tensor in the checkpoint).
    """
    return sum(t.numel() for t in model.state_dict().values())


def test_every_bundled_config_is_covered():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.json")) == sorted(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_config_file(name):
    config = load_config(name)
    class_name, _ = MODELS[name]
    assert config["_class_name"] == class_name
    assert isinstance(config["_diffusers_version"], str) and config["_diffusers_version"]

    accepted = set(inspect.signature(getattr(diffusers, class_name).__init__).parameters) - {"self"}
    unknown = {k for k in config if not k.startswith("_")} - accepted - LEGACY_KEYS.get(class_name, set())
    assert not unknown, f"{name}: keys {sorted(unknown)} are not arguments of {class_name}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_builds_on_meta_without_weights(name):
    model = build(name)
    class_name, _ = MODELS[name]
    assert type(model).__name__ == class_name
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "meta" for b in model.buffers())

    config = load_config(name)
    for key, value in config.items():
        if key.startswith("_") or key in LEGACY_KEYS.get(class_name, set()):
            continue
        got = model.config[key]
        if isinstance(value, list):
            got = list(got)
        assert got == value, f"{name}: {key} = {got!r}, file says {value!r}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpoint_size(name):
    _, nominal = MODELS[name]
    size = checkpoint_size(build(name))
    assert size == pytest.approx(nominal, rel=SIZE_RTOL), f"{name}: {size / 1e9:.3f} B"


@pytest.mark.parametrize("name", ["flux.1-dev.json", "flux.1-schnell.json"])
def test_flux_blocks(name):
    model = build(name)
    assert len(model.transformer_blocks) == 19
    assert len(model.single_transformer_blocks) == 38
    has_guidance = hasattr(model.time_text_embed, "guidance_embedder")
    assert has_guidance is (name == "flux.1-dev.json")


def test_flux_schnell_is_dev_without_guidance_embedder():
    dev, schnell = build("flux.1-dev.json"), build("flux.1-schnell.json")
    guidance = sum(p.numel() for p in dev.time_text_embed.guidance_embedder.parameters())
    assert checkpoint_size(dev) - checkpoint_size(schnell) == guidance


def test_sd35_medium_blocks():
    blocks = build("sd3.5-medium.json").transformer_blocks
    assert len(blocks) == 24
    dual = [i for i, block in enumerate(blocks) if getattr(block, "attn2", None) is not None]
    assert dual == list(range(13))
    assert blocks[-1].context_pre_only
    assert not any(block.context_pre_only for block in blocks[:-1])


def test_sd35_large_blocks():
    blocks = build("sd3.5-large.json").transformer_blocks
    assert len(blocks) == 38
    assert all(getattr(block, "attn2", None) is None for block in blocks)
    assert blocks[-1].context_pre_only
    assert not any(block.context_pre_only for block in blocks[:-1])


def test_qwen_image_blocks():
    model = build("qwen-image.json")
    assert len(model.transformer_blocks) == 60
    assert model.inner_dim == 24 * 128
