"""A Flow-GRPO user's three things at once, through the CLI: their dataset folder, their
``reward_fn`` dict and their LoRA checkpoint, in one short calibration of the shipped toy model."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

pytest.importorskip("peft")

from test_flowgrpo_lora import write_lora  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_a_calibration_on_a_flowgrpo_dataset_reward_dict_and_lora(tmp_path):
    from calibri.plugins.dit.models import load_pipeline

    prompts = [json.loads(line)["prompt"] for line in
               resources.files("calibri.plugins.toy").joinpath("data/validation.jsonl").read_text().splitlines()]
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "train.txt").write_text("\n".join(prompts[:6]) + "\n")
    (dataset / "test.txt").write_text("\n".join(prompts[6:8]) + "\n")
    lora = write_lora(load_pipeline("toy").transformer, tmp_path / "lora")
    run = tmp_path / "run"
    overrides = [
        "budget.rounds=1", "optimizer.popsize=2", "objective.options.bucket_size=2",
        "objective.options.copies=1", "objective.options.form=null", "objective.options.time_buckets=1",
        f"objective.options.prompts=flowgrpo:{dataset}", f"objective.options.validation_prompts=flowgrpo:{dataset}:test",
        "objective.options.reward={name: flowgrpo, options: {reward_fn: {jpeg_compressibility: 1.0}}}",
        f"objective.options.lora={lora.parent}", "validation.every=1", "callbacks=[]",
    ]
    done = subprocess.run([sys.executable, "-m", "calibri.core.cli", "run", str(ROOT / "examples" / "toy.yaml"),
                           "-o", str(run), *overrides], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    trials = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 2
    for trial in trials:  # the weighted sum of one component is that component, logged by its name
        assert trial["value"] < 0  # −kB / 500: compressibility is negative
        assert trial["metrics"]["reward.jpeg_compressibility"] == pytest.approx(trial["value"])
    best = json.loads((run / "best.json").read_text())
    assert best["finished"]
