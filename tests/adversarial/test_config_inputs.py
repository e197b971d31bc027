"""Config values that used to crash, hang or grow without bound.

Before: ``optimizer.sigma=.inf`` printed a traceback and left a run directory behind; a YAML file
nested 3,000 deep raised ``RecursionError``; ``optimizer.popsize: 1e9`` grew to gigabytes. Now each
is one ``calibri: error:`` line naming the field or file, exit 2, and no run directory.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import cli_command, cli_env

BASE = """\
objective: {name: sphere, options: {dim: 2}}
optimizer: nevergrad.cma
budget: {rounds: 1}
callbacks: []
"""

DEEP_MAPPING = "a:\n" + "".join("  " * depth + "b:\n" for depth in range(1, 3001))
DEEP_LIST = BASE + "extra: " + "[" * 3000 + "]" * 3000 + "\n"

# (config text, overrides, the start of the message after "calibri: error: ")
CASES = [
    pytest.param(BASE, ["optimizer.sigma=.inf"], "optimizer.sigma: Input should be a finite number", id="sigma-inf"),
    pytest.param(BASE, ["optimizer.sigma=-.inf"], "optimizer.sigma: Input should be a finite number", id="sigma-minus-inf"),
    pytest.param(BASE, ["optimizer.sigma=.nan"], "optimizer.sigma: Input should be a finite number", id="sigma-nan"),
    pytest.param(BASE, ["optimizer.popsize=1000000000"], "optimizer.popsize: Input should be less than or equal to 100000",
                 id="popsize-1e9"),
    pytest.param(BASE, ["budget.seconds=.inf"], "budget.seconds: Input should be a finite number", id="seconds-inf"),
    pytest.param(BASE, ["max_failure_rate=.nan"], "max_failure_rate: Input should be a finite number", id="failure-rate-nan"),
    pytest.param(BASE, ["executor.workers=100000"], "executor.workers: Input should be less than or equal to 1024",
                 id="workers-1e5"),
    pytest.param(DEEP_MAPPING, [], "run.yaml: invalid YAML: nested", id="yaml-mapping-3000-deep"),
    pytest.param(DEEP_LIST, [], "run.yaml: invalid YAML: nested", id="yaml-list-3000-deep"),
    pytest.param(BASE, ["objective.options=" + "[" * 3000 + "]" * 3000], "objective.options: value nested too deeply",
                 id="override-3000-deep"),
    pytest.param(BASE, ["objective.options=" + "{a: " * 200 + "1" + "}" * 200],
                 "objective.options: value nested more than 100 levels deep", id="override-200-deep"),
]


@pytest.mark.parametrize("text, overrides, message", CASES)
def test_bad_config_values_are_one_line_errors(text, overrides, message, tmp_path: Path):
    (tmp_path / "run.yaml").write_text(text)
    proc = subprocess.run(cli_command("run", "run.yaml", "-o", "out", "--quiet", *overrides), cwd=tmp_path,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"calibri: error: {message}"), proc.stderr
    assert not (tmp_path / "out").exists()
