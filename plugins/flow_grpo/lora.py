"""Flow-GRPO LoRA checkpoints: checked cheaply, then merged into a transformer at their own scaling.

Flow-GRPO saves its LoRA the PEFT way (``checkpoint-N/lora/adapter_config.json`` +
``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``) and loads it with
``PeftModel.from_pretrained``. That is the only loader that reads this layout right: diffusers'
``load_lora_weights`` finds nothing in it and loads nothing, without an error, and a loader that
strips the prefix but ignores ``lora_alpha`` applies the LoRA at rank/alpha of its strength (half,
for Flow-GRPO's r 32 α 64 and r 64 α 128). So the merge here goes through PEFT, and every way a
checkpoint can fail to apply in full — a module the transformer lacks, a shape that does not fit,
a module the config does not target, one it targets with no weights — is a one-line
:class:`ConfigError` naming the option and the file, never a silent partial or empty merge.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibri.core.errors import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: What PEFT puts before a module's name in the keys it saves.
KEY_PREFIX = "base_model.model."
INSTALL_HINT = "pip install 'calibri[flowgrpo]'"
#: Attribute a transformer carries once a LoRA is merged into it (what was merged: path, sha256).
MERGED_ATTRIBUTE = "_calibri_lora"
#: A safetensors header is a few hundred KiB for the largest LoRA; reading stops here.
MAX_HEADER_BYTES = 64 << 20
_WEIGHT_KINDS = ("lora_A.weight", "lora_B.weight")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class LoraCheckpoint:
    """A checked adapter folder: its config and, per adapted module, the shapes of A and B."""

    folder: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(repr=False)

    @property
    def weights(self) -> Path:
        return self.folder / ADAPTER_WEIGHTS

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def modules(self) -> list[str]:
        """The transformer's modules the weights adapt, sorted."""
        return sorted(self.shapes)


def adapter_folder(path: str | Path, field: str) -> Path:
    """The folder holding the adapter: ``path`` itself, or its ``lora/`` (a ``checkpoint-N/``
    folder as Flow-GRPO writes it). Missing folders and files are one line naming ``field``."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ConfigError(field, f"{folder}: no such folder (expected a Flow-GRPO checkpoint-N/ or its lora/ folder)")
    if not folder.is_dir():
        raise ConfigError(field, f"{folder}: not a folder (expected a Flow-GRPO checkpoint-N/ or its lora/ folder)")
    if not (folder / ADAPTER_CONFIG).exists() and (folder / "lora").is_dir():
        folder = folder / "lora"
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            hint = ("; a .bin adapter is not read (unsafe to unpickle): convert it to safetensors"
                    if name == ADAPTER_WEIGHTS and (folder / "adapter_model.bin").exists() else "")
            raise ConfigError(field, f"{folder / name}: missing (a PEFT LoRA folder holds {ADAPTER_CONFIG} and "
                                     f"{ADAPTER_WEIGHTS}){hint}")
    return folder


def read_lora(path: str | Path, field: str) -> LoraCheckpoint:
    """The adapter in ``path`` (a ``lora/`` folder or the ``checkpoint-N/`` above it), read
    without loading a tensor: its config and the safetensors header, checked for what a merge
    needs. Errors are one line naming ``field`` and the file."""
    from calibri.core.errors import UserError
    from calibri.plugins.dit.models import read_json_file

    folder = adapter_folder(path, field)
    config_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    try:
        config = read_json_file(config_path, "PEFT adapter config")
    except UserError as exc:
        raise ConfigError(field, str(exc)) from None
    if not isinstance(config, dict):
        raise ConfigError(field, f"{config_path}: not a PEFT adapter config (a JSON object)")
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(field, f"{config_path}: peft_type {config.get('peft_type')!r}: only LoRA adapters are supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(field, f"{config_path}: r must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ConfigError(field, f"{config_path}: lora_alpha must be a finite number, got {alpha!r}")
    if config.get("use_dora"):
        raise ConfigError(field, f"{config_path}: a DoRA adapter (use_dora); only plain LoRA adapters are supported")
    shapes = _lora_shapes(safetensors_header(weights, field), weights, field)
    return LoraCheckpoint(folder, config, shapes)


def safetensors_header(path: Path, field: str) -> dict[str, Any]:
    """The tensor table of a safetensors file (names → dtype, shape, offsets), checked against
    the file's size so a truncated download is refused before anything loads."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                raise ConfigError(field, f"{path}: not a safetensors file (or truncated)")
            header = json.loads(handle.read(length).decode("utf-8"))
    except OSError as exc:
        raise ConfigError(field, f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(field, f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConfigError(field, f"{path}: not a safetensors file (its header is not a table)")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry["shape"])):
            raise ConfigError(field, f"{path}: tensor {name!r} has a malformed entry")
        start, stop = entry["data_offsets"]
        width = _DTYPE_BYTES.get(entry.get("dtype"))
        if width is not None and stop - start != width * math.prod(entry["shape"]):
            raise ConfigError(field, f"{path}: tensor {name!r}: its size does not match its shape")
        end = max(end, stop)
    if 8 + length + end > size:
        raise ConfigError(field, f"{path}: truncated ({size} bytes, its header describes {8 + length + end})")
    return header


def _lora_shapes(header: Mapping[str, Any], path: Path, field: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per module: the shapes of lora_A and lora_B, from keys ``base_model.model.<module>.lora_X.weight``."""
    found: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, entry in header.items():
        if not key.startswith(KEY_PREFIX):
            raise ConfigError(field, f"{path}: key {key!r} lacks the {KEY_PREFIX!r} prefix PEFT saves: not a Flow-GRPO "
                                     f"(PEFT) checkpoint (a diffusers-format LoRA loads with load_lora_weights)")
        kind = next((k for k in _WEIGHT_KINDS if key.endswith("." + k)), None)
        if kind is None:
            raise ConfigError(field, f"{path}: key {key!r} is not a LoRA weight (lora_A/lora_B): only plain LoRA "
                                     f"adapters are supported")
        module = key[len(KEY_PREFIX): -len(kind) - 1]
        shape = tuple(entry["shape"])
        if len(shape) != 2:
            raise ConfigError(field, f"{path}: {key} has shape {list(shape)}, not a matrix "
                                     f"(only Linear layers are supported)")
        found.setdefault(module, {})[kind] = shape
    if not found:
        raise ConfigError(field, f"{path}: holds no LoRA weights")
    shapes = {}
    for module, kinds in found.items():
        missing = [k for k in _WEIGHT_KINDS if k not in kinds]
        if missing:
            raise ConfigError(field, f"{path}: {module} has no {missing[0]}")
        a, b = kinds["lora_A.weight"], kinds["lora_B.weight"]
        if a[0] != b[1]:
            raise ConfigError(field, f"{path}: {module}: lora_A {list(a)} and lora_B {list(b)} disagree on the rank")
        shapes[module] = (a, b)
    return shapes


def check_fits(checkpoint: LoraCheckpoint, transformer: Any, field: str) -> None:
    """Every module the weights adapt is a Linear of ``transformer`` of the right shape, and the
    adapter's config targets exactly those modules. Works on a model built on the meta device."""
    import torch

    weights = checkpoint.weights
    model_name = type(transformer).__name__
    modules = dict(transformer.named_modules())
    absent = [m for m in checkpoint.modules if m not in modules]
    if absent:
        raise ConfigError(field, f"{weights}: {len(absent)} of its {len(checkpoint.shapes)} LoRA modules match no module "
                                 f"of this {model_name} (e.g. {absent[0]}): made for another model")
    for name in checkpoint.modules:
        module = modules[name]
        if not isinstance(module, torch.nn.Linear):
            raise ConfigError(field, f"{weights}: {name} is a {type(module).__name__} in this {model_name}, not a Linear")
        a, b = checkpoint.shapes[name]
        if a[1] != module.in_features or b[0] != module.out_features:
            raise ConfigError(field, f"{weights}: {name}: LoRA shapes {list(a)}, {list(b)} do not fit this {model_name}'s "
                                     f"Linear({module.in_features}, {module.out_features}): made for another model")
    targeted = _targeted(checkpoint, modules)
    if targeted is None:
        return
    untargeted = sorted(set(checkpoint.shapes) - targeted)
    if untargeted:
        raise ConfigError(field, f"{checkpoint.folder / ADAPTER_CONFIG}: its target_modules miss {len(untargeted)} modules "
                                 f"its weights adapt (e.g. {untargeted[0]}); PEFT would skip their weights")
    empty = sorted(targeted - set(checkpoint.shapes))
    if empty:
        raise ConfigError(field, f"{weights}: holds no weights for {len(empty)} modules its config targets in this "
                                 f"{model_name} (e.g. {empty[0]}): made for another model, or incomplete")


def _targeted(checkpoint: LoraCheckpoint, modules: Mapping[str, Any]) -> set[str] | None:
    """The Linears of the model that PEFT would adapt under the checkpoint's config (None: the
    config is one this check cannot read; the merge then checks what PEFT actually adapted)."""
    import torch

    try:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import check_target_module_exists
    except ImportError:
        return None
    known = set(getattr(LoraConfig, "__dataclass_fields__", {}))
    try:
        config = LoraConfig(**{k: v for k, v in checkpoint.config.items() if k in known and k != "peft_type"})
    except Exception:  # noqa: BLE001 - PEFT's own loader will say what is wrong with it
        return None
    found = set()
    for name, module in modules.items():
        if name and isinstance(module, torch.nn.Linear):
            match = check_target_module_exists(config, name)
            if match and type(match).__name__ != "_ExcludedModule":
                found.add(name)
    return found


def check_lora(path: str | Path, field: str, transformer: Any | None = None) -> LoraCheckpoint:
    """The cheap check before a run builds anything: the files (no tensor is loaded), PEFT
    installed, and, given a transformer (one on the meta device will do), that the LoRA fits it."""
    checkpoint = read_lora(path, field)
    _require_peft(field)
    if transformer is not None:
        check_fits(checkpoint, transformer, field)
    return checkpoint


def _require_peft(field: str) -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError(field, f"loading a Flow-GRPO LoRA needs peft: {INSTALL_HINT}") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lora_record(checkpoint: LoraCheckpoint) -> dict[str, Any]:
    """What a calibration file records of the LoRA it was made on: where it was and which bytes
    (the sha256 of its weights), so it can be found, and a changed file recognised, later."""
    return {"path": str(checkpoint.folder.resolve()), "sha256": file_sha256(checkpoint.weights),
            "rank": checkpoint.rank, "alpha": checkpoint.alpha}


def merged_lora(transformer: Any) -> dict[str, Any] | None:
    """The record of the LoRA merged into ``transformer`` by :func:`load_flowgrpo_lora` (None: none)."""
    record = getattr(transformer, MERGED_ATTRIBUTE, None)
    return dict(record) if isinstance(record, Mapping) else None


def load_flowgrpo_lora(transformer: Any, path: str | Path, field: str = "lora") -> Any:
    """Merge the Flow-GRPO LoRA in ``path`` into ``transformer`` (in place; returned) as
    ``PeftModel.from_pretrained(transformer, path).merge_and_unload()`` does — alpha/r from its
    config — after checking that it fits, and checking after the merge that PEFT adapted exactly
    the modules the file holds. The transformer then records what was merged (:func:`merged_lora`)."""
    checkpoint = check_lora(path, field, transformer)
    if merged_lora(transformer) is not None:
        raise ConfigError(field, f"this {type(transformer).__name__} already has a LoRA merged "
                                 f"({merged_lora(transformer)['path']}); load the base model again")
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from calibri.plugins.dit.models import error_summary, quiet_loading

    device = next((p.device for p in transformer.parameters()), None)
    where = {"torch_device": str(device)} if device is not None else {}  # this worker's device, not cuda:0
    try:
        with quiet_loading():
            wrapped = PeftModel.from_pretrained(transformer, str(checkpoint.folder), is_trainable=False, **where)
    except Exception as exc:  # noqa: BLE001 - PEFT's error on the user's files
        _unload(transformer)
        raise ConfigError(field, f"{checkpoint.folder}: PEFT cannot load it: {error_summary(exc)}") from None
    adapted = {name.removeprefix(KEY_PREFIX) for name, module in wrapped.named_modules() if isinstance(module, LoraLayer)}
    if adapted != set(checkpoint.shapes):
        wrapped.unload()
        odd = sorted(adapted ^ set(checkpoint.shapes))
        raise ConfigError(field, f"{checkpoint.weights}: PEFT adapted {len(adapted)} modules, the file holds "
                                 f"{len(checkpoint.shapes)} (e.g. {odd[0]} differs): not merged")
    import torch

    broken = next((name for name, param in wrapped.named_parameters()
                   if "lora_" in name and not bool(torch.isfinite(param).all())), None)
    if broken is not None:  # refused before anything merges: PEFT merges module by module
        wrapped.unload()
        raise ConfigError(field, f"{checkpoint.weights}: cannot merge: "
                                 f"{broken.removeprefix(KEY_PREFIX).replace('.default', '')} holds NaN or inf")
    try:
        merged = wrapped.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge: the merged weights overflow (fp16)
        raise ConfigError(field, f"{checkpoint.weights}: cannot merge: {error_summary(exc)}; the transformer is "
                                 f"partly merged: load it again") from None
    setattr(merged, MERGED_ATTRIBUTE, lora_record(checkpoint))
    return merged


def _unload(transformer: Any) -> None:
    """Remove LoRA layers a failed PEFT load may have left in ``transformer`` (the base weights
    are untouched until a merge)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is there: the load was tried
        return
    for name, module in list(transformer.named_modules()):
        if isinstance(module, LoraLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = transformer.get_submodule(parent_name) if parent_name else transformer
            setattr(parent, child, module.get_base_layer())
