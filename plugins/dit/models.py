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


#: Pipeline classes calibri ships (loadable by ``_class_name`` from a pipeline folder).
PIPELINE_CLASSES = {"ToyFlowPipeline": ("calibri.plugins.toy.pipeline", "ToyFlowPipeline")}
#: Model names that resolve to a pipeline folder shipped inside the package.
SHIPPED_MODELS = {"toy": ("calibri.plugins.toy", "model")}


def resolve_model(model: str) -> str:
    """A shipped model name (``toy``) → its folder; anything else unchanged (folder or hub id)."""
    if model in SHIPPED_MODELS:
        from importlib.resources import files

        package, relative = SHIPPED_MODELS[model]
        return str(files(package).joinpath(relative))
    return model


def transformer_config(model: str, model_config: str | None = None) -> dict[str, Any]:
    """The transformer config of ``model`` without loading weights: ``model_config`` (a shipped
    name such as ``flux.1-dev`` or a file) if given, else ``MODEL/transformer/config.json``."""
    if model_config is not None:
        return load_model_config(model_config)
    folder = Path(resolve_model(model))
    if (folder / "transformer" / "config.json").is_file():
        return load_model_config(folder / "transformer")
    raise UserError(f"{model}: not a local pipeline folder with transformer/config.json; give model_config "
                    f"(a config file, or one of: {', '.join(known_models())}) to describe its transformer")


def torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_pipeline(model: str, dtype: str = "auto", device: str = "cpu") -> Any:
    """A diffusers pipeline from a folder or hub id (calibri's own classes included), on ``device``."""
    import importlib

    import diffusers

    from .compat import from_pretrained

    path = resolve_model(model)
    index = Path(path) / "model_index.json"
    cls: Any = diffusers.DiffusionPipeline
    if index.is_file():
        try:
            class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{index}: not a readable pipeline index: {exc}") from None
        if class_name in PIPELINE_CLASSES:
            module, attr = PIPELINE_CLASSES[class_name]
            cls = getattr(importlib.import_module(module), attr)
    elif not Path(path).exists() and "/" not in path:
        raise UserError(f"{model}: no such pipeline folder (a local folder, a hub id 'org/name', "
                        f"or one of: {', '.join(SHIPPED_MODELS)})")
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        pipe = from_pretrained(cls, path, torch_dtype(dtype, device))
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
