"""Damaged, edited, foreign and contended run directories.

Before: two ``calibri resume`` at once left ~1,000 duplicate candidate ids in trials.jsonl; an
edited config.yaml was used silently on resume (or failed with ``KeyError: 'es'``); a crafted
checkpoint ran code on resume; a checkpoint without ``n_evals`` or a garbage best.json gave a
traceback. Each case now ends in one ``calibri: error:`` line naming the file or field, exit 2,
and leaves the run directory as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from calibri.core.store import CHECKPOINT_MAGIC, RunStore, read_checkpoint
from conftest import cli_command, cli_env

HERE = Path(__file__).resolve().parent
SPACE = {"x": {"type": "float", "low": -2.0, "high": 2.0, "init": 1.0},
         "y": {"type": "float", "low": -2.0, "high": 2.0, "init": -1.0}}


def write_config(path: Path, **changes) -> Path:
    config = {"seed": 3, "objective": {"name": "python", "options": {"function": "faulty_objectives:hold",
                                                                      "with_context": True}},
              "space": SPACE, "optimizer": {"name": "nevergrad.cma", "popsize": 4}, "budget": {"rounds": 2},
              "callbacks": []}
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def env() -> dict[str, str]:
    out = cli_env()
    out["PYTHONPATH"] = os.pathsep.join([str(HERE), out["PYTHONPATH"]])
    return out


def calibri(*args, cwd: Path, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_command(*args), cwd=cwd, env=env(), capture_output=True, text=True, timeout=300,
                          **kwargs)


def error_line(proc) -> str:
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == 2, output
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("calibri: error: "), proc.stderr
    return lines[0]


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file's digest, the lock file left out (it names the last holder's pid)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished two-round run, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("finished")
    proc = calibri("run", write_config(root / "cfg.yaml"), "-o", "R", "--quiet", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "R"


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    import shutil

    target = tmp_path / "R"
    shutil.copytree(finished_run, target)
    return target


# -- edited config.yaml --------------------------------------------------------------------------
EDITS = [
    pytest.param("seed", 4, "seed changed from 3 to 4", id="seed"),
    pytest.param("space.x.high", 3.0, "space.x.high changed from 2.0 to 3.0", id="space-bound"),
    pytest.param("space.z", {"type": "float", "low": 0.0, "high": 1.0}, "space.z changed from None", id="dimension-added"),
    pytest.param("objective.options.function", "faulty_objectives:small_array_metric",
                 "objective.options.function changed", id="objective-function"),
    pytest.param("objective.name", "sphere", "objective.name changed from 'python' to 'sphere'", id="objective-name"),
    pytest.param("optimizer.name", "pycma", "optimizer.name changed from 'nevergrad.cma' to 'pycma'", id="optimizer"),
    pytest.param("optimizer.popsize", 6, "optimizer.popsize changed from 4 to 6", id="popsize"),
]


@pytest.mark.parametrize("field, value, message", EDITS)
def test_resume_refuses_an_edited_run_defining_config(field, value, message, run_copy):
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    node = config
    *parents, last = field.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = snapshot(run_copy)
    line = error_line(calibri("resume", "R", "--rounds", "3", "--quiet", cwd=run_copy.parent))
    assert f"R/config.yaml: {message}" in line and "start a new run" in line
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("field, value", [("budget.rounds", 3), ("executor", {"name": "serial", "workers": 1}),
                                          ("validation", {"every": 5}), ("max_failure_rate", 0.5)])
def test_resume_accepts_budget_and_reporting_changes(field, value, run_copy):
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    *parents, last = field.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[last] = value
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = calibri("resume", "R", "--rounds", "3", "--quiet", cwd=run_copy.parent)
    assert proc.returncode == 0, proc.stderr
    assert len((run_copy / "trials.jsonl").read_text().splitlines()) == 12


# -- trials.jsonl that is not what the checkpoint saw ------------------------------------------------
def _duplicate_a_line(lines: list[str]) -> list[str]:
    return lines[:3] + [lines[2]] + lines[3:-1]  # same count, candidate 2 twice, 7 gone


def _edit_a_value(lines: list[str]) -> list[str]:
    record = json.loads(lines[1])
    record["value"] = -1.0
    return [lines[0], json.dumps(record) + "\n", *lines[2:]]


def _swap_two_lines(lines: list[str]) -> list[str]:
    return [lines[1], lines[0], *lines[2:]]


@pytest.mark.parametrize("damage", [_duplicate_a_line, _edit_a_value, _swap_two_lines],
                         ids=["duplicate-line", "edited-value", "swapped-lines"])
def test_resume_refuses_trials_that_differ_from_the_checkpoint(damage, run_copy):
    trials = run_copy / "trials.jsonl"
    trials.write_text("".join(damage(trials.read_text().splitlines(keepends=True))))
    before = snapshot(run_copy)
    line = error_line(calibri("resume", "R", "--rounds", "3", "--quiet", cwd=run_copy.parent))
    assert "R/trials.jsonl: differs from what the checkpoint recorded" in line
    assert snapshot(run_copy) == before


# -- checkpoints from elsewhere -----------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted_pickle(run_dir: Path) -> None:
    newest = RunStore(run_dir).checkpoint_files()[-1]
    newest.write_bytes(pickle.dumps({"format": 1, "payload": _RunsCode(str(run_dir.parent / "pwned"))}))
    for older in RunStore(run_dir).checkpoint_files()[:-1]:
        older.unlink()


def _crafted_with_our_header(run_dir: Path) -> None:
    newest = RunStore(run_dir).checkpoint_files()[-1]
    payload = pickle.dumps(_RunsCode(str(run_dir.parent / "pwned")))
    newest.write_bytes(CHECKPOINT_MAGIC + b"\0" * 32 + payload)
    for older in RunStore(run_dir).checkpoint_files()[:-1]:
        older.unlink()


def _signed_by_another_key(run_dir: Path) -> None:
    other_key = run_dir.parent / "other.key"
    other_key.write_bytes(os.urandom(32))
    store = RunStore(run_dir)
    states = [read_checkpoint(path) for path in store.checkpoint_files()]
    code = ("import sys, pickle; from calibri.core.store import RunStore; "
            "RunStore(sys.argv[1]).save_checkpoint(pickle.loads(sys.stdin.buffer.read()))")
    for state in states:
        subprocess.run([sys.executable, "-c", code, str(run_dir)], input=pickle.dumps(state), check=True,
                       env=dict(env(), CALIBRI_KEY_FILE=str(other_key)))


@pytest.mark.parametrize("forge", [_crafted_pickle, _crafted_with_our_header, _signed_by_another_key],
                         ids=["unsigned-pickle-running-os.system", "forged-header", "another-users-key"])
def test_resume_refuses_checkpoints_this_user_did_not_sign(forge, run_copy):
    forge(run_copy)
    before = snapshot(run_copy)
    line = error_line(calibri("resume", "R", "--rounds", "3", "--quiet", cwd=run_copy.parent))
    assert "checkpoint" in line and "--trust-checkpoint" in line
    assert not (run_copy.parent / "pwned").exists()
    assert snapshot(run_copy) == before


def test_trusted_foreign_checkpoint_resumes(run_copy):
    """A colleague's run directory: with --trust-checkpoint it continues, and is signed from then on."""
    _signed_by_another_key(run_copy)
    proc = calibri("resume", "R", "--rounds", "3", "--quiet", "--trust-checkpoint", cwd=run_copy.parent)
    assert proc.returncode == 0, proc.stderr
    assert read_checkpoint(RunStore(run_copy).checkpoint_files()[-1])["round"] == 3


@pytest.mark.parametrize("drop", ["n_evals", "optimizer", "rng"])
def test_checkpoint_missing_a_key_is_named(drop, run_copy):
    store = RunStore(run_copy)
    newest = store.checkpoint_files()[-1]
    state = read_checkpoint(newest)
    del state[drop]
    store.save_checkpoint(state)
    line = error_line(calibri("resume", "R", "--rounds", "3", "--quiet", cwd=run_copy.parent))
    assert newest.name in line and f"no {drop!r}" in line


# -- best.json -------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["{not json", "", "[1, 2]", "\xff\xfe", '{"best": null}'],
                         ids=["truncated", "empty", "a-list", "not-utf8", "no-direction"])
def test_show_names_a_damaged_best_json(content, run_copy):
    (run_copy / "best.json").write_bytes(content.encode("latin-1"))
    line = error_line(calibri("show", "R", cwd=run_copy.parent))
    assert "R/best.json:" in line


def test_resume_rewrites_a_damaged_best_json(run_copy):
    good = json.loads((run_copy / "best.json").read_text())
    (run_copy / "best.json").write_text("{not json")
    proc = calibri("resume", "R", "--quiet", cwd=run_copy.parent)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_copy / "best.json").read_text())["best"] == good["best"]


# -- one writer at a time ---------------------------------------------------------------------------
def _wait_for_holder(lock: Path, pid: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if lock.exists() and lock.read_text().strip() == str(pid):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the first process never took the lock")


@pytest.mark.parametrize("second", [("resume", "R", "--rounds", "4", "--quiet"),
                                    ("run", "cfg.yaml", "-o", "R", "--overwrite", "--quiet")],
                         ids=["resume-during-resume", "overwrite-during-resume"])
def test_a_second_writer_is_refused_with_the_holders_pid(second, run_copy):
    root = run_copy.parent
    write_config(root / "cfg.yaml")
    (root / "hold").write_text("")  # the first process waits in its next round while this exists
    first = subprocess.Popen(cli_command("resume", "R", "--rounds", "4", "--quiet"), cwd=root, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(run_copy / ".lock", first.pid, first)
        line = error_line(calibri(*second, cwd=root))
        assert f"R: in use by another calibri process (pid {first.pid})" in line
    finally:
        (root / "hold").unlink()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    candidates = [json.loads(line)["candidate"] for line in (run_copy / "trials.jsonl").read_text().splitlines()]
    assert candidates == list(range(16))


def test_the_lock_of_a_killed_writer_is_not_stale(run_copy):
    """kill -9 of the holder: the kernel drops its lock; the next resume just works."""
    root = run_copy.parent
    (root / "hold").write_text("")
    first = subprocess.Popen(cli_command("resume", "R", "--rounds", "4", "--quiet"), cwd=root, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_holder(run_copy / ".lock", first.pid, first)
    first.kill()
    first.communicate(timeout=60)
    (root / "hold").unlink()
    proc = calibri("resume", "R", "--rounds", "4", "--quiet", cwd=root)
    assert proc.returncode == 0, proc.stderr
