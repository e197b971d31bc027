"""Registers the toy world's oracle reward (``toy_oracle``)."""
from __future__ import annotations

from typing import Any

from calibri.core.hookspecs import hookimpl


def toy_oracle(term: str = "reward", batch_size: int = 256, device: str = "cpu"):
    """The toy world's oracle: checks colour, shape, position, size and cleanliness with code.
    A device this machine lacks is refused here, not when the first images are scored."""
    from calibri.core.errors import ConfigError
    from calibri.plugins.dit.models import check_device

    from .oracle import ToyOracle

    try:
        check_device(device, "device")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None

    return ToyOracle(term=term, batch_size=batch_size, device=device)


def check_toy_prompts(prompts: list[str], metadata: list[dict[str, Any]], field: str) -> None:
    """Refuse, before any image is made, a prompt the oracle cannot read (not of the toy world)."""
    from calibri.core.errors import ConfigError

    from .oracle import _scene_of

    for number, (prompt, meta) in enumerate(zip(prompts, metadata), start=1):
        try:
            _scene_of(prompt, meta)
        except ValueError as exc:
            raise ConfigError(field, f"prompt {number}: {exc}; the toy_oracle reward scores toy-world "
                                     f"prompts only") from None


toy_oracle.check_prompts = check_toy_prompts  # type: ignore[attr-defined]


@hookimpl
def calibri_register_rewards(register):
    register("toy_oracle", toy_oracle)
