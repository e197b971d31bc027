"""Faults of the ``process`` executor's workers, as a corpus of cases: a worker lost once (the
run keeps the uninterrupted trajectory), a candidate that kills every worker it meets (it
fails alone), losses during validation, the run's own process killed (its workers exit), bad
``executor.devices`` entries (one-line errors), dying while building, SystemExit and Ctrl-C
in a worker.

Workers die on cue through the ``test.faulty`` objective (tests/helpers_objectives.py); marker
files, not sleeps, say what happened, and every wait is a bounded poll.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from calibri.core.config import validate
from calibri.core.errors import RunInterrupted
from calibri.core.run import start_run

from conftest import cli_command, cli_env
from helpers_objectives import read_batches

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning",
                                        "ignore:calibri. a worker process died:RuntimeWarning")

PLUGINS = ["helpers_objectives"]
DIED = "worker process died while evaluating this candidate"


@pytest.fixture(autouse=True)
def _no_installed_plugins(no_installed_plugins):
    """Every test of this module runs with only the built-in and the test's plugins."""


def faulty(marker_dir: Path, **options) -> dict:
    return {"name": "test.faulty", "options": {"marker_dir": str(marker_dir), **options}}


def config(objective: dict, *, executor: dict | None = None, optimizer: str = "pycma", rounds: int = 3,
           popsize: int = 8, seed: int = 4, **extra) -> dict:
    return {"seed": seed, "objective": objective, "optimizer": {"name": optimizer, "popsize": popsize},
            "executor": executor or {"name": "serial"}, "budget": {"rounds": rounds}, "callbacks": [],
            "plugins": PLUGINS, "max_failure_rate": 1.0, **extra}


def run(run_dir: Path, cfg: dict) -> dict:
    return start_run(validate(cfg), run_dir, quiet=True)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def key(records: list[dict]) -> list[tuple]:
    """What must not depend on the executor or on lost workers (not pids, not wall times)."""
    return [(r.get("round", r.get("after_round")), r.get("candidate", r.get("source")),
             json.dumps(r["params"], sort_keys=True), r["value"], r["status"], r["seed"], r.get("error"))
            for r in records]


def sphere(params: dict) -> float:
    return float(sum(float(v) ** 2 for v in params.values()))


# -- a worker lost once: only its chunk is re-run, the trajectory is the uninterrupted one --------------
LOST_ONCE = [
    pytest.param("exit", 2, [0], 1, id="exit-round0-2workers"),
    pytest.param("kill", 2, [1], 1, id="sigkill-round1-2workers"),
    pytest.param("kill", 3, [0, 2], 1, id="sigkill-rounds0and2-3workers"),
    pytest.param("exit", 2, [1], 2, id="two-deaths-in-one-round-2workers"),
    pytest.param("kill", 1, [2], 2, id="one-worker-dies-twice-in-a-row"),
]


@pytest.mark.parametrize("how, workers, rounds_dying, deaths", LOST_ONCE)
def test_lost_worker_keeps_the_uninterrupted_trajectory(how, workers, rounds_dying, deaths, tmp_path):
    reference = run(tmp_path / "ref", config(faulty(tmp_path / "ref-markers")))
    markers = tmp_path / "markers"
    summary = run(tmp_path / "run", config(faulty(markers, how=how, die_once=rounds_dying, die_count=deaths),
                                           executor={"name": "process", "workers": workers}))
    records = lines(tmp_path / "run" / "trials.jsonl")
    assert key(records) == key(lines(tmp_path / "ref" / "trials.jsonl"))
    assert all(r["status"] == "ok" for r in records) and summary["failures"] == 0
    assert summary["best"] == reference["best"]
    assert len(list(markers.glob("died-*"))) == deaths * len(rounds_dying)  # the deaths did happen
    for round_index in range(3):
        # every candidate evaluated to completion exactly once: the healthy chunks were kept
        assert sum(read_batches(markers, round_index)) == 8, round_index
        if round_index not in rounds_dying:
            assert len(read_batches(markers, round_index)) == min(workers, 8)


# -- a candidate that kills every worker it meets fails alone ----------------------------------------------
POISONED = [
    pytest.param("exit", 2, 0, id="os-exit-2workers-no-retries"),
    pytest.param("kill", 2, 0, id="sigkill-2workers-no-retries"),
    pytest.param("exit", 1, 0, id="os-exit-1worker-no-retries"),
    pytest.param("exit", 2, 2, id="os-exit-2workers-default-retries"),
]


@pytest.mark.parametrize("how, workers, retries", POISONED)
def test_poisoned_candidate_fails_alone(how, workers, retries, tmp_path):
    markers = tmp_path / "markers"
    summary = run(tmp_path / "run", config(faulty(markers, how=how, die_above=1.2), optimizer="random", rounds=2,
                                           seed=3, executor={"name": "process", "workers": workers,
                                                             "options": {"retries": retries}}))
    records = lines(tmp_path / "run" / "trials.jsonl")
    assert len(records) == 16
    poisoned = [r for r in records if r["params"]["x[0]"] > 1.2]
    assert 1 <= len(poisoned) <= 4, "the seed should give a few poisoned candidates"
    for record in records:
        if record["params"]["x[0]"] > 1.2:
            assert record["status"] == "failed" and record["value"] is None
            assert record["error"].startswith(DIED), record["error"]
        else:
            assert record["status"] == "ok" and record["value"] == pytest.approx(sphere(record["params"]))
    assert summary["failures"] == len(poisoned)


def test_systemexit_in_a_worker_fails_its_candidate_like_in_process(tmp_path):
    """``sys.exit()`` in an objective is an error of that candidate, the same with either executor."""
    results = {}
    for name, executor in (("serial", {"name": "serial"}), ("process", {"name": "process", "workers": 2})):
        run(tmp_path / name, config(faulty(tmp_path / f"m-{name}", how="systemexit", die_above=1.2),
                                    optimizer="random", rounds=2, seed=3, executor=executor))
        results[name] = lines(tmp_path / name / "trials.jsonl")
    assert key(results["process"]) == key(results["serial"])
    failed = [r for r in results["process"] if r["status"] == "failed"]
    assert failed and all(r["error"].startswith("SystemExit: 3") for r in failed)
    assert all(r["params"]["x[0]"] > 1.2 for r in failed)


# -- validation goes through the executor: a loss there is re-run, a persistent one reported -----------------
@pytest.mark.parametrize("how", ["exit", "kill"])
def test_worker_lost_during_validation_is_re_run(how, tmp_path):
    validation = {"validation": {"every": 1}}
    reference = run(tmp_path / "ref", config(faulty(tmp_path / "ref-markers"), rounds=2, **validation))
    markers = tmp_path / "markers"
    summary = run(tmp_path / "run", config(faulty(markers, how=how, die_once=[-1], die_count=2), rounds=2,
                                           executor={"name": "process", "workers": 2}, **validation))
    assert len(list(markers.glob("died--1-*"))) == 2
    assert key(lines(tmp_path / "run" / "validation.jsonl")) == key(lines(tmp_path / "ref" / "validation.jsonl"))
    assert key(lines(tmp_path / "run" / "trials.jsonl")) == key(lines(tmp_path / "ref" / "trials.jsonl"))
    assert summary["validation"] == reference["validation"] and "failures" not in summary["validation"]


def test_validation_that_keeps_killing_its_worker_is_reported(tmp_path):
    """Not a silent rc 0: each failed validation is a warning line on stderr and is counted."""
    cfg = config(faulty(tmp_path / "markers", die_once=[-1], die_count=1000), rounds=2,
                 executor={"name": "process", "workers": 2, "options": {"retries": 0}}, validation={"every": 1})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(cli_command("run", "cfg.yaml", "-o", "R", "--quiet"), cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = lines(tmp_path / "R" / "validation.jsonl")
    assert records and all(r["status"] == "failed" and r["error"].startswith(DIED) for r in records)
    warned = [line for line in proc.stderr.splitlines() if line.startswith("calibri: validation of the")]
    assert len(warned) == len(records), proc.stderr
    assert "baseline after round 0 failed: worker process died" in warned[0]
    assert "Traceback" not in proc.stderr
    best = json.loads((tmp_path / "R" / "best.json").read_text())
    assert best["validation"]["failures"] == len(records)
    assert all(r["status"] == "ok" for r in lines(tmp_path / "R" / "trials.jsonl"))


# -- the run's own process killed: its workers exit -------------------------------------------------------
DRIVER = """
import multiprocessing
import sys
import threading
from calibri.core.executor import ObjectiveRecipe
from calibri.core.executors import ProcessExecutor
from calibri.core.objective import RoundContext

def drive(marker_dir, state):
    recipe = ObjectiveRecipe("test.faulty", {"marker_dir": marker_dir, "hold": True}, ("helpers_objectives",))
    executor = ProcessExecutor(recipe, workers=2)
    executor.describe()
    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    if state != "idle":
        executor.evaluate([{"x[0]": 0.5, "x[1]": 0.0}, {"x[0]": 0.25, "x[1]": 0.0}], RoundContext(round=0, seed=0))


if __name__ == "__main__":
    if sys.argv[2] == "busy-from-a-thread":  # the workers' parent is not the main thread
        threading.Thread(target=drive, args=sys.argv[1:3], daemon=True).start()
    else:
        drive(*sys.argv[1:3])
    sys.stdin.read()
"""


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a reaper counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def poll(condition, limit: float = 60.0) -> bool:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("state", ["idle", "busy", "busy-from-a-thread"])
def test_workers_exit_when_the_run_is_killed(state, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    (markers / "hold").touch()  # busy workers stay inside an evaluation until the file goes
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), str(markers), state], env=cli_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert pids, "the driver printed its workers' pids"
        if state != "idle":
            assert poll(lambda: all((markers / f"busy-{pid}").exists() for pid in pids)), "workers never got busy"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
        assert poll(lambda: all(gone(pid) for pid in pids)), [pid for pid in pids if not gone(pid)]
    finally:
        (markers / "hold").unlink(missing_ok=True)
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        busy = [int(p.name.split("-")[1]) for p in markers.glob("busy-*")]
        for pid in set(pids + busy):  # whatever the outcome, leave no worker behind
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


# -- bad executor.devices: one line, exit status 2, nothing started --------------------------------------
def cuda_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


BAD_DEVICES = [
    pytest.param("process", "cuda:7", id="process-cuda7"),
    pytest.param("serial", "cuda:7", id="serial-cuda7"),
    pytest.param("process", "cuda:x", id="cuda-no-index"),
    pytest.param("process", "cuda:-1", id="cuda-negative-index"),
    pytest.param("process", "gpu:0", id="gpu-is-not-a-device"),
    pytest.param("process", "cuda7", id="cuda-without-colon"),
    pytest.param("process", "", id="empty"),
    pytest.param("process", " cpu", id="whitespace"),
    pytest.param("process", "mps:3", id="mps-index"),
]


@pytest.mark.parametrize("executor, device", BAD_DEVICES)
def test_bad_device_is_a_one_line_error(executor, device, tmp_path, cli_inproc):
    if device == "cuda:7" and cuda_count() > 7:
        pytest.skip("this machine has a cuda:7")
    cfg = {"objective": {"name": "sphere", "options": {"dim": 2}}, "optimizer": "random", "budget": {"rounds": 1},
           "callbacks": [], "executor": {"name": executor, "devices": ["cpu", device]}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = cli_inproc("run", "cfg.yaml", "-o", "R", "--quiet")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert line.startswith("calibri: error: executor.devices: ") and repr(device) in line, line
    assert not (tmp_path / "R").exists()


@pytest.mark.skipif(cuda_count() > 0, reason="this machine has CUDA")
def test_cuda_device_without_cuda_says_so(tmp_path, cli_inproc):
    pytest.importorskip("torch")
    cfg = {"objective": {"name": "sphere", "options": {"dim": 2}}, "optimizer": "random", "budget": {"rounds": 1},
           "callbacks": [], "executor": {"name": "process", "devices": ["cuda:0"]}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = cli_inproc("run", "cfg.yaml", "-o", "R", "--quiet")
    assert result.returncode == 2
    assert result.stderr.startswith("calibri: error: executor.devices: 'cuda:0': CUDA is not available")


@pytest.mark.parametrize("options, field", [
    pytest.param({"retries": -1}, "executor.options.retries", id="negative-retries"),
    pytest.param({"retries": "often"}, "executor.options.retries", id="retries-not-a-number"),
    pytest.param({"threads": 0}, "executor.options.threads", id="zero-threads"),
    pytest.param({"threads": "many"}, "executor.options.threads", id="threads-not-auto"),
])
def test_bad_executor_option_is_a_one_line_error(options, field, tmp_path, cli_inproc):
    cfg = {"objective": {"name": "sphere", "options": {"dim": 2}}, "optimizer": "random", "budget": {"rounds": 1},
           "callbacks": [], "executor": {"name": "process", "options": options}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = cli_inproc("run", "cfg.yaml", "-o", "R", "--quiet")
    assert result.returncode == 2
    assert result.stderr.startswith(f"calibri: error: {field}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "R").exists()


# -- dying while building, Ctrl-C in a worker ---------------------------------------------------------
def test_worker_dying_once_while_building_is_replaced(tmp_path):
    markers = tmp_path / "markers"
    summary = run(tmp_path / "run", config(faulty(markers, die_in_build="once"), rounds=2,
                                           executor={"name": "process", "workers": 2}))
    assert (markers / "died-build").exists()
    assert summary["failures"] == 0 and summary["evaluations"] == 16


def test_worker_dying_whenever_it_builds_is_a_one_line_error(tmp_path, cli_inproc):
    cfg = config(faulty(tmp_path / "markers", die_in_build="always"),
                 executor={"name": "process", "workers": 2, "options": {"retries": 1}})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = cli_inproc("run", "cfg.yaml", "-o", "R", "--quiet")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("calibri: error: a worker process died while building objective "
                                     "'test.faulty' (exit status 3; 2 attempts)")
    assert not (tmp_path / "R").exists()


def test_keyboard_interrupt_in_a_worker_interrupts_the_run(tmp_path):
    cfg = config({"name": "python", "options": {"function": "helpers_objectives:interrupted_at_round_3",
                                                "with_context": True}},
                 optimizer="random", rounds=6, popsize=4, executor={"name": "process", "workers": 2},
                 space={"x": {"type": "float", "low": -1.0, "high": 1.0, "init": 0.0}})
    with pytest.raises(RunInterrupted):
        run(tmp_path / "run", cfg)
    assert {r["round"] for r in lines(tmp_path / "run" / "trials.jsonl")} == {0, 1, 2}
