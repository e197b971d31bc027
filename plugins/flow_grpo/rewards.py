"""The ``flowgrpo`` reward: Flow-GRPO's ``reward_fn`` dict, by its names and on its scales.

``reward_fn: {pickscore: 1.0, jpeg_compressibility: 0.5}`` — the dict of a Flow-GRPO config —
scores each image with every named reward and sums them with the weights, a plain weighted SUM as
Flow-GRPO's ``multi_score`` does (its ``avg``). Each component's scores are kept as the reward's
details, so a calibration logs them as metrics (``reward.pickscore``, ...), and GenEval's
``accuracy``/``strict_accuracy``/``<tag>_accuracy`` too.

Two ways to get the components:

* calibri's own rewards, on Flow-GRPO's scales (:data:`COMPONENTS`): ``pickscore`` = PickScore / 26,
  ``clipscore`` = logit_scale·cos / 30, ``imagereward`` and ``aesthetic`` raw,
  ``jpeg_compressibility`` = −(JPEG kB at quality 95) / 500, ``ocr`` (:mod:`.ocr`), and the server
  clients ``geneval``, ``deqa`` (/ 5) and ``unifiedreward`` (/ 5) (:mod:`.servers`). Options of a
  component go under ``reward_options: {name: {...}}`` (weights' ``path``, a server's ``url`` and
  ``allow_pickle``, ...).
* ``module: flow_grpo.rewards`` — the user's own Flow-GRPO reward module (any importable path),
  imported only then: for each name, the factory ``getattr(module, name)`` (else
  ``{name}_score``, or the attribute ``functions: {name: attribute}`` names) is called — with
  ``device`` only if its signature names ``device`` — and gives ``fn(images, prompts, metadata)
  -> (scores, info)``; GenEval's 5-tuple ``(scores, rewards, strict_rewards, group_rewards,
  group_strict_rewards)`` is read too. Images reach it as Flow-GRPO's rewards receive them: an
  N×3×H×W float tensor in [0, 1] (on ``device``).
"""
from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import pydantic

from calibri.core.errors import IMPORT_HINT, ConfigError
from calibri.core.options import options_model
from calibri.rewards.base import Reward, batch_text, to_canonical
from calibri.rewards.combine import CombinedReward

from .servers import geneval_details, per_image

#: Flow-GRPO reward name → (calibri reward, options giving Flow-GRPO's scale).
COMPONENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "pickscore": ("pickscore", {"scale": "flowgrpo"}),
    "clipscore": ("clipscore", {"scale": "flowgrpo"}),
    "imagereward": ("imagereward", {}),
    "aesthetic": ("aesthetic", {}),
    "jpeg_compressibility": ("jpeg_compressibility", {"quality": 95}),
    "ocr": ("flowgrpo.ocr", {}),
    "geneval": ("flowgrpo.geneval", {}),
    "deqa": ("flowgrpo.deqa", {}),
    "unifiedreward": ("flowgrpo.unifiedreward", {}),
}
#: Flow-GRPO names calibri has no model for (use ``module:`` for them).
WITHOUT_MODEL = ("qwenvl", "hpsv2", "image_similarity", "jpeg_incompressibility", "video_ocr")


def _supported() -> str:
    return ", ".join(COMPONENTS)


class FlowGRPOOptions(pydantic.BaseModel):
    """Options of the ``flowgrpo`` reward (see the module docstring)."""

    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)

    module: str | None = None
    functions: dict[str, str] = {}
    reward_fn: dict[str, Any] = pydantic.Field(..., validate_default=True)
    reward_options: dict[str, dict[str, Any]] = {}
    ocr_engine: Any = None
    only_strict: bool = True
    device: str | None = None

    @pydantic.field_validator("module")
    @classmethod
    def _importable(cls, value: str | None) -> str | None:
        if value is not None:
            import_module(value)
        return value

    @pydantic.field_validator("reward_fn")
    @classmethod
    def _known(cls, value: dict[str, Any], info: pydantic.ValidationInfo) -> dict[str, Any]:
        if not value:
            raise ValueError("needs at least one reward name with its weight, e.g. {pickscore: 1.0}")
        for name, weight in value.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"the weight of {name!r} must be a finite number, got {weight!r}")
        module = info.data.get("module")
        functions = info.data.get("functions") or {}
        for name in value:
            if module is not None:
                factory_of(import_module(module), name, functions)
            elif name not in COMPONENTS:
                why = " (calibri has no model for it" if name in WITHOUT_MODEL else " (unknown"
                raise ValueError(f"reward {name!r} is not supported{why}; supported: {_supported()}; or give "
                                 "module: flow_grpo.rewards to use your own Flow-GRPO reward functions)")
        return value

    @pydantic.field_validator("reward_options")
    @classmethod
    def _named(cls, value: dict[str, dict[str, Any]], info: pydantic.ValidationInfo) -> dict[str, dict[str, Any]]:
        names = info.data.get("reward_fn") or {}
        if info.data.get("module") is not None and value:
            raise ValueError("options of calibri's rewards do not apply with module: (your factories take none)")
        for name in value:
            if name not in names:
                raise ValueError(f"{name!r} is not in reward_fn ({', '.join(names) or 'empty'})")
        return value


def import_module(name: str) -> ModuleType:
    """``name`` imported; a one-line error naming the ``module`` option otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"expected an importable module path such as flow_grpo.rewards, got {name!r}")
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {name!r}: {type(exc).__name__}: {exc}; {IMPORT_HINT}") from None
    except Exception as exc:  # noqa: BLE001 - a user's module failing on import: say so, in one line
        raise ValueError(f"importing module {name!r} failed: {type(exc).__name__}: {exc}") from None


def factory_of(module: ModuleType, name: str, functions: Mapping[str, str]) -> Any:
    """The reward factory for ``name`` in the user's module (see the module docstring)."""
    tried = [functions[name]] if name in functions else [name, f"{name}_score"]
    for attribute in tried:
        factory = getattr(module, attribute, None)
        if callable(factory):
            return factory
    raise ValueError(f"module {module.__name__!r} has no reward factory for {name!r} (looked for "
                     f"{', '.join(tried)}; map it with functions: {{{name}: <attribute>}})")


def _names(callable_: Any) -> set[str]:
    try:
        return set(inspect.signature(callable_).parameters)
    except (TypeError, ValueError):
        return set()


class ModuleReward(Reward):
    """One reward function of a user's Flow-GRPO reward module, as a calibri reward.

    ``fn(images, prompts, metadata)`` gets the canonical batch as a tensor on ``device`` (with
    ``only_strict`` too if it takes it); its scores may be a list, a NumPy array or a tensor."""

    higher_is_better = True
    uses_prompt = True
    needs = "cpu"

    def __init__(self, name: str, factory: Any, *, device: str | None = None, only_strict: bool = True,
                 batch_size: int = 64) -> None:
        super().__init__(batch_size=batch_size, device=device or "cpu")
        self.name, self.only_strict = name, only_strict
        self.fn = factory(device=self.device) if "device" in _names(factory) else factory()
        if not callable(self.fn):
            raise ValueError(f"the factory of {name!r} returned a {type(self.fn).__name__}, not a reward function")
        self._strict = "only_strict" in _names(self.fn)

    def __repr__(self) -> str:
        return f"ModuleReward({self.name!r})"

    def score_with_details(self, images: Any, prompts: Sequence[str] | None = None,
                           metadata: Sequence[Mapping[str, Any]] | None = None
                           ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Scores, and GenEval's details when the function answers its 5-tuple."""
        canonical = to_canonical(images)
        n = canonical.shape[0]
        prompts, metadata = batch_text(n, prompts, metadata)
        batch = canonical.to(self.device) if self.device != "cpu" else canonical
        extra = {"only_strict": self.only_strict} if self._strict else {}
        result = self.fn(batch, list(prompts), [dict(m) for m in metadata], **extra)
        if not isinstance(result, tuple) or len(result) not in (2, 5):
            raise ValueError(f"reward function {self.name!r} returned {type(result).__name__}, not "
                             "(scores, info) or GenEval's 5-tuple")
        scores = per_image(_plain(result[0]), n, f"scores of {self.name!r}")
        details: dict[str, np.ndarray] = {}
        if len(result) == 5:
            parts = dict(zip(("rewards", "strict_rewards", "group_rewards", "group_strict_rewards"),
                             (_plain(part) for part in result[1:])))
            details = geneval_details(parts, n)
        return scores, details

    def score(self, images, prompts, metadata):
        return self.score_with_details(images, prompts, metadata)[0]


def _plain(values: Any) -> Any:
    """Tensors and arrays (possibly on a GPU) as lists; mappings with their values converted."""
    if isinstance(values, Mapping):
        return {key: _plain(value) for key, value in values.items()}
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    if isinstance(values, np.ndarray):
        return values.astype(np.float64).reshape(-1).tolist()
    if isinstance(values, (list, tuple)):
        return [float(v) if isinstance(v, np.generic) or hasattr(v, "item") else v for v in values]
    return values


class FlowGRPOReward(CombinedReward):
    """The weighted sum of Flow-GRPO-named components; the details hold every component's scores
    and the extra details a component gives (GenEval's accuracies)."""

    def _score_components(self, images: Any, prompts: Sequence[str] | None,
                          metadata: Sequence[Mapping[str, Any]] | None) -> dict[str, np.ndarray]:
        canonical = to_canonical(images)
        n = canonical.shape[0]
        prompts, metadata = batch_text(n, prompts, metadata)
        per_reward: dict[str, np.ndarray] = {}
        extras: dict[str, np.ndarray] = {}
        for label, reward in self.rewards.items():
            if hasattr(reward, "score_with_details"):
                scores, details = reward.score_with_details(canonical, prompts, metadata)
                for key, values in details.items():
                    extras[key if key not in self.rewards else f"{label}.{key}"] = np.asarray(values, np.float64)
            else:
                scores = reward(canonical, prompts, metadata)
            per_reward[label] = np.asarray(scores, dtype=np.float64)
        return {**per_reward, **{k: v for k, v in extras.items() if k not in per_reward}}


@options_model(FlowGRPOOptions)
def flowgrpo(device: str | None = None, **options: Any) -> FlowGRPOReward:
    """Flow-GRPO's reward_fn {name: weight}: its rewards on its scales, weighted sum."""
    opts = FlowGRPOOptions.model_construct(**options)
    device = opts.device or device
    rewards: dict[str, Reward] = {}
    if opts.module is not None:
        module = import_module(opts.module)
        for name in opts.reward_fn:
            rewards[name] = ModuleReward(name, factory_of(module, name, opts.functions), device=device,
                                         only_strict=opts.only_strict)
    else:
        from calibri.rewards.combine import build_reward

        for name in opts.reward_fn:
            calibri_name, defaults = COMPONENTS[name]
            given = dict(opts.reward_options.get(name, {}))
            if name == "ocr" and opts.ocr_engine is not None:
                given.setdefault("ocr_engine", opts.ocr_engine)
            if name == "geneval":
                given.setdefault("only_strict", opts.only_strict)
            try:
                rewards[name] = build_reward({"name": calibri_name, "options": {**defaults, **given}},
                                             field=f"reward_options.{name}", device=device)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
    return FlowGRPOReward(rewards, {name: float(w) for name, w in opts.reward_fn.items()}, mode="sum")


__all__ = ["COMPONENTS", "FlowGRPOOptions", "FlowGRPOReward", "ModuleReward", "WITHOUT_MODEL", "factory_of",
           "flowgrpo", "import_module"]
