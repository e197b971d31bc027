"""Registers the Flow-GRPO compatibility plugin: its prompt source and rewards.

* prompt source ``flowgrpo:DIR[:SPLIT][:FORMAT]`` (:mod:`.datasets`);
* rewards ``flowgrpo`` (Flow-GRPO's ``reward_fn`` dict, :mod:`.rewards`), ``flowgrpo.ocr``
  (:mod:`.ocr`), and the server clients ``flowgrpo.geneval``, ``flowgrpo.deqa`` and
  ``flowgrpo.unifiedreward`` (:mod:`.servers`).

Importing this module imports none of torch, PIL or the user's Flow-GRPO code: the factories do,
when a run needs them.
"""
from __future__ import annotations

from calibri.core.hookspecs import hookimpl

from .commands import calibri_register_commands  # noqa: F401  (calibri flowgrpo …)


@hookimpl
def calibri_register_prompt_sources(register):
    from .datasets import SCHEME, load_flowgrpo

    register(SCHEME, load_flowgrpo,
             description="Flow-GRPO dataset folder: flowgrpo:DIR[:SPLIT][:text|geneval] ({split}.txt or "
                         "{split}_metadata.jsonl; split train by default)")


@hookimpl
def calibri_register_rewards(register):
    from .ocr import OCRReward
    from .rewards import flowgrpo
    from .servers import DeQAReward, GenEvalReward, UnifiedReward

    register("flowgrpo", flowgrpo,
             description="Flow-GRPO's reward_fn {name: weight} on its scales (pickscore/26, ocr, geneval, ...): "
                         "weighted sum, components logged; or module: flow_grpo.rewards")
    register("flowgrpo.ocr", OCRReward,
             description="Flow-GRPO's OCR reward: 1 − edit distance / length to the prompt's quoted text "
                         "(ocr_engine: 'module:function')")
    register("flowgrpo.geneval", GenEvalReward,
             description="GenEval score from a Flow-GRPO GenEval server (pickle protocol: allow_pickle: true, "
                         "loopback only)")
    register("flowgrpo.deqa", DeQAReward,
             description="DeQA quality score / 5 from a Flow-GRPO DeQA server (pickle protocol: allow_pickle: "
                         "true, loopback only)")
    register("flowgrpo.unifiedreward", UnifiedReward,
             description="UnifiedReward on an OpenAI-compatible chat server: 'Final Score:' / 5")
