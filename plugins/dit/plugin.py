"""Registers the Calibri plugin's architectures (and, lazily, its commands) with calibri."""
from __future__ import annotations

from calibri.core.hookspecs import hookimpl

from .adapters import BUILT_IN_ADAPTERS


@hookimpl
def calibri_register_architectures(register):
    for adapter in BUILT_IN_ADAPTERS:
        register(adapter.name, adapter)


@hookimpl
def calibri_register_commands(register):
    from .commands import bake_command, sites_command

    register(sites_command)
    register(bake_command)
