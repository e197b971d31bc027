"""Shared checks on what the calibri command line prints."""
from __future__ import annotations

from typing import Any


def error_line(result: Any, *needles: str) -> str:
    """The single error line of a refused command, after checking the contract: exit status 2,
    one ``calibri: error:`` line on stderr holding every needle, no traceback, nothing on stdout."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calibri: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert result.stdout == "", result.stdout
    return lines[0]
