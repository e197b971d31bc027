"""``calibri ablate``: the files and their statistics, identity cells, resume, refusals, workers."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from calibri.plugins.dit.ablation_stats import holm

VALUES = "0,1,1.5"
SITES = ["block.0.attn", "block.0.mlp", "block.1.attn", "block.1.mlp"]


def study_config(toy_dir: Path, prompt_files, **changes) -> dict:
    """A two-block toy pipeline, CFG ensemble with two time buckets (4 parameters per site)."""
    train, val = prompt_files
    options = {"model": str(toy_dir), "granularity": "layer", "copies": 2, "form": "cfg", "guidance_scale": 3.0,
               "time_buckets": 2, "steps": 2, "reward": "colorfulness", "prompts": str(train),
               "validation_prompts": str(val), "validation_seed": 5, "batch_size": 8}
    options.update(changes.pop("options", {}))
    config = {"name": "abl", "seed": 0, "objective": {"name": "calibri", "options": options},
              "optimizer": {"name": "pycma"}, "budget": {"rounds": 1}, "callbacks": []}
    config.update(changes)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def ablate(*args) -> int:
    """``calibri ablate ARGS`` in this process (serial executors then evaluate here); exit status."""
    from calibri.core import plugins
    from calibri.core.cli import main

    plugins.reset_registry()
    try:
        main(["ablate", *map(str, args), "--quiet"])
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        plugins.reset_registry()


def cell_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]


def numbers(document: dict) -> list:
    """What must not depend on how the study was run (not wall time, invocations or the command)."""
    return [document["identity"], document["cells"], document["best_per_site"], document["summary"]]


@pytest.fixture(scope="module")
def study(toy_dir, prompt_files, tmp_path_factory, one_torch_thread):
    folder = tmp_path_factory.mktemp("ablate")
    config = write_config(folder / "abl.yaml", study_config(toy_dir, prompt_files))
    out = folder / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CALIBRI_PLUGINS", "")
        assert ablate(config, "--values", VALUES, "--seeds", "2", "-o", out) == 0
    return config, out


def test_the_files_are_written_and_consistent(study, toy_dir, prompt_files):
    config, out = study
    for name in ("ablation.csv", "ablation.json", "ablation.md", "ablation.png", "study.json", "cells.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((out / "ablation.json").read_text())
    assert document["sites"] == SITES and document["values"] == [0.0, 1.0, 1.5]
    assert document["images"] == {"source": str(prompt_files[1]), "split": "validation", "prompts": 3, "seeds": 2,
                                  "seed": 5, "n": 6}
    assert document["site_parameters"]["block.1.mlp"] == ["t0.c0.block.1.mlp", "t0.c1.block.1.mlp",
                                                          "t1.c0.block.1.mlp", "t1.c1.block.1.mlp"]
    rows = list(csv.DictReader((out / "ablation.csv").open()))
    assert rows[0]["site"] == "identity" and rows[0]["value"] == ""
    assert [(r["site"], r["value"]) for r in rows[1:]] == [(s, v) for s in SITES for v in ("0", "1", "1.5")]

    lines = {line["key"]: line for line in cell_lines(out)}
    assert len(lines) == 1 + len(SITES) * 3 and all(line["status"] == "ok" for line in lines.values())
    identity = np.array(lines["identity"]["rewards"])
    assert len(identity) == 6 and document["identity"]["mean"] == pytest.approx(identity.mean(), rel=1e-12)
    assert document["identity"]["sem"] == pytest.approx(identity.std(ddof=1) / math.sqrt(6), rel=1e-12)
    family = []
    for cell in document["cells"]:
        rewards = np.array(lines[f"{cell['site']}={cell['value']!r}"]["rewards"])
        delta = rewards - identity
        assert cell["n"] == 6 and cell["mean"] == pytest.approx(rewards.mean(), rel=1e-12)
        assert cell["diff"] == pytest.approx(delta.mean(), abs=1e-12)
        assert cell["diff_sem"] == pytest.approx(delta.std(ddof=1) / math.sqrt(6), abs=1e-12)
        if cell["value"] != 1.0:
            assert cell["p"] == pytest.approx(stats.ttest_rel(rewards, identity).pvalue, rel=1e-9)
            family.append(cell)
    assert [c["p_holm"] for c in family] == pytest.approx(holm([c["p"] for c in family]))
    assert all(c["significant"] == (c["p_holm"] < 0.05) for c in family)
    assert document["family_size"] == len(family) == 8
    assert any(c["diff"] != 0 for c in family)  # the sites act: switching one off changes the images

    markdown = (out / "ablation.md").read_text()
    assert "Holm" in markdown and "wall time:" in markdown and "| block.0.attn |" in markdown
    assert "switched off (value 0):" in markdown and "re-weighted (some value other than 0 and 1):" in markdown


def test_a_site_at_one_is_the_identity_image_for_image(study):
    _, out = study
    lines = {line["key"]: line for line in cell_lines(out)}
    for site in SITES:
        assert lines[f"{site}=1.0"]["rewards"] == lines["identity"]["rewards"]
        assert lines[f"{site}=0.0"]["rewards"] != lines["identity"]["rewards"]


def test_the_identity_cell_is_the_objectives_own_score(study, toy_dir, prompt_files):
    """Per-image rewards come from the calibri objective itself: its value on the same prompts
    (repeated per seed) and seed is the identity cell's mean, exactly."""
    from calibri.plugins.dit.objective import CalibriObjective, CalibriOptions
    from calibri.plugins.dit.prompts import load_prompts

    _, out = study
    options = study_config(toy_dir, prompt_files)["objective"]["options"]
    objective = CalibriObjective(CalibriOptions(**options))
    try:
        prompts = load_prompts(options["validation_prompts"], "x")
        result = objective.score(None, list(prompts.prompts) * 2, list(prompts.metadata) * 2, 5)
    finally:
        objective.close()
    assert result.value == cell_lines(out)[0]["mean"]


def test_a_rerun_skips_done_cells_and_a_resumed_study_gives_the_same_numbers(study, tmp_path, monkeypatch):
    from calibri.plugins.dit.ablation_objective import PerImageObjective

    config, out = study
    monkeypatch.setenv("CALIBRI_PLUGINS", "")
    calls = []
    original = PerImageObjective.score
    monkeypatch.setattr(PerImageObjective, "score", lambda self, *a, **k: calls.append(a[0]) or original(self, *a, **k))

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(out / "study.json", partial / "study.json")
    lines = (out / "cells.jsonl").read_text().splitlines(keepends=True)
    torn = lines[5][: len(lines[5]) // 2]  # the line a killed study was writing
    (partial / "cells.jsonl").write_text("".join(lines[:5]) + torn)
    assert ablate(config, "--values", VALUES, "--seeds", "2", "-o", partial) == 0
    assert len(calls) == len(lines) - 5
    assert numbers(json.loads((partial / "ablation.json").read_text())) == \
        numbers(json.loads((out / "ablation.json").read_text()))
    assert [line["rewards"] for line in cell_lines(partial)] == [line["rewards"] for line in cell_lines(out)]

    calls.clear()
    assert ablate(config, "--values", VALUES, "--seeds", "2", "-o", partial) == 0  # finished: nothing to do
    assert calls == []


def test_a_changed_study_is_refused_naming_what_changed(study, cli_inproc, tmp_path):
    config, out = study
    before = (out / "cells.jsonl").read_bytes()
    for extra, needle in (([], "--values changed from [0.0, 1.0, 1.5] to [0.0, 0.5]"),
                          (["objective.options.steps=3"], "objective.options.steps changed from 2 to 3")):
        values = "0,0.5" if not extra else VALUES
        result = cli_inproc("ablate", config, *extra, "--values", values, "--seeds", "2", "-o", out)
        assert result.returncode == 2
        assert needle in result.stderr and "--overwrite" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    result = cli_inproc("ablate", config, "--values", VALUES, "--seeds", "1", "-o", out)
    assert result.returncode == 2 and "--seeds changed from 2 to 1" in result.stderr
    assert (out / "cells.jsonl").read_bytes() == before


def test_two_worker_processes_give_the_serial_numbers(study, toy_dir, prompt_files, tmp_path, monkeypatch):
    """Bit for bit at the same torch thread count per evaluation (the module runs on one); the
    cells both studies hold (identity, every site at 1.5) are compared."""
    _, out = study
    monkeypatch.setenv("CALIBRI_PLUGINS", "")
    config = write_config(tmp_path / "abl.yaml", study_config(
        toy_dir, prompt_files, executor={"name": "process", "workers": 2, "options": {"threads": 1}}))
    assert ablate(config, "--values", "1.5", "--seeds", "2", "-o", tmp_path / "p") == 0
    serial = {line["key"]: line["rewards"] for line in cell_lines(out)}
    parallel = {line["key"]: line["rewards"] for line in cell_lines(tmp_path / "p")}
    assert sorted(parallel) == sorted(["identity", *(f"{site}=1.5" for site in SITES)])
    assert parallel == {key: serial[key] for key in parallel}


@pytest.mark.parametrize("args, changes, needles", [
    (["--values", "0,a"], {}, ["--values", "comma-separated numbers"]),
    (["--values", "0,1,0"], {}, ["--values", "more than once"]),
    (["--values", "nan"], {}, ["--values", "finite"]),
    (["--prompts", "9"], {}, ["--prompts", "holds 3 prompts"]),
    (["objective.options.granularity=cells"], {}, ["objective.options.granularity"]),
    ([], {"objective": {"name": "rosenbrock", "options": {}}}, ["objective.name", "calibri objective"]),
    ([], {"options": {"validation_prompts": "missing.txt"}}, ["objective.options.validation_prompts", "missing.txt"]),
])
def test_bad_inputs_are_one_line_errors_with_exit_status_2(args, changes, needles, toy_dir, prompt_files,
                                                           cli_inproc, tmp_path):
    config = write_config(tmp_path / "abl.yaml", study_config(toy_dir, prompt_files, **changes))
    result = cli_inproc("ablate", config, *args, "-o", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_or_holds_other_files_is_refused(toy_dir, prompt_files, cli_inproc, tmp_path):
    config = write_config(tmp_path / "abl.yaml", study_config(toy_dir, prompt_files))
    (tmp_path / "file").write_text("x")
    result = cli_inproc("ablate", config, "-o", tmp_path / "file")
    assert result.returncode == 2 and "-o/--output" in result.stderr and "not a folder" in result.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("x")
    result = cli_inproc("ablate", config, "-o", tmp_path / "run")
    assert result.returncode == 2 and "other than an ablation study" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_holm_adjusts_step_down():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([]) == []
