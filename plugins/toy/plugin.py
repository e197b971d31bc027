"""Registers the toy world's oracle reward (``toy_oracle``)."""
from __future__ import annotations

from calibri.core.hookspecs import hookimpl


def toy_oracle(term: str = "reward", batch_size: int = 256, device: str = "cpu"):
    """The toy world's oracle: checks colour, shape, position, size and cleanliness with code."""
    from .oracle import ToyOracle

    return ToyOracle(term=term, batch_size=batch_size, device=device)


@hookimpl
def calibri_register_rewards(register):
    register("toy_oracle", toy_oracle)
