"""Test helpers for calibri and its plugins.

:mod:`calibri.core.testing.optimizer_contract` is the contract suite every optimiser plugin must
pass (x0 first, in-bounds candidates, failures and partial rounds, determinism, exact resume,
step size, progress). It needs pytest.

The contract suite of DiT architecture adapters needs torch and diffusers, so it lives with the
DiT plugin: :mod:`calibri.plugins.dit.testing`.
"""
