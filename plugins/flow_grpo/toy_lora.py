"""A Flow-GRPO-layout LoRA for the toy DiT, trained against a reward by reward-weighted regression.

The toy world stands in for SD3.5-Medium where no GPU is at hand, so the stacking workflow of the
paper's Table 4 (a reward-aligned LoRA, then a calibration on top) can be run and measured on a
CPU. The LoRA sits on Flow-GRPO's SD3 target modules and is saved exactly as Flow-GRPO saves its
checkpoints (``OUT/checkpoint-N/lora/`` through ``PeftModel.save_pretrained``), so everything that
reads Flow-GRPO checkpoints reads this one.

Training is an honest, cheap relative of Flow-GRPO's online RL (reward-weighted regression): each
iteration samples G images per prompt of the training split with the current model (the
deterministic Euler ODE at ``sample_steps``), scores them with the reward, turns the scores into
per-prompt advantages ``(r − mean) / (std + 1e-4)`` (Flow-GRPO's) and fine-tunes the LoRA on those
very images with the rectified-flow loss weighted by ``exp(advantage / temperature)`` (normalised
to mean 1 per prompt): the model moves towards its own better samples. What is regressed is the
velocity the sampler followed, so that with all weights equal the images' own distribution is a
fixed point: by default images are sampled without guidance and the conditional velocity is
trained; with ``guidance_scale`` g > 1, the guided velocity ``u + g·(c − u)`` (both passes through
the LoRA). Training images use more steps than the LoRA is used at, so they are close to the
model's own distribution rather than to a few-step sampler's errors. Measured on the toy model
(mean reward of each iteration's training samples), three tempting variants degrade it within a
few iterations: regressing the conditional velocity alone on guided images, which are guided
again at sampling (0.74 → 0.13 in six iterations with 4-step images; falling too with 16-step
ones); pairing each image with the noise it was sampled from (rectified flow's "reflow"), which
on a few hundred pairs per iteration fits them rather than the flow (0.91 → 0.46 in five); and the
guided velocity at g = 4 with fresh noise (0.91 → 0.79 in three). The default, unguided, held
its samples' reward over six iterations (0.90, 0.85, 0.88, 0.92, 0.89, 0.82: different prompts
each time).

The same model, settings and seed give the same adapter, bit for bit, on one machine and thread
count (every random draw has its own seeded generator; torch's global RNG is restored after).

    python -m calibri.plugins.flow_grpo.toy_lora --out bench-out/toy-lora --iterations 6
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Flow-GRPO's LoRA targets on SD3 (suffix match: ``attn2.*`` is left alone).
SD3_TARGET_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                      "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


@dataclass(frozen=True)
class LoraSettings:
    """What a toy LoRA is trained with (saved next to the checkpoints as ``settings.json``)."""

    model: str = "toy"
    reward: Any = "toy_oracle"
    prompts: Any = "toy/calibration"
    rank: int = 8
    alpha: int = 16
    iterations: int = 6
    prompts_per_iteration: int = 32
    samples_per_prompt: int = 4       # G: images per prompt, the group advantages are taken over
    sample_steps: int = 16            # sampling steps of the training images
    guidance_scale: float = 1.0       # of the training images (1: unguided; the conditional velocity is trained)
    epochs: int = 4                   # passes over each iteration's images
    batch_size: int = 32
    lr: float = 1e-4
    temperature: float = 0.5          # of exp(advantage / temperature)
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("rank", "alpha", "iterations", "prompts_per_iteration", "samples_per_prompt", "sample_steps",
                     "epochs", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.temperature > 0):
            raise ValueError("lr and temperature must be positive")
        if self.seed < 0:
            raise ValueError(f"seed must be at least 0, got {self.seed}")


def lora_config(rank: int, alpha: int) -> Any:
    """Flow-GRPO's SD3 LoRA configuration (gaussian init of A, B at zero) at this rank and alpha."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(SD3_TARGET_MODULES))


def advantages(rewards: np.ndarray, group: int) -> np.ndarray:
    """Flow-GRPO's per-prompt advantages: ``(r − mean) / (std + 1e-4)`` over each prompt's ``group``
    consecutive samples."""
    by_prompt = rewards.reshape(-1, group)
    centred = by_prompt - by_prompt.mean(axis=1, keepdims=True)
    return (centred / (by_prompt.std(axis=1, keepdims=True) + 1e-4)).reshape(-1)


def rwr_weights(advantage: np.ndarray, group: int, temperature: float) -> np.ndarray:
    """``exp(advantage / temperature)``, normalised to mean 1 within each prompt's group (bounded
    by ``group``: one sample never outweighs its whole group)."""
    logits = (advantage / temperature).reshape(-1, group)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (weights / weights.mean(axis=1, keepdims=True)).reshape(-1)


def train_lora(out: str | Path, settings: LoraSettings = LoraSettings(),
               progress: Callable[[str], None] | None = print) -> Path:
    """Train a LoRA on ``settings.model`` and save it to ``OUT/checkpoint-N/lora`` (N = the
    iteration count); returns that folder. ``OUT/settings.json`` and ``OUT/history.json`` (mean
    reward of each iteration's samples) are written too. Uses ``settings.threads`` torch threads
    and flushes subnormals while it runs, restoring both and torch's global RNG afterwards."""
    from calibri.plugins.dit.generation import flush_denormals

    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with flush_denormals(), torch.random.fork_rng():
            return _train(Path(out), settings, progress or (lambda _: None))
    finally:
        torch.set_num_threads(threads_before)


def _train(out: Path, settings: LoraSettings, say: Callable[[str], None]) -> Path:
    from peft import get_peft_model

    from calibri.plugins.dit.generation import ImageGenerator
    from calibri.plugins.dit.models import load_pipeline
    from calibri.plugins.dit.objective import score_images
    from calibri.plugins.dit.prompts import load_prompts
    from calibri.rewards.combine import build_reward

    torch.manual_seed(settings.seed)  # the LoRA's gaussian init
    pipe = load_pipeline(settings.model, "float32", "cpu")
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    model = get_peft_model(pipe.transformer, lora_config(settings.rank, settings.alpha))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    reward = build_reward(settings.reward, field="reward")
    prompt_set = load_prompts(settings.prompts, "prompts")
    generator = ImageGenerator(pipe, settings.sample_steps, settings.guidance_scale, batch_size=64)
    encode = _encoder(pipe, generator)
    empty_context, empty_pooled = encode([""])  # the unconditional input, as sampling gives it
    rng = np.random.default_rng(settings.seed)
    noise_rng = torch.Generator().manual_seed(settings.seed)
    history: list[dict[str, float]] = []
    started = time.monotonic()
    group = settings.samples_per_prompt
    for iteration in range(settings.iterations):
        picked = rng.choice(len(prompt_set), size=min(settings.prompts_per_iteration, len(prompt_set)), replace=False)
        prompts = [prompt_set.prompts[i] for i in picked for _ in range(group)]
        metadata = [prompt_set.metadata[i] for i in picked for _ in range(group)]
        model.eval()
        images = generator.generate(prompts, int(rng.integers(2**31)))
        rewards, _ = score_images(reward, images, prompts, metadata)
        weights = torch.from_numpy(rwr_weights(advantages(rewards, group), group, settings.temperature)).float()
        x0 = images * 2.0 - 1.0  # the transformer's space
        context, pooled = encode(prompts)
        model.train()
        losses = []
        for _ in range(settings.epochs):
            order = torch.from_numpy(rng.permutation(len(prompts)))
            for start in range(0, len(prompts), settings.batch_size):
                idx = order[start:start + settings.batch_size]
                losses.append(_step(model, optimizer, trainable, x0[idx], context[idx], pooled[idx],
                                    (empty_context, empty_pooled), settings.guidance_scale, weights[idx], noise_rng))
        history.append({"iteration": iteration + 1, "sample_reward": float(rewards.mean()),
                        "loss": float(np.mean(losses))})
        say(f"lora iteration {iteration + 1}/{settings.iterations}: sample reward {rewards.mean():.4f}, "
            f"weighted loss {np.mean(losses):.4f} ({time.monotonic() - started:.0f} s)")
    model.eval()
    target = out / f"checkpoint-{settings.iterations}" / "lora"
    model.save_pretrained(str(target))
    (out / "settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n", encoding="utf-8")
    (out / "history.json").write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
    return target


def _encoder(pipe: Any, generator: Any) -> Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]:
    """Prompts → (context, pooled) batch tensors, each prompt encoded once, alone, the way the
    image generator encodes it (so training sees exactly the encodings sampling uses)."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def encode(prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            for prompt in prompts:
                if prompt not in cache:
                    cache[prompt] = generator.family.encode(pipe, prompt, generator.device)
        return (torch.cat([cache[p]["prompt_embeds"] for p in prompts]),
                torch.cat([cache[p]["pooled_prompt_embeds"] for p in prompts]))

    return encode


def _step(model: Any, optimizer: torch.optim.Optimizer, trainable: Sequence[torch.Tensor], x0: torch.Tensor,
          context: torch.Tensor, pooled: torch.Tensor, empty: tuple[torch.Tensor, torch.Tensor],
          guidance: float, weights: torch.Tensor, noise_rng: torch.Generator) -> float:
    """One reward-weighted rectified-flow step (the toy model's training objective, per sample
    weighted, on the guided velocity): x_t = (1 − t)·x0 + t·ε, u + g·(c − u) regressed on ε − x0,
    t logit-normal. The unconditional and conditional passes are one batch, as the pipeline runs
    them."""
    n = len(x0)
    t = torch.sigmoid(torch.randn(n, generator=noise_rng))
    noise = torch.randn(x0.shape, generator=noise_rng)
    xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
    if guidance <= 1.0:  # unguided sampling: the conditional velocity is all the sampler follows
        pred = model(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=context, pooled_projections=pooled,
                     return_dict=False)[0]
        return _descend(optimizer, trainable, pred, noise - x0, weights)
    both = model(hidden_states=torch.cat([xt, xt]), timestep=torch.cat([t, t]) * 1000,
                 encoder_hidden_states=torch.cat([empty[0].expand_as(context), context]),
                 pooled_projections=torch.cat([empty[1].expand_as(pooled), pooled]), return_dict=False)[0]
    uncond, cond = both[:n], both[n:]
    return _descend(optimizer, trainable, uncond + guidance * (cond - uncond), noise - x0, weights)


def _descend(optimizer: torch.optim.Optimizer, trainable: Sequence[torch.Tensor], pred: torch.Tensor,
             target: torch.Tensor, weights: torch.Tensor) -> float:
    """One optimiser step on the weighted mean squared error; the loss, as a number."""
    per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
    loss = (per_sample * weights).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for checkpoint-N/lora (Flow-GRPO's layout)")
    defaults = LoraSettings()
    for name in ("rank", "alpha", "iterations", "prompts_per_iteration", "samples_per_prompt", "sample_steps", "epochs",
                 "batch_size", "seed", "threads"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("guidance_scale", "lr", "temperature"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--model", default=defaults.model)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    try:
        settings = LoraSettings(**args)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"saved {train_lora(out, settings)}")


if __name__ == "__main__":
    main()
