"""The example plugin's own tests: run them with ``pytest`` from this folder.

A plugin's test suite needs no installation step: ``add_plugin_modules`` registers the module
as calibri would register the installed entry point, and the optimizer contract suite checks
the optimiser against the rules every calibri optimiser follows.
"""
from __future__ import annotations

import pytest

from calibri.core.plugins import add_plugin_modules, reset_registry
from calibri.core.testing.optimizer_contract import OptimizerContract

from calibri_example_plugin import OnePlusLambdaES, ShiftedSphere


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setenv("CALIBRI_PLUGINS", "")  # only the built-ins and this module
    reset_registry()
    yield add_plugin_modules("calibri_example_plugin")
    reset_registry()


def test_registrations(registry):
    es = registry.get("optimizers", "example.es")
    assert es.factory is OnePlusLambdaES and es.plugin == "calibri_example_plugin"
    objective = registry.get("objectives", "example.shifted-sphere")
    assert objective.factory is ShiftedSphere
    assert objective.extras["space"](dim=3).names == ["x[0]", "x[1]", "x[2]"]


class TestOnePlusLambdaES(OptimizerContract):
    """Every check of the optimizer contract suite, as one test each."""

    optimizer_factory = OnePlusLambdaES
    optimizer_options = {"target_success": 0.2, "damping": 1.0}
