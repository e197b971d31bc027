"""The toy pipeline: a real diffusers pipeline class, save/load, per-image seeds, Calibri on it,
deterministic training, and the shipped trained weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from calibri.plugins.toy.pipeline import ToyFlowPipeline, build_pipeline, build_tokenizer, vocabulary
from calibri.plugins.toy.world import prompt_of, split_scenes

PROMPTS = ["a small red circle on the left", "a large blue cross at the top"]


def seeds(*values: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(v) for v in values]


@pytest.fixture(scope="module")
def pipe() -> ToyFlowPipeline:
    return build_pipeline(seed=0, layers=2)


def test_tokenizer_covers_the_world_and_pools_at_eos():
    tokenizer = build_tokenizer()
    ids = tokenizer(PROMPTS[0]).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids and tokenizer.eos_token_id != 2  # CLIP's legacy argmax pooling
    assert len(vocabulary()) == len(tokenizer)


def test_save_and_load_the_diffusers_way(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = ToyFlowPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    a = pipe(PROMPTS, num_inference_steps=3, generator=seeds(1, 2), output_type="pt").images
    b = loaded(PROMPTS, num_inference_steps=3, generator=seeds(1, 2), output_type="pt").images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == (2, 3, 32, 32)
    pil = loaded(PROMPTS[:1], num_inference_steps=2, generator=seeds(1)).images
    assert pil[0].size == (32, 32)


def test_each_image_depends_only_on_its_own_prompt_and_generator(pipe):
    pair = pipe(PROMPTS, num_inference_steps=3, generator=seeds(5, 7), output_type="pt").images
    alone = pipe(PROMPTS[1:], num_inference_steps=3, generator=seeds(7), output_type="pt").images
    torch.testing.assert_close(pair[1:], alone, rtol=0, atol=1e-5)


def test_prompt_embeds_and_prompt_strings_give_the_same_images(pipe):
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS)
    a = pipe(prompt_embeds=embeds, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
             negative_pooled_prompt_embeds=neg_pooled, num_inference_steps=2, generator=seeds(3, 4), output_type="pt").images
    b = pipe(PROMPTS, num_inference_steps=2, generator=seeds(3, 4), output_type="pt").images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        pipe(prompt_embeds=embeds, num_inference_steps=2)


def test_calibri_cfg_ensemble_reproduces_the_pipelines_guidance(pipe):
    from calibri.plugins.dit.calibration import attach

    stock = pipe(PROMPTS, num_inference_steps=3, guidance_scale=4.0, generator=seeds(1, 2), output_type="pt").images
    calibrator = attach(pipe.transformer, "layer", copies=2, form="cfg", guidance_scale=4.0)
    try:
        same = pipe(PROMPTS, num_inference_steps=3, guidance_scale=4.0, generator=seeds(1, 2), output_type="pt").images
        torch.testing.assert_close(same, stock, rtol=0, atol=1e-5)
        names = calibrator.parameter_names()
        calibrator.set_values({names[-2]: 2.0, names[-1]: -1.0})  # ω = (g, 1 − g) at g = 2
        at_two = pipe(PROMPTS, num_inference_steps=3, guidance_scale=4.0, generator=seeds(1, 2), output_type="pt").images
    finally:
        calibrator.detach()
    plain_two = pipe(PROMPTS, num_inference_steps=3, guidance_scale=2.0, generator=seeds(1, 2), output_type="pt").images
    torch.testing.assert_close(at_two, plain_two, rtol=0, atol=1e-5)
    assert (at_two - stock).abs().max() > 1e-3


def test_training_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from calibri.plugins.toy.train import train

    for name in ("a", "b"):
        train(tmp_path / name, steps=3, batch_size=4, threads=1)
    a = load_file(tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = build_pipeline(seed=0).transformer.state_dict()
    assert any(not torch.equal(a[k], fresh[k].float()) for k in a)  # it did learn something


def test_the_shipped_model_is_trained_and_follows_prompts():
    """The embedded default is a trained model: on held-out prompts its images satisfy the oracle
    far better than chance, and better with more sampling steps."""
    from calibri.plugins.dit.generation import ImageGenerator
    from calibri.plugins.dit.models import load_pipeline
    from calibri.plugins.toy.oracle import ToyOracle

    toy = load_pipeline("toy")
    _, validation = split_scenes()
    prompts = [prompt_of(s) for s in validation[::4]]
    oracle = ToyOracle()
    scores = {}
    for steps in (2, 8):
        images = ImageGenerator(toy, steps=steps, guidance_scale=4.0).generate(prompts, seed=0)
        scores[steps] = float(np.mean(oracle(images, prompts)))
    assert scores[8] > 0.5 and scores[8] > scores[2] + 0.05
