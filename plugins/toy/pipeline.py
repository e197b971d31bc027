"""A diffusers pipeline for the toy world: an SD3-class DiT sampling pixels by flow matching.

:class:`ToyFlowPipeline` is a ``DiffusionPipeline`` (``from_pretrained`` / ``save_pretrained``,
``num_inference_steps``, ``guidance_scale``, ``generator``) around real diffusers and transformers
classes: ``SD3Transformer2DModel`` (AdaLN-Zero gates, joint attention), a small
``CLIPTextModelWithProjection`` with a word-level tokenizer, and ``FlowMatchEulerDiscreteScheduler``.
It works in pixel space (no VAE) and batches classifier-free guidance as SD3's pipeline does
(``[unconditional; conditional]``), so Calibri's scales, ω and cfg ensemble reach it through the
same code path as on SD3.5.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from .world import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES

MAX_TOKENS = 12
SPECIAL = ("<pad>", "<unk>", "<bos>", "<eos>")  # <eos> must not be id 2 (CLIP's legacy pooling)


def vocabulary() -> list[str]:
    words = {"a", "an", *SIZES, *COLOURS, *SHAPES}
    for phrase, _, _ in POSITIONS.values():
        words.update(phrase.split())
    return [*SPECIAL, *sorted(words)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the toy world's words: ``<bos> words… <eos> <pad>…``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {word: i for i, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>", model_max_length=MAX_TOKENS)
    return tokenizer


def build_text_encoder(tokenizer: PreTrainedTokenizerFast, width: int = 64) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                            projection_dim=width, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return CLIPTextModelWithProjection(config)


def build_transformer(layers: int = 5, heads: int = 4, head_dim: int = 32, text_width: int = 64,
                      patch_size: int = 4) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE, patch_size=patch_size, in_channels=3, out_channels=3, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_width,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=text_width,
        pos_embed_max_size=IMAGE_SIZE // patch_size, qk_norm="rms_norm")


def build_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


class ToyFlowPipeline(DiffusionPipeline):
    """Text → 32×32 image with an SD3-class transformer in pixel space (see the module docstring)."""

    model_cpu_offload_seq = "text_encoder->transformer"
    #: Its image size, the way diffusers pipelines state their default (``default_sample_size ×
    #: vae_scale_factor`` pixels): pixel space, so the factor is 1.
    default_sample_size = IMAGE_SIZE
    vae_scale_factor = 1

    def __init__(self, transformer: SD3Transformer2DModel, text_encoder: CLIPTextModelWithProjection,
                 tokenizer: PreTrainedTokenizerFast, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)

    # -- text -------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                                return_tensors="pt")
        out = self.text_encoder(input_ids=tokens.input_ids.to(self.text_encoder.device),
                                attention_mask=tokens.attention_mask.to(self.text_encoder.device))
        dtype = self.transformer.dtype
        return out.last_hidden_state.to(device, dtype), out.text_embeds.to(device, dtype)

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], device: torch.device | None = None,
                      do_classifier_free_guidance: bool = True, negative_prompt: str | list[str] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled)``, SD3's order."""
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds, pooled = self._encode(prompts, device)
        if not do_classifier_free_guidance:
            return embeds, None, pooled, None
        negative = negative_prompt if negative_prompt is not None else ""
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        neg_embeds, neg_pooled = self._encode(negatives, device)
        return embeds, neg_embeds, pooled, neg_pooled

    # -- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, num_inference_steps: int = 8,
                 guidance_scale: float = 4.0, generator: torch.Generator | list[torch.Generator] | None = None,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True) -> Any:
        device = self._execution_device
        self._guidance_scale = guidance_scale  # as diffusers pipelines keep it, for hooks that check it
        cfg = guidance_scale > 1.0
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give prompt or prompt_embeds")
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = \
                self.encode_prompt(prompt, device, cfg, negative_prompt)
        elif pooled_prompt_embeds is None or (cfg and (negative_prompt_embeds is None
                                                       or negative_pooled_prompt_embeds is None)):
            raise ValueError("prompt_embeds needs pooled_prompt_embeds (and the negative ones with guidance)")
        if num_images_per_prompt > 1:
            def repeat(t: torch.Tensor | None) -> torch.Tensor | None:
                return None if t is None else t.repeat_interleave(num_images_per_prompt, dim=0)
            prompt_embeds, pooled_prompt_embeds = repeat(prompt_embeds), repeat(pooled_prompt_embeds)
            negative_prompt_embeds = repeat(negative_prompt_embeds)
            negative_pooled_prompt_embeds = repeat(negative_pooled_prompt_embeds)
        batch = prompt_embeds.shape[0]
        dtype = self.transformer.dtype
        shape = (batch, self.transformer.config.in_channels, IMAGE_SIZE, IMAGE_SIZE)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device, torch.float32)
        if cfg:
            context = torch.cat([negative_prompt_embeds, prompt_embeds])
            pooled = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds])
        else:
            context, pooled = prompt_embeds, pooled_prompt_embeds
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if cfg else latents
            velocity = self.transformer(hidden_states=model_input.to(dtype), timestep=t.expand(model_input.shape[0]),
                                        encoder_hidden_states=context, pooled_projections=pooled,
                                        return_dict=False)[0].float()
            if cfg:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
        images = (latents / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        if output_type == "pt":
            out: Any = images
        else:
            array = images.permute(0, 2, 3, 1).cpu().numpy()
            out = array if output_type == "np" else self.numpy_to_pil(array)
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)


def build_pipeline(seed: int = 0, **transformer_options: Any) -> ToyFlowPipeline:
    """A fresh, untrained toy pipeline (weights from ``seed``)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer)
    transformer = build_transformer(**transformer_options)
    pipe = ToyFlowPipeline(transformer, text_encoder, tokenizer, build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """N×H×W×3 images in [0, 1] → N×3×H×W in [−1, 1] (what the transformer generates)."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))) * 2.0 - 1.0
