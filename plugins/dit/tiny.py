"""Tiny, offline, deterministic DiT models and pipelines for tests and demos.

Everything here is built in memory from small configs with random weights: nothing is downloaded.
Each builder takes a ``seed`` and builds under a forked torch RNG seeded with it, so the same seed
always gives the same weights and the caller's global RNG state is left untouched.

Transformers
    :func:`tiny_flux_transformer`, :func:`tiny_sd3_transformer`, :func:`tiny_qwen_transformer`,
    :func:`tiny_pixart_transformer` (a few blocks, widths of 32) and :func:`medium_flux_transformer`
    (about 18 M parameters, meant for benchmarks on :data:`MEDIUM_FLUX_GRID` = 32x32 = 1024 image
    tokens). :func:`dummy_transformer_inputs` makes matching forward arguments for any of them.

Pipelines
    :func:`tiny_flux_pipeline`, :func:`tiny_sd3_pipeline`, :func:`tiny_qwen_pipeline`: real diffusers
    pipelines whose every component is tiny: byte-level tokenizers (any unicode prompt works; the T5
    one maps characters outside its small alphabet to ``<unk>``), 2-layer text encoders, VAEs with a
    spatial factor of 4. ``pipe(prompt=..., num_inference_steps=2, height=32, width=32)`` takes a
    fraction of a second on a CPU and reruns bit-exactly for a fixed generator.

The pipeline's transformer is exactly the matching ``tiny_*_transformer(seed)``. PixArt-Σ, Sana and
Chroma pipelines are in :mod:`calibri.plugins.dit.tiny_extra`.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

__all__ = [
    "MEDIUM_FLUX_GRID",
    "TINY_FLUX_CONFIG",
    "TINY_PIXART_CONFIG",
    "TINY_QWEN_CONFIG",
    "TINY_SD3_CONFIG",
    "dummy_transformer_inputs",
    "medium_flux_transformer",
    "tiny_flux_pipeline",
    "tiny_flux_transformer",
    "tiny_pixart_transformer",
    "tiny_qwen_pipeline",
    "tiny_qwen_transformer",
    "tiny_sd3_pipeline",
    "tiny_sd3_transformer",
]

# --------------------------------------------------------------------------------------------------
# Widths shared by the transformers and the text encoders that feed them.
# --------------------------------------------------------------------------------------------------

_CLIP_WIDTH = 32  # hidden size (and projection size) of every tiny CLIP text encoder
_FLUX_T5_WIDTH = 32  # FLUX: T5 width == joint_attention_dim
_SD3_T5_WIDTH = 64  # SD3: T5 width == joint_attention_dim >= 2 * CLIP width (CLIP states are padded to it)
_QWEN_TEXT_WIDTH = 32  # Qwen-Image: Qwen2.5-VL width == joint_attention_dim
_LATENT_CHANNELS = 4  # latent channels of the tiny VAEs

#: Tiny FLUX.1-dev-like transformer: 2 double-stream + 2 single-stream blocks, 2 heads of 16.
TINY_FLUX_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=4 * _LATENT_CHANNELS,  # 2x2-packed latents
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=_FLUX_T5_WIDTH,
    pooled_projection_dim=_CLIP_WIDTH,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
)

#: Tiny SD3.5-like transformer: 4 joint blocks (the last ``context_pre_only``), 4 heads of 8, RMS qk-norm.
TINY_SD3_CONFIG: dict[str, Any] = dict(
    sample_size=8,  # default latent size -> 32x32 images with the x4 VAE
    patch_size=2,
    in_channels=_LATENT_CHANNELS,
    out_channels=_LATENT_CHANNELS,
    num_layers=4,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=_SD3_T5_WIDTH,
    caption_projection_dim=32,  # == num_attention_heads * attention_head_dim
    pooled_projection_dim=2 * _CLIP_WIDTH,  # two CLIP text projections, concatenated
    pos_embed_max_size=32,
    qk_norm="rms_norm",
)

#: Tiny Qwen-Image-like transformer: 2 dual-stream blocks, 2 heads of 16.
TINY_QWEN_CONFIG: dict[str, Any] = dict(
    patch_size=2,
    in_channels=4 * _LATENT_CHANNELS,  # 2x2-packed latents
    out_channels=_LATENT_CHANNELS,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=_QWEN_TEXT_WIDTH,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
)

#: Tiny PixArt-like transformer: 2 blocks with cross-attention, 2 heads of 16.
TINY_PIXART_CONFIG: dict[str, Any] = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=_LATENT_CHANNELS,
    out_channels=2 * _LATENT_CHANNELS,  # learned sigma, as in PixArt
    num_layers=2,
    norm_num_groups=8,
    cross_attention_dim=32,  # == num_attention_heads * attention_head_dim
    caption_channels=32,
    sample_size=8,
    patch_size=2,
    use_additional_conditions=False,
)

_MEDIUM_FLUX_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=4,
    num_single_layers=8,
    attention_head_dim=64,
    num_attention_heads=4,
    joint_attention_dim=256,
    pooled_projection_dim=256,
    guidance_embeds=True,
    axes_dims_rope=(16, 24, 24),
)

#: Image-token grid (height, width) the medium FLUX is meant to be benchmarked on: 1024 tokens.
MEDIUM_FLUX_GRID: tuple[int, int] = (32, 32)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's CPU RNG seeded with ``seed``, restoring the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _eval(module: Any) -> Any:
    """Put ``module`` in eval mode, as ``from_pretrained`` does (dropout off)."""
    return module.eval()


# --------------------------------------------------------------------------------------------------
# Transformers
# --------------------------------------------------------------------------------------------------


def tiny_flux_transformer(seed: int = 0, **overrides: Any) -> FluxTransformer2DModel:
    """A tiny FLUX transformer (:data:`TINY_FLUX_CONFIG` updated with ``overrides``), in eval mode."""
    with _seeded(seed):
        return _eval(FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, **overrides}))


def tiny_sd3_transformer(
    seed: int = 0, dual_attention_layers: tuple[int, ...] = (0,), **overrides: Any
) -> SD3Transformer2DModel:
    """A tiny SD3.5-style transformer (:data:`TINY_SD3_CONFIG` updated with ``overrides``), in eval mode.

    Blocks listed in ``dual_attention_layers`` get a second image self-attention (``attn2``, MMDiT-X);
    the last block is ``context_pre_only`` (diffusers always builds it so).
    """
    config = {**TINY_SD3_CONFIG, **overrides, "dual_attention_layers": tuple(dual_attention_layers)}
    with _seeded(seed):
        return _eval(SD3Transformer2DModel(**config))


def tiny_qwen_transformer(seed: int = 0, **overrides: Any) -> QwenImageTransformer2DModel:
    """A tiny Qwen-Image transformer (:data:`TINY_QWEN_CONFIG` updated with ``overrides``), in eval mode."""
    with _seeded(seed):
        return _eval(QwenImageTransformer2DModel(**{**TINY_QWEN_CONFIG, **overrides}))


def tiny_pixart_transformer(seed: int = 0, **overrides: Any) -> PixArtTransformer2DModel:
    """A tiny PixArt transformer (:data:`TINY_PIXART_CONFIG` updated with ``overrides``), in eval mode."""
    with _seeded(seed):
        return _eval(PixArtTransformer2DModel(**{**TINY_PIXART_CONFIG, **overrides}))


def medium_flux_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """A benchmark-sized FLUX transformer: 4 double + 8 single blocks, width 256, about 18 M parameters.

    Meant to be run on :data:`MEDIUM_FLUX_GRID` (1024 image tokens), e.g. with
    ``dummy_transformer_inputs(model, grid=MEDIUM_FLUX_GRID, text_len=64)``.
    """
    with _seeded(seed):
        return _eval(FluxTransformer2DModel(**_MEDIUM_FLUX_CONFIG))


def dummy_transformer_inputs(
    transformer: torch.nn.Module,
    *,
    batch_size: int = 1,
    grid: tuple[int, int] = (4, 4),
    text_len: int = 8,
    timestep: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments for one forward of ``transformer`` (FLUX, SD3, Qwen-Image or PixArt).

    ``grid`` is the (height, width) of the image-token grid (after patching), ``text_len`` the number
    of text tokens and ``timestep`` the flow time in [0, 1]. Random tensors come from a generator
    seeded with ``seed``. ``return_dict=False`` is included, so ``transformer(**inputs)[0]`` is the output.
    """
    known = (FluxTransformer2DModel, SD3Transformer2DModel, QwenImageTransformer2DModel, PixArtTransformer2DModel)
    if not isinstance(transformer, known):
        raise TypeError(f"no dummy inputs for {type(transformer).__name__}")
    cfg = transformer.config
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    b = batch_size

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    t = torch.full((b,), float(timestep))
    if isinstance(transformer, FluxTransformer2DModel):
        img_ids = torch.zeros(h, w, 3)
        img_ids[..., 1] = torch.arange(h)[:, None]
        img_ids[..., 2] = torch.arange(w)[None, :]
        kwargs: dict[str, Any] = dict(
            hidden_states=randn(b, h * w, cfg.in_channels),
            encoder_hidden_states=randn(b, text_len, cfg.joint_attention_dim),
            pooled_projections=randn(b, cfg.pooled_projection_dim),
            timestep=t,
            img_ids=img_ids.reshape(h * w, 3),
            txt_ids=torch.zeros(text_len, 3),
        )
        if cfg.guidance_embeds:
            kwargs["guidance"] = torch.full((b,), 3.5)
    elif isinstance(transformer, SD3Transformer2DModel):
        p = cfg.patch_size
        kwargs = dict(
            hidden_states=randn(b, cfg.in_channels, h * p, w * p),
            encoder_hidden_states=randn(b, text_len, cfg.joint_attention_dim),
            pooled_projections=randn(b, cfg.pooled_projection_dim),
            timestep=t * 1000,
        )
    elif isinstance(transformer, QwenImageTransformer2DModel):
        kwargs = dict(
            hidden_states=randn(b, h * w, cfg.in_channels),
            encoder_hidden_states=randn(b, text_len, cfg.joint_attention_dim),
            encoder_hidden_states_mask=torch.ones(b, text_len, dtype=torch.long),
            timestep=t,
            img_shapes=[[(1, h, w)]] * b,
        )
        if cfg.guidance_embeds:
            kwargs["guidance"] = torch.full((b,), 3.5)
    else:  # PixArt
        p = cfg.patch_size
        kwargs = dict(
            hidden_states=randn(b, cfg.in_channels, h * p, w * p),
            encoder_hidden_states=randn(b, text_len, cfg.caption_channels or cfg.cross_attention_dim),
            timestep=(t * 1000).long(),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    kwargs["return_dict"] = False
    return kwargs


# --------------------------------------------------------------------------------------------------
# Tokenizers (built in memory)
# --------------------------------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes 0..255 (GPT-2's mapping), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def _clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer without merges: every byte is one token, so any text is covered."""
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 77
    return tokenizer


def _t5_tokenizer() -> T5Tokenizer:
    """A character-level T5 (unigram) tokenizer over ASCII, Latin, Greek and Cyrillic; other characters -> ``<unk>``."""
    codepoints = [*range(0x21, 0x7F), *range(0xA1, 0x250), *range(0x370, 0x530)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(c), -5.0) for c in codepoints if chr(c).isprintable()]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


# Qwen-Image's prompt template; its system part must be exactly 34 tokens (the pipeline drops that many).
_QWEN_TEMPLATE_WORDS = (
    "system", "Describe", "user", "assistant",
    *(" " + w for w in (
        "the image by detailing color shape size texture quantity text spatial relationships of objects "
        "and background"
    ).split()),
)
_QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer: 256 byte tokens, merges that make each template word one token, chat tokens."""
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    merges: list[tuple[str, str]] = []
    for word in _QWEN_TEMPLATE_WORDS:
        encoded = "".join(symbols[b] for b in word.encode("utf-8"))
        for i in range(1, len(encoded)):  # left-to-right chain: w[:1]+w[1], w[:2]+w[2], ...
            pair = (encoded[:i], encoded[i])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(encoded[: i + 1], len(vocab))
    for token in _QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=list(_QWEN_SPECIAL_TOKENS[1:]))


# --------------------------------------------------------------------------------------------------
# Text encoders and VAEs
# --------------------------------------------------------------------------------------------------


def _clip_text_encoder(seed: int, tokenizer: CLIPTokenizer, with_projection: bool, width: int = _CLIP_WIDTH,
                       layers: int = 2) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=layers,  # the pipelines read hidden_states[-2]
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooled output is read at the first EOS
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with _seeded(seed):
        return _eval(cls(config))


def _t5_encoder(seed: int, tokenizer: T5Tokenizer, width: int, layers: int = 2) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=max(8, width // 4),
        d_ff=2 * width,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with _seeded(seed):
        return _eval(T5EncoderModel(config))


def _qwen_text_encoder(seed: int, tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=_QWEN_TEXT_WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2
            rope_theta=1_000_000.0,
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=_QWEN_TEXT_WIDTH,
            patch_size=4, fullatt_block_indexes=[0],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    with _seeded(seed):
        return _eval(Qwen2_5_VLForConditionalGeneration(config))


def _kl_vae(seed: int, scaling_factor: float, shift_factor: float, latent_channels: int = _LATENT_CHANNELS) -> AutoencoderKL:
    """A 3-level KL autoencoder: x4 spatial downsampling, :data:`_LATENT_CHANNELS` latent channels."""
    with _seeded(seed):
        return _eval(AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ))


def _qwen_vae(seed: int) -> AutoencoderKLQwenImage:
    """A 3-level causal-3D autoencoder (x4 spatial), :data:`_LATENT_CHANNELS` latent channels."""
    with _seeded(seed):
        return _eval(AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=_LATENT_CHANNELS,
            dim_mult=[1, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True],
            latents_mean=[0.0] * _LATENT_CHANNELS,
            latents_std=[1.0] * _LATENT_CHANNELS,
        ))


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------


def _quiet(pipe: Any) -> Any:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A FLUX.1-dev-like pipeline: CLIP + T5 (width 32) text encoders, x4 KL VAE, :func:`tiny_flux_transformer`."""
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        ),
        vae=_kl_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip_text_encoder(seed, clip_tok, with_projection=False),
        tokenizer=clip_tok,
        text_encoder_2=_t5_encoder(seed, t5_tok, _FLUX_T5_WIDTH),
        tokenizer_2=t5_tok,
        transformer=tiny_flux_transformer(seed),
    )
    return _quiet(pipe)


def medium_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A benchmark-sized FLUX pipeline: :func:`medium_flux_transformer` with CLIP and T5 text encoders
    of its widths (256; 4 layers each) and a x4 VAE with 16 latent channels. At 256×256 pixels the
    transformer sees :data:`MEDIUM_FLUX_GRID` (1024 image tokens)."""
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    width = _MEDIUM_FLUX_CONFIG["joint_attention_dim"]
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        ),
        vae=_kl_vae(seed, scaling_factor=0.3611, shift_factor=0.1159,
                    latent_channels=_MEDIUM_FLUX_CONFIG["in_channels"] // 4),
        text_encoder=_clip_text_encoder(seed, clip_tok, with_projection=False, width=width, layers=4),
        tokenizer=clip_tok,
        text_encoder_2=_t5_encoder(seed, t5_tok, width, layers=4),
        tokenizer_2=t5_tok,
        transformer=medium_flux_transformer(seed),
    )
    return _quiet(pipe)


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """An SD3.5-like pipeline: two CLIPs (width 32) + T5 (width 64), x4 KL VAE, :func:`tiny_sd3_transformer`."""
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_kl_vae(seed, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip_text_encoder(seed, _clip_tokenizer(), with_projection=True),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_clip_text_encoder(seed + 1, _clip_tokenizer(), with_projection=True),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5_encoder(seed, _t5_tokenizer(), _SD3_T5_WIDTH),
        tokenizer_3=_t5_tokenizer(),
    )
    return _quiet(pipe)


def tiny_qwen_pipeline(seed: int = 0) -> QwenImagePipeline:
    """A Qwen-Image-like pipeline: 2-layer Qwen2.5-VL (width 32), x4 causal VAE, :func:`tiny_qwen_transformer`."""
    tokenizer = _qwen_tokenizer()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=True, base_shift=math.log(3), max_shift=math.log(3),
            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
        ),
        vae=_qwen_vae(seed),
        text_encoder=_qwen_text_encoder(seed, tokenizer),
        tokenizer=tokenizer,
        transformer=tiny_qwen_transformer(seed),
    )
    return _quiet(pipe)
