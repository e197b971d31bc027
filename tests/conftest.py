"""Shared fixtures: run the ``calibri`` command in a subprocess or in-process.

Both run with ``CALIBRI_PLUGINS=""`` so installed third-party plugins do not leak into tests, and
with this folder importable (``helpers_objectives`` and other test modules used as plugins).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent

# Checkpoints are signed with a per-user key; the suite uses its own (inherited by subprocesses)
# rather than creating one in the home directory of whoever runs it.
os.environ["CALIBRI_KEY_FILE"] = os.path.join(tempfile.mkdtemp(prefix="calibri-test-key-"), "checkpoint.key")


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors run fastest, and most reproducibly, on one torch thread (restored after the module)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOY_PROMPTS = ["a small red circle on the left", "a large blue square at the top", "a small green cross in the center",
               "a large white triangle at the bottom", "a small cyan circle on the right"]


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    """An untrained two-block toy pipeline saved the diffusers way."""
    from calibri.plugins.toy.pipeline import build_pipeline

    folder = tmp_path_factory.mktemp("toy-model")
    build_pipeline(seed=0, layers=2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("prompts")
    train, val = folder / "train.txt", folder / "val.jsonl"
    train.write_text("# calibration prompts\n" + "\n".join(TOY_PROMPTS) + "\n\n", encoding="utf-8")
    val.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(TOY_PROMPTS[:3])), encoding="utf-8")
    return train, val


@pytest.fixture
def no_installed_plugins(monkeypatch):
    """Only calibri's built-ins and the test's own plugin modules: installed third-party plugins
    must not leak into a test that counts or names registrations."""
    from calibri.core import plugins

    monkeypatch.setenv("CALIBRI_PLUGINS", "")
    plugins.reset_registry()
    yield
    plugins.reset_registry()
