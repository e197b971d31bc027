"""The model rewards, run end to end on tiny random models of the real classes, loaded from disk.

Every checkpoint here is built in memory (transformers classes with tiny configs, tokenizers with
in-memory vocabularies, random weights from a fixed seed), written with ``save_pretrained`` or
``torch.save`` into a temporary folder, and loaded back *by path* through the reward — the same
loading code a real checkpoint goes through. Nothing is downloaded. The scores of random models
mean nothing; what is tested is the plumbing: shapes, dtypes, determinism, independence from the
batch size, prompt handling, the scale options, the checkpoint layouts and the error messages.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from calibri.core.errors import UserError  # noqa: E402
from calibri.rewards import models as rm  # noqa: E402
from calibri.rewards.models import _common  # noqa: E402

PROMPTS = ["a red cat on a sofa", "two dogs playing in the snow", "a castle at night", "an apple",
           "a blue car", "portrait of an old man", "a bowl of soup", "mountains at dawn"]


# -- tiny tokenizers -------------------------------------------------------------------------------
def _byte_symbols() -> list[str]:
    """The printable stand-ins byte-level BPE uses for the 256 bytes (GPT-2's table), in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def clip_tokenizer():
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 77
    return tokenizer


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def qwen_tokenizer():
    """Byte-level, with merges that make each rating word (with its leading space) one token, as in
    real vocabularies, so that the five Q-Align levels have distinct first tokens."""
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    merges: list[tuple[str, str]] = []
    for word in (" excellent", " good", " fair", " poor", " bad"):
        encoded = "".join(symbols[b] for b in word.encode())
        for i in range(1, len(encoded)):
            if (encoded[:i], encoded[i]) not in merges:
                merges.append((encoded[:i], encoded[i]))
            vocab.setdefault(encoded[: i + 1], len(vocab))
    for token in QWEN_SPECIALS:
        vocab[token] = len(vocab)
    return transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=QWEN_SPECIALS[1:])


def bert_tokenizer():
    pieces = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *("##" + p for p in pieces)]
    return transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})


# -- tiny checkpoints on disk ----------------------------------------------------------------------
def _seeded(seed: int, build):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def save_clip(folder, seed=0, projection_dim=16):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = clip_tokenizer()
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim)
    model = _seeded(seed, lambda: transformers.CLIPModel(config))
    model.save_pretrained(folder)
    processor = transformers.CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok)
    processor.save_pretrained(folder)
    return str(folder)


def aesthetic_head_state(width, seed=1):
    """The LAION predictor's layout (Linear at 0, 2, 4, 6, 7; dropouts between), tiny widths."""
    sizes = [(width, 24), (24, 12), (12, 8), (8, 4), (4, 1)]
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), sizes):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=gen) / fan_in ** 0.5
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=gen) * 0.1
    return state


def blip_config(tok):
    return transformers.BlipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                           image_size=32, patch_size=8, layer_norm_eps=1e-6),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=1, max_position_embeddings=40, is_decoder=True, pad_token_id=0),
        image_text_hidden_size=16)


def imagereward_tokenizer():
    tok = bert_tokenizer()
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def to_original_layout(hf_state, head_state):
    """A converted BLIP state dict written back under the original ImageReward names (the
    salesforce BLIP ViT/BERT module names, prefixed ``blip.``), plus the head as ``mlp.layers.*``."""
    renames = [
        (r"^vision_model\.embeddings\.class_embedding$", "blip.visual_encoder.cls_token"),
        (r"^vision_model\.embeddings\.position_embedding$", "blip.visual_encoder.pos_embed"),
        (r"^vision_model\.embeddings\.patch_embedding\.", "blip.visual_encoder.patch_embed.proj."),
        (r"^vision_model\.post_layernorm\.", "blip.visual_encoder.norm."),
        (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"blip.visual_encoder.blocks.\1.norm\2."),
        (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blip.visual_encoder.blocks.\1.attn.qkv."),
        (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.",
         r"blip.visual_encoder.blocks.\1.attn.proj."),
        (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"blip.visual_encoder.blocks.\1.mlp."),
        (r"^text_encoder\.", "blip.text_encoder."),
        (r"^vision_proj\.", "blip.vision_proj."),
        (r"^text_proj\.", "blip.text_proj."),
    ]
    out = {}
    for key, value in hf_state.items():
        for pattern, target in renames:
            if re.match(pattern, key):
                out[re.sub(pattern, target, key)] = value.clone()
                break
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).view(1, -1)  # a buffer the original saves
    for key, value in head_state.items():
        out[f"mlp.{key}"] = value.clone()
    return out


def save_imagereward(root, seed=2):
    """Both layouts of the same tiny ImageReward: ``converted/`` and ``original/`` (+ its tokenizer)."""
    from safetensors.torch import save_file

    tok = imagereward_tokenizer()
    model = _seeded(seed, lambda: transformers.BlipForImageTextRetrieval(blip_config(tok))).eval()
    head = aesthetic_head_state(64, seed=seed + 1)
    converted = root / "converted"
    model.save_pretrained(converted)
    tok.save_pretrained(converted)
    save_file({**head, "mean": torch.tensor(rm.imagereward.REWARD_MEAN, dtype=torch.float64),
               "std": torch.tensor(rm.imagereward.REWARD_STD, dtype=torch.float64)},
              str(converted / rm.imagereward.HEAD_FILE))
    original = root / "original"
    original.mkdir()
    torch.save(to_original_layout(model.state_dict(), head), original / "ImageReward.pt")
    (original / "med_config.json").write_text(json.dumps({"num_attention_heads": 1, "hidden_size": 64,
                                                          "layer_norm_eps": 1e-12, "vocab_size": len(tok)}))
    bert = root / "bert"
    bert_tokenizer().save_pretrained(bert)
    return str(converted), str(original), str(bert)


def tiny_qwen2vl_config(tok, vocab_size):
    ids = tok.convert_tokens_to_ids
    return transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]},
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, mlp_ratio=2, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"))


def qwen_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=32 * 32, patch_size=4, merge_size=2,
                                    temporal_patch_size=2)


def save_hpsv3(root, seed=3):
    """A Qwen2-VL base folder (config, tokenizer, image processor) and an HPSv3-style checkpoint:
    vocabulary + 1 (the ``<|Reward|>`` token), keys in the pre-4.52 layout, a ranknet ``rm_head``."""
    from safetensors.torch import save_file

    tok = qwen_tokenizer()
    base = root / "qwen2vl-base"
    config = tiny_qwen2vl_config(tok, len(tok) + 1)
    config.save_pretrained(base)
    tok.save_pretrained(base)
    qwen_image_processor().save_pretrained(base)
    model = _seeded(seed, lambda: transformers.Qwen2VLForConditionalGeneration(config))
    state = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"^model\.language_model\.", "model.", key)
        key = re.sub(r"^model\.visual\.", "visual.", key)
        state[key] = value.detach().clone().contiguous()
    gen = torch.Generator().manual_seed(seed)
    for index, (fan_in, fan_out) in zip((0, 3, 5), [(32, 16), (16, 8), (8, 2)]):
        state[f"rm_head.{index}.weight"] = torch.randn(fan_out, fan_in, generator=gen) / fan_in ** 0.5
        state[f"rm_head.{index}.bias"] = torch.randn(fan_out, generator=gen) * 0.1
    save_file(state, str(base / "HPSv3.safetensors"))
    return str(base)


def save_qwen_vlm(root, seed=4):
    """A plain tiny Qwen2-VL checkpoint (weights + tokenizer + image processor), for Q-Align."""
    tok = qwen_tokenizer()
    folder = root / "qwen2vl"
    config = tiny_qwen2vl_config(tok, len(tok))
    _seeded(seed, lambda: transformers.Qwen2VLForConditionalGeneration(config)).save_pretrained(folder)
    tok.save_pretrained(folder)
    qwen_image_processor().save_pretrained(folder)
    return str(folder)


LLAVA_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                  "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                  "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_llava(root, seed=5):
    """A tiny LLaVA (CLIP vision tower + Qwen2 language model) with its processor and chat template."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = qwen_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    processor = transformers.LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE)
    config = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    folder = root / "llava"
    _seeded(seed, lambda: transformers.LlavaForConditionalGeneration(config)).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


REMOTE_CONFIG = '''
from transformers import PretrainedConfig

class FakeOwlConfig(PretrainedConfig):
    model_type = "mplug_owl2"
'''

REMOTE_MODEL = '''
import numpy as np
import torch
from transformers import PreTrainedModel
from .configuration_fakeowl import FakeOwlConfig

class FakeOwl(PreTrainedModel):
    """Stands in for the mPLUG-Owl2 remote code: a score() on a 1-5 scale."""
    config_class = FakeOwlConfig

    def __init__(self, config):
        super().__init__(config)
        self.bias = torch.nn.Parameter(torch.zeros(1))
        self.post_init()

    def score(self, images, task_="quality", input_="image"):
        means = torch.tensor([float(np.asarray(image.convert("L"), dtype=np.float64).mean()) / 255
                              for image in images])
        return 1 + 4 * means + self.bias + (0.5 if task_ == "aesthetics" else 0.0)
'''


def save_remote_owl(root):
    """A checkpoint that, like q-future/one-align, only loads with trust_remote_code."""
    folder = root / "fake-one-align"
    folder.mkdir()
    (folder / "configuration_fakeowl.py").write_text(textwrap.dedent(REMOTE_CONFIG))
    (folder / "modeling_fakeowl.py").write_text(textwrap.dedent(REMOTE_MODEL))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "mplug_owl2", "architectures": ["FakeOwl"],
        "auto_map": {"AutoConfig": "configuration_fakeowl.FakeOwlConfig",
                     "AutoModelForCausalLM": "modeling_fakeowl.FakeOwl"}}))
    from safetensors.torch import save_file

    save_file({"bias": torch.zeros(1)}, str(folder / "model.safetensors"))
    return str(folder)


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Every tiny checkpoint, written once for the module."""
    root = tmp_path_factory.mktemp("reward-models")
    clip_dir = save_clip(root / "clip")
    torch.save(aesthetic_head_state(16), root / "clip" / "sac+logos+ava1-l14-linearMSE.pth")
    converted, original, bert = save_imagereward(root)
    return {
        "clip": clip_dir,
        "imagereward": converted,
        "imagereward_original": original,
        "bert": bert,
        "hpsv3": save_hpsv3(root),
        "qwen2vl": save_qwen_vlm(root),
        "llava": save_llava(root),
        "remote": save_remote_owl(root),
    }


@pytest.fixture(autouse=True)
def _fresh_cache():
    _common.clear_model_cache()
    yield
    _common.clear_model_cache()


def make(name, ckpt, **options):
    """Build reward ``name`` from its tiny checkpoint, on the CPU."""
    paths = {"pickscore": ckpt["clip"], "clipscore": ckpt["clip"], "aesthetic": ckpt["clip"],
             "imagereward": ckpt["imagereward"], "hpsv3": ckpt["hpsv3"], "qalign": ckpt["llava"]}
    options.setdefault("path", paths[name])
    options.setdefault("device", "cpu")
    return rm.MODEL_REWARDS[name](**options)


def images(n=8, height=40, width=48, seed=0):
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


ALL = list(rm.MODEL_REWARDS)
#: Options for the contract tests: CLIPScore's raw cosine, since the default clips the (often
#: negative) cosines of a random model to 0, which would hide differences between images.
CONTRACT_OPTIONS = {"clipscore": {"scale": "cosine"}}
PROMPTED = [name for name in ALL if rm.MODEL_REWARDS[name].uses_prompt]


# -- plugin registration ---------------------------------------------------------------------------
def test_registry_has_every_model_reward():
    from calibri.core.plugins import Registry, build_manager

    registry = Registry(build_manager(load_entry_points=False))
    for name, cls in rm.MODEL_REWARDS.items():
        registration = registry.get("rewards", name)
        assert registration.factory is cls and registration.plugin == "calibri.rewards.models"
        assert registration.description


def test_plugin_module_imports_without_torch_or_transformers():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import calibri.rewards.models as m\n"
            "from calibri.core.errors import UserError\n"
            "try:\n    m.PickScore('x')\nexcept UserError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("reward 'pickscore': needs the Python package 'torch', which is not installed "
                                  "(pip install 'calibri[rewards]')")


# -- the contract, for every reward ----------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_scores_shape_dtype_determinism_and_batch_invariance(name, ckpt):
    batch, prompts = images(8), PROMPTS
    one = make(name, ckpt, batch_size=1, **CONTRACT_OPTIONS.get(name, {}))
    eight = make(name, ckpt, batch_size=8, **CONTRACT_OPTIONS.get(name, {}))
    first = one(batch, prompts)
    assert first.shape == (8,) and first.dtype == np.float64 and np.isfinite(first).all()
    np.testing.assert_array_equal(first, one(batch, prompts))  # deterministic
    np.testing.assert_allclose(eight(batch, prompts), first, rtol=0, atol=1e-5)  # batch size does not matter
    assert np.ptp(first) > 0  # different images, different scores


@pytest.mark.parametrize("name", PROMPTED)
def test_prompted_rewards_depend_on_the_prompt(name, ckpt):
    reward = make(name, ckpt, **CONTRACT_OPTIONS.get(name, {}))
    batch = images(1).repeat(3, 1, 1, 1)
    scores = reward(batch, ["a red cat", "a green bicycle under rain", "zzz"])
    assert len(set(np.round(scores, 7))) == 3


@pytest.mark.parametrize("name", sorted(set(ALL) - set(PROMPTED)))
def test_image_only_rewards_ignore_the_prompt(name, ckpt):
    reward = make(name, ckpt)
    batch = images(2)
    np.testing.assert_array_equal(reward(batch, ["a cat", "a dog"]), reward(batch, ["", "something else"]))


@pytest.mark.parametrize("name", ALL)
def test_missing_path_is_a_one_line_user_error(name, ckpt, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError) as info:
        make(name, ckpt, path=str(missing))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"reward {name!r}:") and str(missing) in message


@pytest.mark.parametrize("name", ALL)
def test_hub_id_not_in_the_cache_is_a_one_line_user_error(name, ckpt, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        make(name, ckpt, path="nobody-here/no-such-model")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"reward {name!r}:") and "nobody-here/no-such-model" in message


@pytest.mark.parametrize("name", ALL)
def test_missing_package_names_the_extra(name, ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match=r"needs the Python package 'transformers'.*calibri\[rewards\]"):
        make(name, ckpt)


@pytest.mark.parametrize("name", ALL)
def test_reduced_precision_runs_and_stays_close(name, ckpt):
    options = CONTRACT_OPTIONS.get(name, {})
    batch, prompts = images(2), PROMPTS[:2]
    full = make(name, ckpt, **options)(batch, prompts)
    half = make(name, ckpt, dtype="bfloat16", **options)(batch, prompts)
    assert half.dtype == np.float64
    np.testing.assert_allclose(half, full, rtol=0.05, atol=0.05)


def test_built_from_a_config_spec_with_checked_options(ckpt):
    from calibri.core.errors import ConfigError
    from calibri.rewards.combine import build_reward

    spec = {"name": "pickscore", "options": {"path": ckpt["clip"], "scale": "flowgrpo", "batch_size": 2}}
    reward = build_reward(spec, device="cpu")
    assert isinstance(reward, rm.PickScore) and (reward.scale, reward.batch_size, reward.device) == \
        ("flowgrpo", 2, "cpu")
    with pytest.raises(ConfigError, match=r"reward\.options\.scale"):
        build_reward({"name": "pickscore", "options": {"path": ckpt["clip"], "scale": "26"}}, device="cpu")
    with pytest.raises(ConfigError, match=r"reward\.options\.colour: unknown option"):
        build_reward({"name": "clipscore", "options": {"colour": 1}}, device="cpu")


def test_models_load_once_per_process(ckpt):
    a, b = make("pickscore", ckpt), make("clipscore", ckpt)
    assert a.model is b.model and a.processor is b.processor


# -- PickScore and CLIPScore scales ----------------------------------------------------------------
def test_pickscore_is_logit_scale_times_cosine_and_flowgrpo_divides_by_26(ckpt):
    raw = make("pickscore", ckpt)
    flow = make("pickscore", ckpt, scale="flowgrpo")
    batch, prompts = images(4), PROMPTS[:4]
    raw_scores = raw(batch, prompts)
    np.testing.assert_allclose(flow(batch, prompts), raw_scores / 26.0, rtol=1e-6)
    model = transformers.CLIPModel.from_pretrained(ckpt["clip"]).eval()  # the recipe, written out once more
    processor = transformers.AutoProcessor.from_pretrained(ckpt["clip"])
    pil = [(np.asarray(x) * 255).round().astype(np.uint8) for x in batch.permute(0, 2, 3, 1).numpy()]
    with torch.no_grad():
        v = _common.features(model.get_image_features(**processor(images=pil, return_tensors="pt")))
        t = _common.features(model.get_text_features(**processor(text=prompts, padding=True, return_tensors="pt")))
        expected = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(v, t)
    np.testing.assert_allclose(raw_scores, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_clipscore_scales(ckpt):
    batch, prompts = images(4), PROMPTS[:4]
    cos = make("clipscore", ckpt, scale="cosine")(batch, prompts)
    assert np.all(np.abs(cos) <= 1)
    np.testing.assert_allclose(make("clipscore", ckpt)(batch, prompts), 2.5 * np.maximum(cos, 0), atol=1e-6)
    np.testing.assert_allclose(make("clipscore", ckpt, scale="torchmetrics")(batch, prompts),
                               100 * np.maximum(cos, 0), atol=1e-4)
    logit_scale = float(transformers.CLIPModel.from_pretrained(ckpt["clip"]).logit_scale.detach().exp())
    np.testing.assert_allclose(make("clipscore", ckpt, scale="flowgrpo")(batch, prompts), logit_scale * cos / 30,
                               atol=1e-5)


def test_unknown_scale_is_a_user_error(ckpt):
    with pytest.raises(UserError, match="unknown scale 'x'"):
        make("pickscore", ckpt, scale="x")


def test_tensor_preprocessing_matches_the_processor_closely(ckpt):
    pil, tensor = make("clipscore", ckpt), make("clipscore", ckpt, preprocess="tensor")
    batch = images(4, height=64, width=80)
    a, b = pil.pixel_values(batch), tensor.pixel_values(batch)
    assert a.shape == b.shape == (4, 3, 32, 32)
    assert float((a - b).abs().mean()) < 0.05  # PIL's bicubic on 8-bit vs torch's antialiased bicubic


# -- aesthetic -------------------------------------------------------------------------------------
def test_aesthetic_is_the_linear_head_on_the_normalised_embedding(ckpt):
    reward = make("aesthetic", ckpt)
    batch = images(3)
    state = aesthetic_head_state(16)
    embeds = reward.image_embeddings(batch)
    x = embeds
    for index in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    np.testing.assert_allclose(reward(batch), x.squeeze(-1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embeds.norm(dim=-1).numpy(), 1.0, rtol=1e-6)


def test_aesthetic_head_errors(ckpt, tmp_path):
    bare = save_clip(tmp_path / "bare")
    with pytest.raises(UserError, match="no aesthetic head"):
        make("aesthetic", ckpt, path=bare)
    wrong = tmp_path / "wrong.pth"
    torch.save(aesthetic_head_state(8), wrong)
    with pytest.raises(UserError, match="takes 8-d embeddings"):
        make("aesthetic", ckpt, head=str(wrong))
    with pytest.raises(UserError, match="does not exist"):
        make("aesthetic", ckpt, head=str(tmp_path / "absent.pth"))


# -- ImageReward: both checkpoint layouts give the same scores -------------------------------------
def test_imagereward_original_layout_and_conversion(ckpt, tmp_path):
    # BLIP's two added tokens ([DEC], [ENC]) leave the BERT tokenisation of prompts unchanged
    assert imagereward_tokenizer()(PROMPTS).input_ids == bert_tokenizer()(PROMPTS).input_ids
    batch, prompts = images(4), PROMPTS[:4]
    converted = make("imagereward", ckpt)(batch, prompts)
    original = make("imagereward", ckpt, path=ckpt["imagereward_original"], tokenizer=ckpt["bert"])
    np.testing.assert_allclose(original(batch, prompts), converted, rtol=0, atol=1e-5)
    file_only = make("imagereward", ckpt, path=os.path.join(ckpt["imagereward_original"], "ImageReward.pt"),
                     tokenizer=ckpt["bert"])
    np.testing.assert_allclose(file_only(batch, prompts), converted, rtol=0, atol=1e-5)
    out = rm.convert_imagereward(ckpt["imagereward_original"], str(tmp_path / "out"), tokenizer=ckpt["bert"])
    np.testing.assert_allclose(make("imagereward", ckpt, path=out)(batch, prompts), converted, rtol=0, atol=1e-5)


def test_imagereward_standardises_the_head_output(ckpt):
    reward = make("imagereward", ckpt)
    assert (reward.mean, reward.std) == (rm.imagereward.REWARD_MEAN, rm.imagereward.REWARD_STD)
    batch, prompts = images(2), PROMPTS[:2]
    with torch.no_grad():
        embeds = reward.model.vision_model(pixel_values=reward.pixel_values(batch)).last_hidden_state
        tokens = reward.tokenizer(prompts, padding="max_length", max_length=35, truncation=True, return_tensors="pt")
        text = reward.model.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                         encoder_hidden_states=embeds,
                                         encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
        raw = reward.head(text.last_hidden_state[:, 0]).squeeze(-1)
    np.testing.assert_allclose(reward(batch, prompts), ((raw - reward.mean) / reward.std).numpy(), atol=1e-6)


def test_imagereward_rejects_a_foreign_checkpoint(ckpt, tmp_path):
    bad = tmp_path / "ImageReward.pt"
    torch.save({"something.weight": torch.zeros(2)}, bad)
    with pytest.raises(UserError, match="not an ImageReward checkpoint"):
        make("imagereward", ckpt, path=str(bad), tokenizer=ckpt["bert"])


# -- HPSv3 -----------------------------------------------------------------------------------------
def test_hpsv3_scores_mu_at_the_reward_token(ckpt):
    reward = make("hpsv3", ckpt)
    batch, prompts = images(3), PROMPTS[:3]
    mu_sigma = reward.mu_sigma(batch, prompts)
    assert tuple(mu_sigma.shape) == (3, 2)
    np.testing.assert_allclose(reward(batch, prompts), mu_sigma[:, 0].numpy(), atol=1e-6)
    tok = reward.inputs.tokenizer
    assert reward.reward_id == tok.convert_tokens_to_ids("<|Reward|>") == len(qwen_tokenizer())
    text = reward.inputs.render(rm.hpsv3.hpsv3_user_text("a cat"))
    assert text.startswith("<|im_start|>system\n") and "Textual prompt - a cat\n" in text
    assert text.endswith("ratings of this image: <|Reward|>\n\nEND\n<|im_end|>\n<|im_start|>assistant\n")


def test_hpsv3_checkpoint_errors(ckpt, tmp_path):
    from safetensors.torch import save_file

    no_head = tmp_path / "nohead.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(4, 32)}, str(no_head))
    with pytest.raises(UserError, match="no rm_head weights"):
        make("hpsv3", ckpt, checkpoint=str(no_head))
    with pytest.raises(UserError, match="checkpoint path .* does not exist"):
        make("hpsv3", ckpt, checkpoint=str(tmp_path / "absent.safetensors"))


# -- Q-Align ---------------------------------------------------------------------------------------
def test_qalign_is_the_expected_level_of_the_rating_words(ckpt):
    five = make("qalign", ckpt)
    unit = make("qalign", ckpt, scale="unit")
    batch = images(3)
    probabilities = five.level_probabilities(batch)
    np.testing.assert_allclose(probabilities.sum(dim=-1).numpy(), 1.0, rtol=1e-6)
    scores = five(batch)
    np.testing.assert_allclose(scores, (probabilities @ torch.tensor([5.0, 4, 3, 2, 1])).numpy(), atol=1e-6)
    assert np.all((scores >= 1) & (scores <= 5))
    np.testing.assert_allclose(unit(batch), (scores - 1) / 4, atol=1e-6)
    assert five.prompt_text.endswith("How would you rate the quality of this image?<|im_end|>\n"
                                     "<|im_start|>assistant\nThe quality of the image is")
    aesthetics = make("qalign", ckpt, task="aesthetics")
    assert aesthetics.prompt_text.endswith("The aesthetics of the image is")


def test_qalign_level_tokens_are_the_first_token_after_the_answer():
    tok = qwen_tokenizer()
    ids = rm.qalign.level_token_ids(tok, "The quality of the image is")
    assert ids == [tok.convert_tokens_to_ids("Ġ" + word) for word in rm.qalign.LEVELS]
    assert len(set(ids)) == 5


def test_qalign_on_qwen2vl_without_its_processor_class(ckpt):
    reward = make("qalign", ckpt, path=ckpt["qwen2vl"])
    assert reward.qwen is not None  # rebuilt from tokenizer + image processor (no torchvision here)
    scores = reward(images(2))
    assert scores.shape == (2,) and np.all((scores >= 1) & (scores <= 5))


def test_qalign_mplug_owl2_needs_trust_remote_code(ckpt):
    with pytest.raises(UserError, match="mPLUG-Owl2.*trust_remote_code: true"):
        make("qalign", ckpt, path=ckpt["remote"])


@pytest.fixture
def modules_cache(monkeypatch, tmp_path):
    """Remote code is copied into a temporary modules cache, not the user's Hugging Face one."""
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "transformers_modules", raising=False)


def test_qalign_remote_code_score_method(ckpt, modules_cache):
    reward = make("qalign", ckpt, path=ckpt["remote"], trust_remote_code=True)
    assert reward.mode == "remote"
    gray = torch.full((2, 3, 8, 8), 0.5)
    np.testing.assert_allclose(reward(gray), 1 + 4 * (128 / 255), atol=1e-5)
    unit = make("qalign", ckpt, path=ckpt["remote"], trust_remote_code=True, scale="unit", task="aesthetics")
    np.testing.assert_allclose(unit(gray), (4 * (128 / 255) + 0.5) / 4, atol=1e-5)


def test_hpsv3_instruction_option(ckpt, tmp_path):
    instruction_file = tmp_path / "instruction.txt"
    instruction_file.write_text("Judge this image for the prompt {prompt} please.", encoding="utf-8")
    reward = make("hpsv3", ckpt, instruction=str(instruction_file))
    text = reward.inputs.render(rm.hpsv3.hpsv3_user_text("a cat", reward.instruction))
    assert "Judge this image for the prompt a cat please." in text
    batch = images(2)
    assert not np.allclose(reward(batch, PROMPTS[:2]), make("hpsv3", ckpt)(batch, PROMPTS[:2]))
    with pytest.raises(UserError, match="must contain"):
        make("hpsv3", ckpt, instruction="no placeholder here")
