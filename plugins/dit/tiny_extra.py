"""Tiny, offline pipelines of the DiTs whose text encoders pass an attention mask: PixArt-Σ,
Sana and Chroma (companions of :mod:`calibri.plugins.dit.tiny`, built the same way).

Each builder makes a real diffusers pipeline from small configs with random weights, seeded (same
seed, same weights; the caller's RNG untouched): character-level tokenizers built in memory,
2-layer text encoders of width 32, VAEs with a spatial factor of 4, and the matching
``tiny_*_transformer(seed)``. Sana and PixArt choose their image size from an aspect-ratio table
of the real models unless called with ``use_resolution_binning=False``;
``pipe(prompt=..., num_inference_steps=2, height=32, width=32, use_resolution_binning=False)``
then takes a fraction of a second on a CPU.
"""
from __future__ import annotations

from typing import Any

from diffusers import (
    AutoencoderDC,
    ChromaPipeline,
    ChromaTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtSigmaPipeline,
    SanaPipeline,
    SanaTransformer2DModel,
)
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

from .tiny import _LATENT_CHANNELS, _eval, _kl_vae, _quiet, _seeded, _t5_encoder, _t5_tokenizer, tiny_pixart_transformer

__all__ = [
    "TINY_CHROMA_CONFIG", "TINY_SANA_CONFIG", "tiny_chroma_pipeline", "tiny_chroma_transformer",
    "tiny_pixart_pipeline", "tiny_sana_pipeline", "tiny_sana_transformer",
]

_TEXT_WIDTH = 32  # every text encoder here; == caption_channels / joint_attention_dim

#: Tiny Sana-like transformer: 2 blocks (linear self-attention, cross-attention, Mix-FFN), 2 heads of 16.
TINY_SANA_CONFIG: dict[str, Any] = dict(
    in_channels=_LATENT_CHANNELS,
    out_channels=_LATENT_CHANNELS,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=16,
    cross_attention_dim=32,  # == num_attention_heads * attention_head_dim
    caption_channels=_TEXT_WIDTH,
    mlp_ratio=2.5,
    sample_size=8,  # default latent size -> 32x32 images with the x4 VAE
    patch_size=1,
)

#: Tiny Chroma-like transformer: 2 double-stream + 2 single-stream blocks, 2 heads of 16, a small approximator.
TINY_CHROMA_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=4 * _LATENT_CHANNELS,  # 2x2-packed latents
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=_TEXT_WIDTH,
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    approximator_num_channels=16,
    approximator_hidden_dim=32,
    approximator_layers=2,
)


def tiny_sana_transformer(seed: int = 0, **overrides: Any) -> SanaTransformer2DModel:
    """A tiny Sana transformer (:data:`TINY_SANA_CONFIG` updated with ``overrides``), in eval mode."""
    with _seeded(seed):
        return _eval(SanaTransformer2DModel(**{**TINY_SANA_CONFIG, **overrides}))


def tiny_chroma_transformer(seed: int = 0, **overrides: Any) -> ChromaTransformer2DModel:
    """A tiny Chroma transformer (:data:`TINY_CHROMA_CONFIG` updated with ``overrides``), in eval mode."""
    with _seeded(seed):
        return _eval(ChromaTransformer2DModel(**{**TINY_CHROMA_CONFIG, **overrides}))


def _gemma_tokenizer() -> GemmaTokenizer:
    """A character-level Gemma tokenizer (no merges) over ASCII, Latin, Greek and Cyrillic; other
    characters fall back to byte tokens, so any text is covered."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    vocab.update({f"<0x{b:02X}>": 6 + b for b in range(256)})
    for c in (*range(0x21, 0x7F), *range(0xA1, 0x250), *range(0x370, 0x530)):
        if chr(c).isprintable():
            vocab.setdefault(chr(c), len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[])


def _gemma2_encoder(seed: int, tokenizer: GemmaTokenizer) -> Gemma2Model:
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=_TEXT_WIDTH, intermediate_size=2 * _TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with _seeded(seed):
        return _eval(Gemma2Model(config))


def _dc_ae(seed: int) -> AutoencoderDC:
    """A 3-level deep-compression autoencoder (x4 spatial), :data:`_LATENT_CHANNELS` latent channels,
    with Sana's block types (residual blocks, then an EfficientViT block)."""
    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")
    with _seeded(seed):
        return _eval(AutoencoderDC(
            in_channels=3, latent_channels=_LATENT_CHANNELS, attention_head_dim=8,
            encoder_block_types=blocks, decoder_block_types=blocks,
            encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
            encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
            encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
            scaling_factor=0.41407,
        ))


def tiny_pixart_pipeline(seed: int = 0) -> PixArtSigmaPipeline:
    """A PixArt-Σ-like pipeline: T5 (width 32), x4 KL VAE, :func:`~calibri.plugins.dit.tiny.tiny_pixart_transformer`."""
    tokenizer = _t5_tokenizer()
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(seed, tokenizer, _TEXT_WIDTH),
        vae=_kl_vae(seed, scaling_factor=0.13025, shift_factor=None),
        transformer=tiny_pixart_transformer(seed),
        scheduler=DPMSolverMultistepScheduler(),
    )
    return _quiet(pipe)


def tiny_sana_pipeline(seed: int = 0) -> SanaPipeline:
    """A Sana-like pipeline: Gemma-2 (width 32), x4 DC-AE, flow DPM-Solver, :func:`tiny_sana_transformer`."""
    tokenizer = _gemma_tokenizer()
    pipe = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=_gemma2_encoder(seed, tokenizer),
        vae=_dc_ae(seed),
        transformer=tiny_sana_transformer(seed),
        scheduler=DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    )
    return _quiet(pipe)


def tiny_chroma_pipeline(seed: int = 0) -> ChromaPipeline:
    """A Chroma-like pipeline: T5 (width 32), x4 KL VAE, :func:`tiny_chroma_transformer`."""
    tokenizer = _t5_tokenizer()
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        ),
        vae=_kl_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_t5_encoder(seed, tokenizer, _TEXT_WIDTH),
        tokenizer=tokenizer,
        transformer=tiny_chroma_transformer(seed),
    )
    return _quiet(pipe)
