"""Train the toy world's text-to-image DiT from scratch, deterministically, on a CPU.

    python -m calibri.plugins.toy.train --out plugins/toy/model --steps 3000

Rectified flow (SD3's objective): x_t = (1 − t)·x_0 + t·ε, the transformer predicts ε − x_0 at
timestep 1000·t, t drawn logit-normally; the prompt is dropped for 10% of samples so the model
also learns the unconditional velocity that classifier-free guidance needs. Images are rendered
on the fly from the world, so there is no dataset to ship. An exponential moving average of the
weights is what gets saved. The same seed, step count and thread count give the same weights.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibri.plugins.dit.generation import flush_denormals

from .pipeline import MAX_TOKENS, build_pipeline, to_model_space
from .world import all_scenes, prompt_of, render, sample_layout

DROP_PROMPT = 0.1


def batch(rng: np.random.Generator, size: int) -> tuple[torch.Tensor, list[str]]:
    scenes = all_scenes()
    picks = rng.integers(0, len(scenes), size=size)
    images = np.stack([render(scenes[i], layout=sample_layout(scenes[i], rng)) for i in picks])
    prompts = [prompt_of(scenes[i]) if rng.random() >= DROP_PROMPT else "" for i in picks]
    return to_model_space(images), prompts


def train(out: Path, steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0, threads: int = 2,
          ema_decay: float = 0.998, log_every: int = 50, checkpoint_every: int = 0) -> None:
    """Train with ``threads`` torch threads and subnormals flushed (subnormal activations make CPU
    steps ~10x slower); both, and torch's global RNG, are restored afterwards, since the caller's
    process (a test run, a notebook) goes on computing."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with flush_denormals(), torch.random.fork_rng():
            _train(out, steps, batch_size, lr, seed, ema_decay, log_every, checkpoint_every)
    finally:
        torch.set_num_threads(threads_before)


def _train(out: Path, steps: int, batch_size: int, lr: float, seed: int, ema_decay: float, log_every: int,
           checkpoint_every: int) -> None:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pipe = build_pipeline(seed)
    transformer, text_encoder, tokenizer = pipe.transformer, pipe.text_encoder, pipe.tokenizer
    transformer.train()
    text_encoder.train()
    params = [*transformer.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = min(200, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1))) * 0.9 + 0.1

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ema = [p.detach().clone() for p in params]
    started, running = time.monotonic(), None
    for step in range(steps):
        x0, prompts = batch(rng, batch_size)
        tokens = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
        encoded = text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        t = torch.sigmoid(torch.randn(batch_size))  # logit-normal(0, 1)
        noise = torch.randn_like(x0)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
        pred = transformer(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=encoded.last_hidden_state,
                           pooled_projections=encoded.text_embeds, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, p in zip(ema, params):
                shadow.lerp_(p.detach(), 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save_ema(pipe, params, ema, out.parent / f"{out.name}-step-{step + 1}")
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.monotonic() - started
            print(f"step {step + 1}/{steps}  loss {running:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                  f"{elapsed / (step + 1):.2f} s/step  eta {elapsed / (step + 1) * (steps - step - 1) / 60:.1f} min",
                  flush=True)
    _save_ema(pipe, params, ema, out)
    print(f"saved to {out} after {steps} steps in {(time.monotonic() - started) / 60:.1f} min")


def _save_ema(pipe: Any, params: list[torch.Tensor], ema: list[torch.Tensor], out: Path) -> None:
    """Save the pipeline with the averaged weights, leaving the training weights in place."""
    with torch.no_grad():
        live = [p.detach().clone() for p in params]
        for shadow, p in zip(ema, params):
            p.copy_(shadow)
        pipe.transformer.eval()
        pipe.text_encoder.eval()
        pipe.save_pretrained(out, safe_serialization=True)
        for saved, p in zip(live, params):
            p.copy_(saved)
        pipe.transformer.train()
        pipe.text_encoder.train()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--checkpoint-every", type=int, default=500,
                        help="save the EMA weights every N steps too (to OUT/step-N), so a long run can be inspected")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.threads,
          checkpoint_every=args.checkpoint_every)


if __name__ == "__main__":
    main()
