"""DiT configs by name or file, and building a transformer without weights (meta device)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from calibri.core.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"


def known_models() -> list[str]:
    """Names of the transformer configs shipped with calibri (``flux.1-dev``, ``sd3.5-medium``, ...)."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def load_model_config(name_or_path: str | Path) -> dict[str, Any]:
    """A diffusers transformer ``config.json`` from a path, or a shipped config by name."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        shipped = CONFIG_DIR / f"{name_or_path}.json"
        if not shipped.exists():
            raise UserError(f"{name_or_path}: no such config file or known model "
                            f"(known: {', '.join(known_models()) or 'none'})")
        path = shipped
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable JSON config: {exc}") from None
    if not isinstance(config, dict) or "_class_name" not in config:
        raise UserError(f"{path}: not a diffusers model config (no _class_name)")
    return config


def build_on_meta(config: dict[str, Any]) -> Any:
    """The transformer described by ``config``, with no weights allocated."""
    import diffusers
    import torch

    class_name = config["_class_name"]
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise UserError(f"diffusers has no model class {class_name!r} (installed diffusers {diffusers.__version__})")
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # published configs may carry keys a newer class ignores
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot build {class_name} from this config: {exc}") from None
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
