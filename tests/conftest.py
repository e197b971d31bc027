"""Shared fixtures: run the ``calibri`` command in a subprocess or in-process.

Both run with ``CALIBRI_PLUGINS=""`` so installed third-party plugins do not leak into tests, and
with this folder importable (``helpers_objectives`` and other test modules used as plugins).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a ``calibri`` subprocess."""
    env = dict(os.environ)
    env["CALIBRI_PLUGINS"] = ""
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "calibri.core.cli", *map(str, args)]


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(tmp_path):
    """``cli("run", "cfg.yaml", "-o", "out")``: the calibri command in a subprocess (cwd: tmp_path)."""

    def run(*args: str, cwd: str | Path | None = None, timeout: float = 120) -> CliResult:
        proc = subprocess.run(cli_command(*args), cwd=cwd or tmp_path, env=cli_env(), capture_output=True,
                              text=True, timeout=timeout)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture
def cli_inproc(tmp_path, monkeypatch, capfd):
    """Like :func:`cli`, but in this process (fast: no interpreter start, imports already done)."""
    from calibri.core import plugins
    from calibri.core.cli import main

    monkeypatch.setenv("CALIBRI_PLUGINS", "")
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> CliResult:
        capfd.readouterr()
        plugins.reset_registry()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            plugins.reset_registry()
        out, err = capfd.readouterr()
        return CliResult(code, out, err)

    return run
