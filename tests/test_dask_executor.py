"""The ``dask`` executor on loopback clusters: the ``serial`` trajectory for any number of workers
and any chunking, the objective built once per worker, and its faults (a worker killed mid-round,
a raising candidate, a candidate that kills its worker, a hanging chunk, every worker lost, the
run's process killed, a scheduler that cannot be reached)."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

distributed = pytest.importorskip("distributed")

from calibri.core.config import validate  # noqa: E402
from calibri.core.errors import ConfigError  # noqa: E402
from calibri.core.executor import ObjectiveRecipe  # noqa: E402
from calibri.core.executors import SerialExecutor, threads_per_worker  # noqa: E402
from calibri.core.objective import RoundContext  # noqa: E402
from calibri.core.run import resume_run, start_run  # noqa: E402
from calibri.plugins.dask.executor import INFO_FILE, ClusterLost, DaskExecutor  # noqa: E402

from conftest import cli_command, cli_env  # noqa: E402
from dask_objectives import HOLD_ROUND_1, read_builds, read_closes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ["calibri.plugins.dask", "dask_objectives"]
#: Generous bound for anything a test waits on (never reached unless something is broken).
LIMIT = 180


@pytest.fixture(autouse=True)
def _no_installed_plugins(no_installed_plugins):
    """Every test of this module runs with only the built-in and the test's plugins."""


def poll(condition, what: str, limit: float = LIMIT):
    deadline = time.monotonic() + limit
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def probe(markers: Path, **options) -> dict:
    return {"name": "test.dask", "options": {"marker_dir": str(markers), **options}}


def run(run_dir: Path, *, objective: dict, executor: dict, rounds: int = 3, popsize: int = 6, seed: int = 7,
        **extra) -> list[dict]:
    config = validate({"seed": seed, "objective": objective, "optimizer": {"name": "pycma", "popsize": popsize},
                       "executor": executor, "budget": {"rounds": rounds}, "callbacks": [], "plugins": PLUGINS,
                       **extra})
    start_run(config, run_dir, quiet=True)
    return trials(run_dir)


def trials(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]


def key(records: list[dict]) -> list[tuple]:
    """What must not depend on the executor (wall times and worker identities may)."""
    return [(r["round"], r["candidate"], json.dumps(r["params"], sort_keys=True), r["value"], r["status"],
             r["seed"], r.get("error"), json.dumps(r["metrics"], sort_keys=True)) for r in records]


def result_key(results) -> list[tuple]:
    return [(r.value, r.status, r.error, json.dumps(r.metrics, sort_keys=True)) for r in results]


# -- a cluster the tests treat as remote: started here, never stopped by a run --------------------
@pytest.fixture(scope="module")
def cluster():
    import dask

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CALIBRI_PLUGINS", "")
        # no thread variables poured into this process's environment by the nannies
        with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
            local = distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                                             dashboard_address="127.0.0.1:0", memory_limit=0,
                                             silence_logs=logging.ERROR)
    client = distributed.Client(local, set_as_default=False)
    yield local, client
    client.close()
    local.close()


def two_workers(cluster) -> str:
    local, client = cluster
    client.wait_for_workers(2, timeout=LIMIT)
    return local.scheduler_address


def remote(cluster, **options) -> dict:
    return {"name": "dask", "options": {"scheduler": two_workers(cluster), **options}}


# -- the serial trajectory ---------------------------------------------------------------------------
def test_any_chunking_gives_the_serial_results_with_one_build_per_worker(tmp_path):
    markers, run_dir = tmp_path / "markers", tmp_path / "run"
    run_dir.mkdir()
    recipe = ObjectiveRecipe("test.dask", {"marker_dir": str(markers), "dim": 3, "raise_above": 1.0},
                             ("dask_objectives",))
    serial = SerialExecutor(recipe)
    rng = __import__("numpy").random.default_rng(1)
    rounds = [[{f"x[{i}]": float(v) for i, v in enumerate(rng.uniform(-2, 2, 3))} for _ in range(9)]
              for _ in range(3)]
    devices = ["dev-a", "dev-b"]  # one worker per device, each objective built with its own
    with DaskExecutor(recipe, devices=devices, dashboard="127.0.0.1:0", run_dir=run_dir) as executor:
        assert executor.describe() == serial.describe()
        for size in (1, 2, 4, None, 100):
            executor.chunk_size = size
            for index, candidates in enumerate(rounds):
                ctx = RoundContext(round=index, seed=100 + index, data={"bucket": [index]})
                got = executor.evaluate(candidates, ctx)
                assert result_key(got) == result_key(serial.evaluate(candidates, ctx)), size
                assert any(r.status == "failed" and "above 1.0" in r.error for r in got)  # a raising candidate
                assert sum(r.ok for r in got) >= 3
        info = json.loads((run_dir / INFO_FILE).read_text())
        assert info["scheduler"].startswith("tcp://127.0.0.1:") and info["local"] is True
        assert len(info["workers"]) == 2
        threads = {r.artifacts["threads"] for r in got if r.ok}
    serial.close()
    builds = [b for b in read_builds(markers) if b["pid"] != os.getpid()]
    assert 1 <= len(builds) <= 2 and len({b["pid"] for b in builds}) == len(builds)  # once per worker
    assert {b["device"] for b in builds} <= set(devices) and len({b["device"] for b in builds}) == len(builds)
    assert threads == {os.environ.get("OMP_NUM_THREADS") or str(threads_per_worker(2))}
    poll(lambda: len(read_closes(markers)) == len(builds) + 1, "every worker's objective closed", 60)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_on_a_local_cluster_equals_serial(tmp_path, workers, capfd):
    objective = {"name": "python", "options": {"function": "dask_objectives:noisy_raising", "with_context": True}}
    space = {"space": {"x": {"type": "float", "low": -2.0, "high": 2.0, "init": 1.0},
                       "y": {"type": "float", "low": -2.0, "high": 2.0, "init": 0.5}}, "max_failure_rate": 0.9}
    expected = key(run(tmp_path / "serial", objective=objective, executor={"name": "serial"}, **space))
    environ = dict(os.environ)
    got = key(run(tmp_path / "dask", objective=objective, executor={"name": "dask", "workers": workers,
                                                                     "options": {"dashboard": "127.0.0.1:0"}},
                  **space))
    assert got == expected and len(got) == 18
    assert any(r[4] == "failed" for r in got)  # the raising candidates failed alone, as in serial
    err = capfd.readouterr().err
    assert f"starting a Dask cluster of {workers} worker" in err and "dashboard http://127.0.0.1:" in err
    assert dict(os.environ) == environ  # the nannies' thread variables did not stay in this process


def test_toy_calibration_equals_serial_on_a_remote_cluster(tmp_path, cluster):
    """`examples/toy.yaml` (the shipped toy DiT, its prompts and oracle) on a budget of seconds:
    one round of four candidates, each on two prompts; no held-out validation (its values go
    through the same executor call, see the first test)."""
    data = yaml.safe_load((ROOT / "examples" / "toy.yaml").read_text())
    data["objective"]["options"]["bucket_size"] = 2
    data.update(budget={"rounds": 1}, validation={}, callbacks=[], plugins=["calibri.plugins.dask"])
    data["optimizer"]["popsize"] = 4
    start_run(validate(data), tmp_path / "serial", quiet=True)
    data["executor"] = remote(cluster, chunk_size=1)
    start_run(validate(data), tmp_path / "dask", quiet=True)
    expected = key(trials(tmp_path / "serial"))
    assert key(trials(tmp_path / "dask")) == expected and len(expected) == 4
    assert len({r[3] for r in expected}) == 4  # four different rewards, not a constant
    assert len(cluster[1].scheduler_info(n_workers=-1)["workers"]) == 2  # a remote cluster is left running


# -- faults -------------------------------------------------------------------------------------
def _in_thread(function, *args, **kwargs):
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_a_worker_killed_mid_round_costs_nothing(tmp_path, cluster):
    markers = tmp_path / "markers"
    expected = key(run(tmp_path / "serial", objective=probe(tmp_path / "serial-markers"),
                       executor={"name": "serial"}))
    markers.mkdir()
    (markers / "hold").write_text("")
    thread, outcome = _in_thread(run, tmp_path / "dask", objective=probe(markers, hold_round=1),
                                 executor=remote(cluster, chunk_size=2))
    busy = poll(lambda: sorted(markers.glob("busy-*")), "a chunk of round 1 to start")
    victim = int(busy[0].name.split("-")[1])
    os.kill(victim, signal.SIGKILL)
    poll(lambda: not alive(victim), "the worker to die", 60)
    (markers / "hold").unlink()
    thread.join(LIMIT)
    assert "error" not in outcome, outcome.get("error")
    records = trials(tmp_path / "dask")
    assert key(records) == expected
    assert all(r["status"] == "ok" for r in records)
    assert victim not in {r["artifacts"]["pid"] for r in records if r["round"] >= 1}


def test_a_candidate_that_kills_its_worker_fails_alone(tmp_path):
    markers = tmp_path / "markers"
    recipe = ObjectiveRecipe("test.dask", {"marker_dir": str(markers), "die_above": 1.5}, ("dask_objectives",))
    candidates = [{"x[0]": 0.1 * i, "x[1]": 0.2} for i in range(5)] + [{"x[0]": 1.9, "x[1]": 0.2}]
    ctx = RoundContext(round=0, seed=3)
    reference = SerialExecutor(ObjectiveRecipe("test.dask", {"marker_dir": str(markers)}, ("dask_objectives",)))
    expected = result_key(reference.evaluate(candidates, ctx))
    reference.close()
    with DaskExecutor(recipe, workers=2, dashboard=None, retries=0, chunk_size=3) as executor:
        with pytest.warns(RuntimeWarning, match="kept dying"):
            got = executor.evaluate(candidates, ctx)
        assert result_key(got[:5]) == expected[:5]
        assert got[5].status == "failed" and "worker died" in got[5].error
        again = executor.evaluate(candidates[:5], ctx)  # replacement workers serve the next round
        assert result_key(again) == expected[:5]


def test_a_hanging_chunk_fails_after_task_timeout(tmp_path, cluster):
    markers = tmp_path / "markers"
    markers.mkdir()
    (markers / "hang").write_text("")
    try:
        with pytest.warns(RuntimeWarning, match="task_timeout"):
            records = run(tmp_path / "dask", objective=probe(markers, hang_round=1), max_failure_rate=0.5,
                          executor=remote(cluster, chunk_size=2, task_timeout=3))
    finally:
        (markers / "hang").unlink()
    failed = [r for r in records if r["status"] != "ok"]
    assert len(records) == 18 and len(failed) == 2
    assert {r["round"] for r in failed} == {1} and all("timed out" in r["error"] for r in failed)


def test_losing_every_worker_stops_the_run_resumably(tmp_path, cluster):
    local, _ = cluster
    markers = tmp_path / "markers"
    expected = key(run(tmp_path / "serial", objective=probe(tmp_path / "serial-markers"),
                       executor={"name": "serial"}))
    markers.mkdir()
    (markers / "hold").write_text("")
    address = two_workers(cluster)
    thread, outcome = _in_thread(run, tmp_path / "dask", objective=probe(markers, hold_round=1),
                                 executor=remote(cluster, worker_wait=2))
    poll(lambda: list(markers.glob("busy-*")), "round 1 to start")
    local.scale(0)
    thread.join(LIMIT)
    (markers / "hold").unlink()
    error = outcome.get("error")
    assert isinstance(error, ClusterLost) and error.exit_code == 1, outcome
    message = str(error)
    assert f"no Dask worker left at {address}" in message and "calibri resume" in message
    assert "\n" not in message
    assert {r["round"] for r in trials(tmp_path / "dask")} == {0}  # round 0 is checkpointed
    local.scale(2)
    two_workers(cluster)
    resume_run(tmp_path / "dask", quiet=True)
    assert key(trials(tmp_path / "dask")) == expected


def test_kill_9_of_the_run_then_resume_gives_the_uninterrupted_trajectory(tmp_path):
    space = {"x": {"type": "float", "low": -2.0, "high": 2.0, "init": 1.0},
             "y": {"type": "float", "low": -2.0, "high": 2.0, "init": 0.5}}
    config = {"seed": 11, "space": space, "objective": {"name": "python", "options": {
        "function": "dask_objectives:held_round_1", "with_context": True}},
        "optimizer": {"name": "pycma", "popsize": 6}, "budget": {"rounds": 3}, "callbacks": [],
        "executor": {"name": "dask", "workers": 2, "options": {"dashboard": "127.0.0.1:0"}},
        "plugins": ["calibri.plugins.dask"]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    expected = key(run(tmp_path / "serial", objective=config["objective"], executor={"name": "serial"},
                       seed=11, space=space))
    (tmp_path / HOLD_ROUND_1).write_text("")
    process = subprocess.Popen(cli_command("run", "run.yaml", "-o", "run", "--quiet"), cwd=tmp_path, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        busy = poll(lambda: sorted(tmp_path.glob("busy-*")) if process.poll() is None else "exited",
                    "round 1 to start")
        assert busy != "exited", process.stderr.read().decode()
        assert {r["round"] for r in trials(tmp_path / "run")} == {0}
        os.kill(process.pid, signal.SIGKILL)
        process.wait(LIMIT)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    (tmp_path / HOLD_ROUND_1).unlink()
    workers = [int(path.name.split("-")[1]) for path in busy]
    poll(lambda: not any(alive(pid) for pid in workers), "the workers to exit with the run", 60)
    resumed = subprocess.run(cli_command("resume", "run", "--quiet"), cwd=tmp_path, env=cli_env(),
                             capture_output=True, text=True, timeout=LIMIT)
    assert resumed.returncode == 0, resumed.stderr
    assert key(trials(tmp_path / "run")) == expected


# -- configuration ----------------------------------------------------------------------------------
def test_the_dask_example_is_the_toy_job_with_one_line_more():
    from calibri.core.run import plan

    toy = yaml.safe_load((ROOT / "examples" / "toy.yaml").read_text())
    example = yaml.safe_load((ROOT / "examples" / "dask.yaml").read_text())
    assert example["executor"] == {"name": "dask", "workers": 2}
    assert {k: v for k, v in example.items() if k not in ("name", "executor")} == \
        {k: v for k, v in toy.items() if k != "name"}
    assert plan(validate({**example, "plugins": ["calibri.plugins.dask"]})).executor.name == "dask"


def test_an_unreachable_scheduler_is_a_one_line_config_error(tmp_path, cli):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"  # free once closed: nobody listens
    config = {"objective": {"name": "sphere", "options": {"dim": 2}}, "optimizer": "random",
              "budget": {"rounds": 1}, "plugins": ["calibri.plugins.dask"],
              "executor": {"name": "dask", "options": {"scheduler": address, "connect_timeout": 1}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = cli("run", "c.yaml", "-o", "out")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calibri: error: "), result.stderr
    assert f"executor.options.scheduler: cannot reach {address}" in lines[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, devices, field", [
    ({"scheduler": "tcp://127.0.0.1:8786"}, ["cpu"], "executor.devices"),
    ({"chunk_size": 0}, None, "executor.options.chunk_size"),
    ({"task_timeout": -1}, None, "executor.options.task_timeout"),
    ({"retries": -1}, None, "executor.options.retries"),
    ({"resources": {"GPU": 0}}, None, "executor.options.resources.GPU"),
    ({"scheduler": ""}, None, "executor.options.scheduler"),
])
def test_bad_options_name_their_field_before_anything_starts(options, devices, field):
    with pytest.raises(ConfigError) as info:
        DaskExecutor(ObjectiveRecipe("sphere"), devices=devices, **options)
    assert info.value.field == field
