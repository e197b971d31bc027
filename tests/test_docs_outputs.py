"""The sample outputs in README.md and docs/ are what the commands print today.

Every fenced block line ``$ calibri ...`` (or ``$ .venv/bin/calibri ...``) followed by output lines is
run, from a folder that holds the repository's ``examples/``, and what it prints on standard
output compared line by line: ``...`` stands for any number of lines; progress-bar lines (on
standard error, timing-dependent) are left out of the comparison. Numbers are masked: calibri
promises the same trajectory for the same config and seed on one machine, but the optimisers'
linear algebra runs on BLAS kernels chosen for the CPU (OpenBLAS picks AVX-512 or AVX2 code), so a
150-round CMA-ES run ends on a different best value on another CPU, even on the locked versions.
Everything else (messages, layout, which lines appear) must match. Blocks that need something the
test cannot provide are listed in ``NOT_RUN`` with the reason.
"""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import cli_env

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Commands whose output a document shows but this test cannot reproduce, with why.
NOT_RUN = {
    "calibri hello calibri": "the output of an example command from a plugin the reader writes",
}
PROGRESS_BAR = re.compile(r"^[\w-]+: +\d+%\|")
FENCE = re.compile(r"^```")
COMMAND = re.compile(r"^\$ (?:\.venv/bin/)?(calibri(?: .*)?)$")


@dataclass(frozen=True)
class Sample:
    document: str
    line: int
    command: str
    output: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.document}:{self.line}: {self.command}"


def samples() -> list[Sample]:
    found = []
    for path in DOCUMENTS:
        lines = path.read_text(encoding="utf-8").splitlines()
        in_block, current = False, None
        for number, line in enumerate(lines, 1):
            if FENCE.match(line):
                if current is not None and current[2]:
                    found.append(Sample(path.name, current[0], current[1], tuple(current[2])))
                in_block, current = not in_block, None
                continue
            if not in_block:
                continue
            match = COMMAND.match(line)
            if match:
                if current is not None and current[2]:
                    found.append(Sample(path.name, current[0], current[1], tuple(current[2])))
                command = match.group(1).split("  #")[0].strip()
                current = (number, command, [])
            elif line.startswith("$ "):
                current = None  # another program's command: not checked here
            elif current is not None:
                current[2].append(line)
    return found


NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def masked(lines: tuple[str, ...] | list[str]) -> list[str]:
    return [NUMBER.sub("<n>", line) for line in lines]


def matches(expected: tuple[str, ...], actual: list[str]) -> bool:
    """Line by line, ``...`` matching any run of lines (also none)."""
    if not expected:
        return not actual
    head, rest = expected[0], expected[1:]
    if head.strip() == "...":
        return any(matches(rest, actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and actual[0].rstrip() == head.rstrip() and matches(rest, actual[1:])


SAMPLES = samples()


def test_the_documents_show_command_outputs():
    """The parser finds the README's run example (a check on this test itself)."""
    assert any(s.document == "README.md" and s.command.startswith("calibri run examples/rosenbrock.yaml")
               for s in SAMPLES)


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s.command not in NOT_RUN], ids=str)
def test_sample_output_is_what_the_command_prints(sample: Sample, tmp_path: Path) -> None:
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    args = sample.command.split()[1:]
    proc = subprocess.run([sys.executable, "-m", "calibri.core.cli", *args], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    printed = [line for line in proc.stdout.splitlines() if line.strip()]
    expected = tuple(line for line in sample.output if line.strip() and not PROGRESS_BAR.match(line))
    expected, printed = tuple(masked(expected)), masked(printed)
    assert matches(expected, printed), (
        f"{sample} shows:\n" + "\n".join(expected) + "\n\nbut it prints:\n" + "\n".join(printed))
