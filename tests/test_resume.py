"""Kill -9 and resume: a resumed run ends with exactly the trajectory of an uninterrupted one.

The uninterrupted reference (A) runs in-process through the CLI entry point; the interrupted run
(B) runs in a child process that is SIGKILLed mid-run, then ``calibri resume`` finishes it. The
children are forked from this process (same code path as the ``calibri`` command, without paying
an interpreter start and the optimiser libraries' imports each time); one test uses real
``calibri`` subprocesses end to end.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import time
import zlib
from pathlib import Path

import pytest
import yaml

from calibri.core.store import read_checkpoint
from conftest import cli_command, cli_env

BACKENDS = ["nevergrad.cma", "nevergrad.de", "nevergrad.pso", "nevergrad.oneplusone", "nevergrad.tbpsa", "optuna.tpe",
            "optuna.cmaes", "optuna.random", "optuna.qmc", "pycma", "random"]
#: Backends killed several times in a row (the others once).
MULTI_KILL = {"nevergrad.cma": 3, "optuna.tpe": 3, "pycma": 2}

SPACE = {
    "x": {"type": "float", "low": -3.0, "high": 3.0, "init": 2.0, "sigma": 0.8},
    "y": {"type": "float", "low": -3.0, "high": 3.0, "init": -1.0},
    "z": {"type": "float", "low": -3.0, "high": 3.0, "init": 1.5},
    "n": {"type": "int", "low": 0, "high": 6, "init": 3},
}


def write_config(path: Path, optimizer: str, *, rounds: int = 10, popsize: int = 4, seed: int = 7,
                 function: str = "helpers_objectives:slow_sphere", with_context: bool = False,
                 **extra) -> Path:
    config = {
        "seed": seed,
        "objective": {"name": "python", "options": {"function": function, "with_context": with_context}},
        "space": SPACE,
        "optimizer": {"name": optimizer, "popsize": popsize},
        "budget": {"rounds": rounds},
        "callbacks": [],
        **extra,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def trajectory(run_dir: Path) -> list[tuple]:
    """Everything of trials.jsonl except wall times."""
    out = []
    for line in (Path(run_dir) / "trials.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append((record["round"], record["candidate"], json.dumps(record["params"], sort_keys=True),
                    record["value"], record["status"], record["seed"], record.get("error"),
                    json.dumps(record["metrics"], sort_keys=True)))
    return out


def best_of(run_dir: Path) -> dict:
    best = json.loads((Path(run_dir) / "best.json").read_text())
    return {key: best[key] for key in ("direction", "best", "recommendation", "rounds", "evaluations",
                                       "failures", "finished")}


def assert_same_run(a: Path, b: Path) -> None:
    ta, tb = trajectory(a), trajectory(b)
    assert len(tb) == len(ta)
    for index, (ra, rb) in enumerate(zip(ta, tb)):
        assert rb == ra, f"trial {index} differs"
    assert best_of(b) == best_of(a)
    assert best_of(b)["finished"] is True


def line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def checkpoint_files(run_dir: Path) -> list[Path]:
    """Checkpoint files, oldest first (by the round number in their name)."""
    files = (Path(run_dir) / "checkpoint").glob("state-*.pkl")
    return sorted(files, key=lambda p: int(re.sub(r"\D", "", p.name) or -1))


def load_pickle(path: Path) -> dict:
    """A checkpoint's state (signed by the suite's key)."""
    return read_checkpoint(path)


def newest_checkpoint(run_dir: Path) -> dict | None:
    files = checkpoint_files(run_dir)
    return load_pickle(files[-1]) if files else None


from helpers_objectives import HOLD_FILE  # noqa: E402  (tests/ is on sys.path under pytest)

# -- children: the calibri command in a forked process, killed with SIGKILL --------------------
_FORK = multiprocessing.get_context("fork")


def _child_main(args: list[str], cwd: str) -> None:
    os.chdir(cwd)
    os.environ["CALIBRI_PLUGINS"] = ""
    from calibri.core import plugins
    from calibri.core.cli import main

    plugins.reset_registry()
    main(args)


def start_child(cwd: Path, *args: str):
    proc = _FORK.Process(target=_child_main, args=([str(a) for a in args], str(cwd)), daemon=True)
    proc.start()
    return proc


def wait_for_lines(path: Path, count: int, alive, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while line_count(path) < count:
        if not alive():
            raise AssertionError(f"the run ended before {path.name} had {count} lines")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} did not reach {count} lines in {timeout} s")
        time.sleep(0.0005)


def kill_child(proc, trials: Path, threshold: int, delay: float) -> None:
    """SIGKILL the child once ``trials`` has ``threshold`` lines, ``delay`` seconds later."""
    wait_for_lines(trials, threshold, proc.is_alive)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL, "the run finished before it could be killed"


# -- every backend: kill -9 mid-run, resume, same trajectory ---------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_and_resume_matches_uninterrupted_run(backend, tmp_path, cli_inproc):
    rounds, popsize = 10, 4
    total = rounds * popsize
    cfg = write_config(tmp_path / "cfg.yaml", backend, rounds=rounds, popsize=popsize)
    result = cli_inproc("run", cfg, "-o", "A", "--quiet")
    assert result.returncode == 0, result.stderr
    assert line_count(tmp_path / "A" / "trials.jsonl") == total

    rng = random.Random(zlib.crc32(backend.encode()))
    kills = MULTI_KILL.get(backend, 1)
    run_b = tmp_path / "B"
    trials = run_b / "trials.jsonl"
    # Thresholds spread over the run; a random extra delay lands kills anywhere in a round
    # (evaluating, appending trials, writing the checkpoint or best.json).
    span = (total - 8) // kills
    for k in range(kills):
        args = ("run", cfg, "-o", "B", "--quiet") if k == 0 else ("resume", "B")
        proc = start_child(tmp_path, *args)
        threshold = 2 + k * span + rng.randrange(max(span - 2, 1))
        kill_child(proc, trials, threshold, rng.uniform(0, 0.012))
        state = newest_checkpoint(run_b)
        assert state is None or not state["finished"]

    result = cli_inproc("resume", "B")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert_same_run(tmp_path / "A", run_b)


def test_kill_and_resume_with_calibri_subprocesses(tmp_path, cli):
    """End to end with the real command: run, kill -9 twice (run, then resume), resume to the end."""
    cfg = write_config(tmp_path / "cfg.yaml", "optuna.tpe", rounds=12, popsize=4)
    result = cli("run", cfg, "-o", "A", "--quiet")
    assert result.returncode == 0, result.stderr
    trials = tmp_path / "B" / "trials.jsonl"
    for args, threshold in ((("run", cfg, "-o", "B", "--quiet"), 9), (("resume", "B"), 27)):
        proc = subprocess.Popen(cli_command(*args), cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_for_lines(trials, threshold, lambda: proc.poll() is None)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
    result = cli("resume", "B")
    assert result.returncode == 0, result.stderr
    assert "run directory: B" in result.stdout
    assert_same_run(tmp_path / "A", tmp_path / "B")


def test_kill_before_first_checkpoint_starts_over(tmp_path, cli_inproc):
    """Killed while evaluating round 0 (no checkpoint yet): resume starts the run over."""
    cfg = write_config(tmp_path / "cfg.yaml", "optuna.tpe", rounds=4, popsize=3,
                       function="helpers_objectives:slow_first_round", with_context=True)
    assert cli_inproc("run", cfg, "-o", "A", "--quiet").returncode == 0
    run_b = tmp_path / "B"
    (tmp_path / HOLD_FILE).touch()  # round 0 of run B waits until it is killed
    proc = start_child(tmp_path, "run", cfg, "-o", "B", "--quiet")
    deadline = time.monotonic() + 60
    while not (run_b / "optimizer" / "optuna.journal").exists():  # the study exists: round 0 started
        assert proc.is_alive() and time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    (tmp_path / HOLD_FILE).unlink()
    assert proc.exitcode == -signal.SIGKILL
    assert newest_checkpoint(run_b) is None
    assert (run_b / "config.yaml").exists()

    result = cli_inproc("resume", "B")
    assert result.returncode == 0, result.stderr
    assert_same_run(tmp_path / "A", run_b)


# -- corrupted run directories ---------------------------------------------------------------------
skipped_checkpoint_warning = pytest.mark.filterwarnings("ignore:.*skipping unreadable checkpoint:RuntimeWarning")
CORRUPTION_BACKENDS = ["nevergrad.cma", "optuna.tpe", "pycma"]


def _reference_and_partial(tmp_path: Path, cli_inproc, backend: str, done: int = 5, rounds: int = 8):
    """A: ``rounds`` rounds; B: the same config stopped after ``done`` rounds (finished)."""
    cfg = write_config(tmp_path / "cfg.yaml", backend, rounds=rounds, popsize=4,
                       function="helpers_objectives:sphere")
    assert cli_inproc("run", cfg, "-o", "A", "--quiet").returncode == 0
    assert cli_inproc("run", cfg, "-o", "B", "--quiet", f"budget.rounds={done}").returncode == 0
    assert line_count(tmp_path / "B" / "trials.jsonl") == done * 4
    return tmp_path / "A", tmp_path / "B"


@pytest.mark.parametrize("backend", CORRUPTION_BACKENDS)
def test_half_written_extra_line_is_dropped(backend, tmp_path, cli_inproc):
    """Killed while appending the next round: complete and half-written lines beyond the checkpoint."""
    run_a, run_b = _reference_and_partial(tmp_path, cli_inproc, backend)
    lines_a = (run_a / "trials.jsonl").read_text().splitlines(keepends=True)
    with open(run_b / "trials.jsonl", "a") as handle:
        handle.write(lines_a[20] + lines_a[21] + lines_a[22][: len(lines_a[22]) // 2])
    result = cli_inproc("resume", "B", "--rounds", "8")
    assert result.returncode == 0, result.stderr
    assert_same_run(run_a, run_b)


@pytest.mark.parametrize("backend", CORRUPTION_BACKENDS)
def test_truncated_last_line_is_dropped(backend, tmp_path, cli_inproc):
    """Killed while appending round 4's trials: round 4's checkpoint never written, last line cut."""
    run_a, run_b = _reference_and_partial(tmp_path, cli_inproc, backend)
    newest = checkpoint_files(run_b)[-1]
    assert load_pickle(newest)["round"] == 5
    newest.unlink()
    data = (run_b / "trials.jsonl").read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    (run_b / "trials.jsonl").write_bytes(data[: last_start + (len(data) - last_start) // 2])
    result = cli_inproc("resume", "B", "--rounds", "8")
    assert result.returncode == 0, result.stderr
    assert_same_run(run_a, run_b)


@pytest.mark.parametrize("backend", CORRUPTION_BACKENDS)
def test_corrupt_newest_checkpoint_falls_back_to_previous(backend, tmp_path, cli_inproc):
    run_a, run_b = _reference_and_partial(tmp_path, cli_inproc, backend)
    newest = checkpoint_files(run_b)[-1]
    assert load_pickle(newest)["round"] == 5
    newest.write_bytes(os.urandom(200))
    with pytest.warns(RuntimeWarning, match="skipping unreadable checkpoint"):
        result = cli_inproc("resume", "B", "--rounds", "8")
    assert result.returncode == 0, result.stderr
    assert_same_run(run_a, run_b)


@skipped_checkpoint_warning
def test_half_written_checkpoint_falls_back_to_previous(tmp_path, cli_inproc):
    run_a, run_b = _reference_and_partial(tmp_path, cli_inproc, "optuna.cmaes")
    newest = checkpoint_files(run_b)[-1]
    assert load_pickle(newest)["round"] == 5
    newest.write_bytes(newest.read_bytes()[:-40])
    result = cli_inproc("resume", "B", "--rounds", "8")
    assert result.returncode == 0, result.stderr
    assert_same_run(run_a, run_b)


@skipped_checkpoint_warning
@pytest.mark.parametrize("backend", ["nevergrad.de", "optuna.tpe"])
def test_all_checkpoints_unreadable_starts_over(backend, tmp_path, cli_inproc):
    """No loadable checkpoint: resume refuses (they might be another user's); trusted, it finds them
    all unreadable and starts over (stale trials and optuna journal discarded)."""
    run_a, run_b = _reference_and_partial(tmp_path, cli_inproc, backend)
    assert checkpoint_files(run_b)
    for path in checkpoint_files(run_b):
        path.write_bytes(b"\x80\x05garbage")
    with open(run_b / "trials.jsonl", "a") as handle:
        handle.write('{"round": 5, "cand')
    refused = cli_inproc("resume", "B", "--rounds", "8")
    assert refused.returncode == 2 and "--trust-checkpoint" in refused.stderr, refused.stderr
    result = cli_inproc("resume", "B", "--rounds", "8", "--trust-checkpoint")
    assert result.returncode == 0, result.stderr
    assert_same_run(run_a, run_b)


def test_killed_after_appending_first_round_without_checkpoint(tmp_path, cli_inproc):
    """Trials and an optuna journal on disk but no checkpoint (killed before the first one)."""
    run_a, run_b = _reference_and_partial(tmp_path, cli_inproc, "optuna.tpe")
    shutil.rmtree(run_b / "checkpoint")
    (run_b / "best.json").unlink()
    lines = (run_b / "trials.jsonl").read_text().splitlines(keepends=True)
    (run_b / "trials.jsonl").write_text("".join(lines[:4]) + lines[4][:17])
    assert (run_b / "optimizer" / "optuna.journal").stat().st_size > 0
    result = cli_inproc("resume", "B", "--rounds", "8")
    assert result.returncode == 0, result.stderr
    assert_same_run(run_a, run_b)


def test_resume_restores_best_json_missed_by_a_kill(tmp_path, cli_inproc):
    """Killed between the last checkpoint and best.json: resume must still leave a final best.json."""
    run_a, run_b = _reference_and_partial(tmp_path, cli_inproc, "random", done=8)
    stale = json.loads((run_b / "best.json").read_text())
    stale.update(finished=False, rounds=7, evaluations=28)
    (run_b / "best.json").write_text(json.dumps(stale))
    result = cli_inproc("resume", "B")
    assert result.returncode == 0, result.stderr
    assert best_of(run_b) == best_of(run_a)


# -- refusing to overwrite, --overwrite, resume --rounds ---------------------------------------------
def _snapshot(run_dir: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_run_refuses_to_overwrite_a_finished_run(tmp_path, cli):
    cfg = write_config(tmp_path / "cfg.yaml", "random", rounds=3, function="helpers_objectives:sphere")
    assert cli("run", cfg, "-o", "A", "--quiet").returncode == 0
    before = _snapshot(tmp_path / "A")
    result = cli("run", cfg, "-o", "A", "--quiet", "seed=99")
    assert result.returncode == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "--overwrite" in message and "finished" in message and "Traceback" not in message
    assert _snapshot(tmp_path / "A") == before


def test_run_refuses_to_overwrite_an_unfinished_run(tmp_path, cli_inproc):
    cfg = write_config(tmp_path / "cfg.yaml", "random", rounds=3, function="helpers_objectives:sphere")
    assert cli_inproc("run", cfg, "-o", "A", "--quiet").returncode == 0
    checkpoint_files(tmp_path / "A")[-1].unlink()  # as if killed in round 2
    assert newest_checkpoint(tmp_path / "A")["finished"] is False
    before = _snapshot(tmp_path / "A")
    result = cli_inproc("run", cfg, "-o", "A", "--quiet")
    assert result.returncode == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "--overwrite" in message and "unfinished" in message and "calibri resume" in message
    assert _snapshot(tmp_path / "A") == before


@pytest.mark.parametrize("backend", ["optuna.tpe", "nevergrad.cma"])
def test_overwrite_replaces_the_run(backend, tmp_path, cli_inproc):
    """``--overwrite`` with another seed and budget gives exactly a fresh run (no stale state kept)."""
    cfg = write_config(tmp_path / "cfg.yaml", backend, rounds=6, function="helpers_objectives:sphere")
    assert cli_inproc("run", cfg, "-o", "A", "--quiet").returncode == 0
    assert cli_inproc("run", cfg, "-o", "fresh", "--quiet", "seed=11", "budget.rounds=3").returncode == 0
    result = cli_inproc("run", cfg, "-o", "A", "--quiet", "--overwrite", "seed=11", "budget.rounds=3")
    assert result.returncode == 0, result.stderr
    assert_same_run(tmp_path / "fresh", tmp_path / "A")
    assert [load_pickle(p)["round"] for p in checkpoint_files(tmp_path / "A")] == [2, 3]
    assert yaml.safe_load((tmp_path / "A" / "config.yaml").read_text())["seed"] == 11


@pytest.mark.parametrize("backend", ["pycma", "optuna.tpe", "nevergrad.de", "random"])
def test_resume_rounds_extends_a_finished_run(backend, tmp_path, cli_inproc):
    cfg = write_config(tmp_path / "cfg.yaml", backend, rounds=7, function="helpers_objectives:sphere")
    assert cli_inproc("run", cfg, "-o", "A", "--quiet").returncode == 0
    assert cli_inproc("run", cfg, "-o", "B", "--quiet", "budget.rounds=3").returncode == 0
    assert best_of(tmp_path / "B")["finished"] is True

    # Resuming a finished run without a new budget changes nothing.
    before = (tmp_path / "B" / "trials.jsonl").read_bytes()
    assert cli_inproc("resume", "B").returncode == 0
    assert (tmp_path / "B" / "trials.jsonl").read_bytes() == before

    for rounds in (5, 7):
        result = cli_inproc("resume", "B", "--rounds", str(rounds))
        assert result.returncode == 0, result.stderr
        assert yaml.safe_load((tmp_path / "B" / "config.yaml").read_text())["budget"]["rounds"] == rounds
        assert line_count(tmp_path / "B" / "trials.jsonl") == rounds * 4
    assert_same_run(tmp_path / "A", tmp_path / "B")
