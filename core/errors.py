"""Errors the CLI turns into a one-line message and exit status 2 (user mistakes) or 1 (run failures)."""
from __future__ import annotations

#: Appended to "cannot import module" errors: where the ``calibri`` command looks for modules.
IMPORT_HINT = ("modules are imported from the working directory, PYTHONPATH and installed packages; "
               "run calibri from the folder that holds the module, or add it to PYTHONPATH")


class CalibriError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with; the message is shown on one line."""

    exit_code = 1


class UserError(CalibriError):
    """Bad input from the user: config, file, plugin name. Shown without a traceback, exit 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config field is wrong. ``field`` is its dotted path (``optimizer.popsize``)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def __reduce__(self):  # rebuilt from (field, message) when it crosses a process boundary
        return (type(self), (self.field, self.message))


class RunDirError(UserError):
    """A run directory is missing, unreadable, or would be overwritten."""


class PluginError(UserError):
    """A plugin is missing, misbehaves, or clashes with another."""


class RunFailed(CalibriError):
    """The run stopped because too many evaluations failed (see ``max_failure_rate``)."""


class RunInterrupted(CalibriError):
    """The user stopped the run (Ctrl-C); the last finished round is checkpointed."""

    exit_code = 130
