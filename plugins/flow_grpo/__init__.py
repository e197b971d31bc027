"""Flow-GRPO compatibility: its prompt datasets, reward names and scales, and reward servers.

Flow-GRPO users keep their ``dataset/<name>/{train,test}.txt`` or ``*_metadata.jsonl`` folders,
their ``reward_fn`` dicts, their own reward module and their reward servers; this plugin reads them
as calibri prompt sets and rewards (registered by :mod:`calibri.plugins.flow_grpo.plugin`).
"""
