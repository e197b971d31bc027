"""Learned image rewards: preference, alignment, aesthetic and quality models.

==========  ====================================================  ==========================  =======
name        model                                                 output (default scale)      prompt
==========  ====================================================  ==========================  =======
pickscore   PickScore: CLIP-H/14 tuned on Pick-a-Pic              logit_scale·cos, ≈ 20–24    yes
clipscore   CLIPScore with any CLIP (default ViT-L/14)            2.5·max(cos, 0)             yes
aesthetic   LAION aesthetic predictor v2 (CLIP-L/14 + MLP head)   1–10 rating, ≈ 5–7          no
imagereward ImageReward (BLIP + MLP head)                         standardised, ≈ −2…2        yes
hpsv3       HPSv3 (Qwen2-VL-7B + reward head), mu of (mu, sigma)  ≈ 5–15                      yes
qalign      Q-Align rating-word probabilities of a VLM            1–5 mean opinion score      no
==========  ====================================================  ==========================  =======

Each is a :class:`~calibri.rewards.base.Reward` taking ``path`` (a local directory or file, or a
Hugging Face hub id read from the local cache unless ``allow_download: true``), ``device``
(``auto``: CUDA when available), ``dtype`` (``auto``: float32 for the CLIP/BLIP models, bfloat16
for the 7B ones on a GPU) and ``batch_size``. Models load when the reward is built, once per
process (:func:`clear_model_cache` frees them). Missing weights or packages raise a one-line
:class:`~calibri.core.errors.UserError` naming the reward and the path or the pip extra.

Importing this module imports neither torch nor transformers: the reward classes import them
when built. See ``docs/rewards.md`` for the checkpoints each one expects.
"""
from __future__ import annotations

from ...core.hookspecs import hookimpl
from ._common import EXTRA, clear_model_cache
from .clip import Aesthetic, CLIPScore, PickScore
from .hpsv3 import HPSv3
from .imagereward import ImageReward, convert_imagereward
from .qalign import QAlign

#: Registered name → reward class.
MODEL_REWARDS = {
    "pickscore": PickScore,
    "clipscore": CLIPScore,
    "aesthetic": Aesthetic,
    "imagereward": ImageReward,
    "hpsv3": HPSv3,
    "qalign": QAlign,
}

_DESCRIPTIONS = {
    "pickscore": "PickScore preference model (CLIP-H): logit_scale·cos, ≈20–24 (scale: flowgrpo divides by 26)",
    "clipscore": "CLIPScore image–prompt agreement: 2.5·max(cos, 0) by default (Hessel et al.)",
    "aesthetic": "LAION aesthetic predictor v2: CLIP-L/14 embedding → linear MLP, 1–10 scale",
    "imagereward": "ImageReward preference model (BLIP + MLP), standardised score",
    "hpsv3": "HPSv3 preference model (Qwen2-VL-7B + reward head): mu of (mu, sigma)",
    "qalign": "Q-Align quality/aesthetics: rating-word probabilities of a VLM, 1–5 scale",
}


@hookimpl
def calibri_register_rewards(register):
    for name, cls in MODEL_REWARDS.items():
        register(name, cls, description=_DESCRIPTIONS[name])


__all__ = [
    "EXTRA", "MODEL_REWARDS", "Aesthetic", "CLIPScore", "HPSv3", "ImageReward", "PickScore", "QAlign",
    "clear_model_cache", "convert_imagereward",
]
