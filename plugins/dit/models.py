"""DiT configs by name or file, building a transformer without weights (meta device), and loading
pipelines and transformers with every user mistake (a missing, truncated or mismatched file, a
device this machine lacks) reported on one line naming the file or option."""
from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from calibri.core.errors import ConfigError, UserError

CONFIG_DIR = Path(__file__).parent / "configs"
#: Model configs and pipeline indexes are a few KiB; reading stops here (a device file, a huge file).
MAX_CONFIG_BYTES = 1 << 20
#: Layer counts above this are a typo, not a model: refused before the model is built.
MAX_LAYERS = 1000
#: A hub id (``org/name``); any other string that is not an existing folder is a missing folder.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def known_models() -> list[str]:
    """Names of the transformer configs shipped with calibri (``flux.1-dev``, ``sd3.5-medium``, ...)."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def read_json_file(path: Path, what: str, limit: int = MAX_CONFIG_BYTES) -> Any:
    """The JSON in ``path``, read only if it is a regular file of at most ``limit`` bytes: a
    device (``/dev/zero``), a pipe or a huge file is refused instead of read forever."""
    if not path.is_file():
        raise UserError(f"{path}: not a regular file (expected a {what})")
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise UserError(f"{path}: larger than {limit // 1024} KiB, too large for a {what}")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable {what}: {exc}") from None


def load_model_config(name_or_path: str | Path) -> dict[str, Any]:
    """A diffusers transformer ``config.json`` from a path, or a shipped config by name; its layer
    counts checked (a model of a million blocks would take forever to build, even without weights)."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        shipped = CONFIG_DIR / f"{name_or_path}.json"
        if not shipped.exists():
            raise UserError(f"{name_or_path}: no such config file or known model "
                            f"(known: {', '.join(known_models()) or 'none'})")
        path = shipped
    config = read_json_file(path, "JSON config")
    if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
        raise UserError(f"{path}: not a diffusers model config (no _class_name)")
    check_layer_counts(config, path)
    return config


def check_layer_counts(config: dict[str, Any], source: str | Path) -> None:
    """``num_layers`` (at least 1) and every other ``num_*layers`` (at least 0) are whole numbers
    up to :data:`MAX_LAYERS`; errors name ``source`` and the key."""
    for key, value in config.items():
        if not (key.startswith("num_") and key.endswith("layers")) or value is None:
            continue
        low = 1 if key == "num_layers" else 0
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{source}: {key}: expected a whole number of layers, got {value!r}")
        if not low <= value <= MAX_LAYERS:
            raise UserError(f"{source}: {key}: must be between {low} and {MAX_LAYERS}, got {value}")


def model_class(config: dict[str, Any], source: str | Path | None = None) -> Any:
    """The diffusers model class a config names; a one-line error if diffusers has none."""
    import diffusers

    class_name = config["_class_name"]
    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) and class_name.isidentifier() else None
    if not isinstance(cls, type) or not hasattr(cls, "from_config"):
        where = f"{source}: " if source is not None else ""
        raise UserError(f"{where}diffusers has no model class {class_name!r} "
                        f"(installed diffusers {diffusers.__version__})")
    return cls


def build_on_meta(config: dict[str, Any], source: str | Path | None = None) -> Any:
    """The transformer described by ``config`` (read from ``source``, named in errors), with no
    weights allocated. Whatever the class raises on the config's values is the config's mistake."""
    import torch

    cls = model_class(config, source)
    check_layer_counts(config, source or "model config")
    where = f"{source}: " if source is not None else ""
    with quiet_loading(), warnings.catch_warnings():  # published configs may carry keys a newer class ignores
        warnings.simplefilter("ignore", FutureWarning)  # diffusers' own deprecations inside a class (Chroma)
        try:
            with torch.device("meta"):
                return cls.from_config(config)
        except Exception as exc:  # noqa: BLE001 - any failure here comes from the config's values
            raise UserError(f"{where}cannot build {config['_class_name']} from this config: "
                            f"{error_summary(exc)}") from None


def error_summary(exc: BaseException, limit: int = 300) -> str:
    """One line from a library's (often many-line) error: a state-dict mismatch is summed up as
    its first mismatch and a count, anything else as its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    mismatches = [line for line in lines if line.startswith("size mismatch for")]
    shape = re.search(r"because (\S+ expected shape .+?, but got [^.]+?)\.", lines[0]) if lines else None
    if shape and not mismatches:  # the wording diffusers uses when a dtype is given to from_pretrained
        mismatches = [shape.group(1)]
    if mismatches:
        more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        text = f"the config does not match the weights: {mismatches[0]}{more}"
    else:
        text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' warnings and progress bars off while loading (restored
    after): a command's output is its result, or one error line."""
    import diffusers

    loggers = [diffusers.utils.logging]
    try:
        import transformers

        loggers.append(transformers.utils.logging)
    except ImportError:  # pragma: no cover - transformers comes with the dit extra
        pass
    saved = [(log, log.get_verbosity(), log.is_progress_bar_enabled()) for log in loggers]
    for log in loggers:
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        yield
    finally:
        for log, verbosity, bars in saved:
            log.set_verbosity(verbosity)
            if bars:
                log.enable_progress_bar()


def check_device(device: Any, field: str) -> str:
    """``device`` if this machine's torch can use it, else a :class:`ConfigError` naming ``field``:
    a malformed name, CUDA or MPS where torch sees none, a GPU index past the last one."""
    import torch

    if not isinstance(device, str) or not device.strip():
        raise ConfigError(field, f"expected a device name (cpu, cuda, cuda:N, mps), got {device!r}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(field, f"{device!r} is not a torch device (cpu, cuda, cuda:N, mps)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(field, f"{device!r}: CUDA is not available (torch {torch.__version__} sees no CUDA device)")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(field, f"{device!r}: no such device (this machine has {count} CUDA "
                                     f"device{'' if count == 1 else 's'})")
    elif parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(field, f"{device!r}: MPS is not available (torch {torch.__version__})")
    elif parsed.type == "meta":
        raise ConfigError(field, "'meta' holds no data: give cpu, cuda, cuda:N or mps")
    elif parsed.type != "cpu":
        available = getattr(getattr(torch, parsed.type, None), "is_available", None)
        if callable(available) and not available():
            raise ConfigError(field, f"{device!r}: not available to this torch ({torch.__version__})")
    return device


def finite_number(value: Any, field: str, bound: float) -> float:
    """``value`` as a float if it is finite and at most ``bound`` in magnitude, else a ConfigError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(field, f"expected a number, got {value!r}") from None
    if not math.isfinite(number) or abs(number) > bound:
        raise ConfigError(field, f"must be a finite number between {-bound:g} and {bound:g}, got {value!r}")
    return number


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


def check_pipeline_source(model: str) -> Path | None:
    """The local pipeline folder ``model`` names (None for a hub id), checked without loading:
    an existing folder holding a readable ``model_index.json``."""
    path = resolve_model(model)
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise UserError(f"{model}: not a pipeline folder (a file)")
        index = folder / "model_index.json"
        if not index.exists():
            raise UserError(f"{model}: not a diffusers pipeline folder (no model_index.json)")
        document = read_json_file(index, "pipeline index")
        if not isinstance(document, dict) or not isinstance(document.get("_class_name"), str):
            raise UserError(f"{index}: not a diffusers pipeline index (no _class_name)")
        return folder
    if not _HUB_ID.fullmatch(path):
        raise UserError(f"{model}: no such pipeline folder (a local folder, a hub id 'org/name', "
                        f"or one of: {', '.join(SHIPPED_MODELS)})")
    return None


def pipeline_class(model: str) -> Any:
    """The pipeline class ``model``'s ``model_index.json`` names (None for a hub id or a class
    this diffusers lacks); calibri's own classes included. Imports the class, loads nothing."""
    import importlib

    import diffusers

    folder = check_pipeline_source(model)
    if folder is None:
        return None
    class_name = read_json_file(folder / "model_index.json", "pipeline index")["_class_name"]
    if class_name in PIPELINE_CLASSES:
        module, attr = PIPELINE_CLASSES[class_name]
        return getattr(importlib.import_module(module), attr)
    cls = getattr(diffusers, class_name, None) if class_name.isidentifier() else None
    return cls if isinstance(cls, type) else None


def pixel_multiple(model: str) -> int | None:
    """What image heights and widths must be multiples of for ``model``, from its configs (no
    weights): the VAE's downsampling (KL, DC-AE or Qwen-Image's causal VAE) times the transformer's
    patch (at least 2: FLUX, Chroma and Qwen-Image pack 2x2 latents). None where the folder does not say (a hub id, no VAE)."""
    folder = check_pipeline_source(model)
    if folder is None or not (folder / "vae" / "config.json").is_file():
        return None
    vae = read_json_file(folder / "vae" / "config.json", "VAE config")
    transformer = (read_json_file(folder / "transformer" / "config.json", "JSON config")
                   if (folder / "transformer" / "config.json").is_file() else {})
    if not isinstance(vae, dict) or not isinstance(transformer, dict):
        return None
    levels = vae.get("block_out_channels") or vae.get("encoder_block_out_channels")  # KL / DC-AE
    if isinstance(levels, list) and levels:
        vae_factor = 2 ** (len(levels) - 1)
    elif isinstance(vae.get("temperal_downsample"), list):
        vae_factor = 2 ** len(vae["temperal_downsample"])
    else:
        return None
    patch = transformer.get("patch_size", 1)
    return vae_factor * max(patch if isinstance(patch, int) and not isinstance(patch, bool) else 1, 2)


def loaded_pixel_multiple(pipe: Any) -> int | None:
    """:func:`pixel_multiple` of a loaded pipeline, from its own attributes."""
    vae_factor = getattr(pipe, "vae_scale_factor", None)
    if not isinstance(vae_factor, int) or vae_factor < 1:
        return None
    patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", 1)
    return vae_factor * max(patch if isinstance(patch, int) else 1, 2)


def load_pipeline(model: str, dtype: str = "auto", device: str = "cpu") -> Any:
    """A diffusers pipeline from a folder or hub id (calibri's own classes included), on ``device``.
    A missing, empty or damaged folder is a one-line :class:`UserError` naming it."""
    import diffusers

    from .compat import from_pretrained

    folder = check_pipeline_source(model)
    cls: Any = diffusers.DiffusionPipeline
    if folder is not None:
        own = pipeline_class(model)
        if own is not None and own.__module__.startswith("calibri."):
            cls = own
    path = str(folder) if folder is not None else resolve_model(model)
    try:
        with quiet_loading():
            pipe = from_pretrained(cls, path, torch_dtype(dtype, device))
    except Exception as exc:  # noqa: BLE001 - the library's error on the user's files
        raise UserError(f"{model}: cannot load the pipeline: {error_summary(exc)}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_transformer(folder: Path, config: dict[str, Any], dtype: Any = None) -> Any:
    """The transformer saved in ``folder`` (config.json + weights), in ``dtype`` (a torch dtype;
    None: the library's default); a missing or truncated weights file, or a config.json that does
    not match the weights, is one line naming the file."""
    from .compat import from_pretrained

    cls = model_class(config, folder / "config.json")
    try:
        with quiet_loading():
            return cls.from_pretrained(folder) if dtype is None else from_pretrained(cls, str(folder), dtype)
    except Exception as exc:  # noqa: BLE001 - the library's error on the user's files
        summary = error_summary(exc)
        if summary.startswith("the config does not match"):
            raise UserError(f"{folder / 'config.json'}: {summary}") from None
        weights = sorted(p.name for p in folder.glob("*.safetensors")) or sorted(p.name for p in folder.glob("*.bin"))
        where = folder / weights[0] if len(weights) == 1 else folder
        raise UserError(f"{where}: cannot load the transformer's weights: {summary}") from None
