"""``--quiet``: callbacks are told (``RunInfo.quiet``), and libraries' progress bars are off while
the run lasts, in this process and in the worker processes it starts (through the environment)."""
from __future__ import annotations

import os

from calibri.core.config import validate
from calibri.core.hookspecs import hookimpl
from calibri.core.run import QUIET_ENVIRONMENT, quiet_libraries, start_run

SEEN: dict[str, object] = {}


def worker_environment(params) -> float:
    """1.0 where the evaluating process has the quiet environment."""
    return float(all(os.environ.get(k) == v for k, v in QUIET_ENVIRONMENT.items()))


class Recorder:
    def on_run_start(self, info) -> None:
        SEEN["quiet"] = info.quiet
        SEEN["env"] = {name: os.environ.get(name) for name in QUIET_ENVIRONMENT}


@hookimpl
def calibri_register_callbacks(register):
    register("test.recorder", Recorder)


def run(tmp_path, quiet: bool, executor: str = "serial") -> list[float]:
    import json

    config = {"seed": 0, "plugins": ["test_monitoring_quiet"],
              "objective": {"name": "python", "options": {"function": "test_monitoring_quiet:worker_environment"}},
              "space": {"x": {"type": "float", "low": 0, "high": 1}}, "optimizer": {"name": "random", "popsize": 2},
              "executor": {"name": executor, "workers": 1}, "budget": {"rounds": 1}, "callbacks": ["test.recorder"]}
    out = tmp_path / f"run-{quiet}-{executor}"
    start_run(validate(config), out, quiet=quiet)
    return [json.loads(line)["value"] for line in (out / "trials.jsonl").read_text().splitlines()]


def test_quiet_reaches_callbacks_and_workers_and_is_undone_after(tmp_path, monkeypatch):
    for name in QUIET_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    assert run(tmp_path, quiet=True, executor="process") == [1.0, 1.0]  # a spawned worker has it
    assert SEEN == {"quiet": True, "env": QUIET_ENVIRONMENT}
    assert all(name not in os.environ for name in QUIET_ENVIRONMENT)  # restored
    assert run(tmp_path, quiet=False) == [0.0, 0.0] and SEEN["quiet"] is False


def test_quiet_libraries_switches_loaded_libraries_off_and_back():
    import transformers.utils.logging as logging

    logging.enable_progress_bar()
    with quiet_libraries():
        assert not logging.is_progress_bar_enabled()
    assert logging.is_progress_bar_enabled()
