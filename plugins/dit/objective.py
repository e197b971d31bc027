"""The Calibri objective: a candidate's scales → images of a bucket of prompts → mean reward.

Registered as the objective ``calibri``. One worker loads the pipeline once, attaches the
calibration once, and for each candidate writes its values in place, generates the round's
images (the round's prompts, one shared seed: common random numbers) and scores them. The value is
the mean reward; the metrics hold its standard error and every reward component's (or the toy
oracle's every term's) mean. The run's direction is the reward's: maximised when higher is better,
minimised otherwise (``total_variation``). The same objective, given the validation split, scores
held-out prompts with fixed seeds — that is what selects the run's result (``validation.every``).

Its options are declared once, by :class:`CalibriOptions`: the run's config is validated against
it (:func:`calibri.core.options.validate_options`), and the factory and its extras (``space``,
``check``, ``stream``) receive the validated options and build the model without validating again.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pydantic

from calibri.core.errors import ConfigError, UserError
from calibri.core.objective import EvalResult, Objective, RoundContext
from calibri.core.options import options_model
from calibri.core.space import Params, Space

Granularity = Literal["block", "layer", "gate"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
FIELD = "objective.options"


class CalibriOptions(pydantic.BaseModel):
    """The options of the ``calibri`` objective (YAML: ``objective.options``), declared once.

    A run checks its config against this model (:func:`~calibri.core.options.validate_options`:
    one-line errors naming ``objective.options.<option>``); the factory and its extras then build
    it from those checked values with :meth:`trusted`, without validating again. Built directly
    (``CalibriOptions(model=..., steps=...)``) it is validated by pydantic. The option
    ``model_config`` is the attribute :attr:`transformer_config` (pydantic owns the name
    ``model_config``).
    """

    model_config = pydantic.ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    model: str = "toy"
    transformer_config: str | None = pydantic.Field(None, alias="model_config")
    granularity: Granularity = "layer"
    copies: int = 1
    form: Literal["single", "distilled", "cfg"] | None = None
    guidance_scale: float | None = pydantic.Field(None, validate_default=True)
    time_buckets: int = 1
    with_omega: bool = True
    sigma: float = 0.25
    omega_sigma: float | None = None
    reward: Any = "toy_oracle"
    prompts: Any = "toy/calibration"
    validation_prompts: Any = "toy/validation"
    bucket_size: int = 16
    validation_seed: int = 0
    steps: int = 15
    height: int | None = None
    width: int | None = None
    batch_size: int = 16
    negative_prompt: str | None = None
    pipeline_options: dict[str, Any] = pydantic.Field(default_factory=dict)
    dtype: DType = "auto"
    text_encoders_to_cpu: bool = False
    device: str | None = None  # set by the executor, never by the config

    @classmethod
    def trusted(cls, options: Mapping[str, Any]) -> "CalibriOptions":
        """The options from values ``validate_options`` already checked (not validated again)."""
        return cls.model_construct(**options)

    @pydantic.field_validator("copies", "time_buckets", "bucket_size", "steps", "batch_size")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value

    @pydantic.field_validator("validation_seed")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"must be at least 0, got {value}")
        return value

    @pydantic.field_validator("guidance_scale")
    @classmethod
    def _cfg_needs_guidance(cls, value: float | None, info: pydantic.ValidationInfo) -> float | None:
        if info.data.get("form") == "cfg" and (value is None or value == 1.0):
            raise ValueError("the cfg form needs the guidance scale it starts from (not 1)")
        return value

    @pydantic.field_validator("pipeline_options", mode="before")
    @classmethod
    def _no_pipeline_options(cls, value: Any) -> Any:
        return {} if value is None else value


@options_model(CalibriOptions)
def calibri_objective(device: str | None = None, **options: Any) -> "CalibriObjective":
    """Calibrate ``model`` (a pipeline folder, a hub id, or ``toy``) against ``reward``.

    ``options`` are :class:`CalibriOptions`' (validated by calibri before the call).
    ``time_buckets`` > 1 gives every scale and ω one value per interval of the noise level
    (timestep-dependent calibration; not bakeable into weights)."""
    return CalibriObjective(CalibriOptions.trusted({**options, "device": device}))


def calibrator_for(transformer: Any, opts: CalibriOptions) -> Any:
    from .calibration import Calibrator

    try:
        return Calibrator(transformer, opts.granularity, opts.copies, opts.form, opts.guidance_scale,
                          time_buckets=opts.time_buckets)
    except ValueError as exc:
        raise ConfigError(FIELD, str(exc)) from None


def calibri_space(**options: Any) -> Space:
    """The search space, from the transformer's config on the meta device (no weights loaded)."""
    from .models import build_on_meta, transformer_config

    opts = CalibriOptions.trusted(options)
    try:
        meta = build_on_meta(transformer_config(opts.model, opts.transformer_config))
    except UserError as exc:
        raise ConfigError(f"{FIELD}.model", str(exc)) from None
    return calibrator_for(meta, opts).space(opts.with_omega, opts.sigma, opts.omega_sigma)


def check_calibri(**options: Any) -> None:
    """Cheap checks before anything heavy is built: prompt files, reward spec names."""
    from .prompts import load_prompts

    opts = CalibriOptions.trusted(options)
    load_prompts(opts.prompts, f"{FIELD}.prompts")
    if opts.validation_prompts is not None:
        load_prompts(opts.validation_prompts, f"{FIELD}.validation_prompts")
    _check_reward_spec(opts.reward)


def _check_reward_spec(spec: Any) -> None:
    from calibri.core.plugins import get_registry

    names = [spec] if isinstance(spec, str) else [spec.get("name")] if isinstance(spec, Mapping) and "name" in spec else []
    registry = get_registry()
    for name in names:
        registry.get("rewards", name, f"{FIELD}.reward")


def calibri_stream(seed: int, **options: Any) -> Any:
    from .prompts import PromptStream, load_prompts

    opts = CalibriOptions.trusted(options)
    train = load_prompts(opts.prompts, f"{FIELD}.prompts")
    validation = (load_prompts(opts.validation_prompts, f"{FIELD}.validation_prompts")
                  if opts.validation_prompts is not None else None)
    return PromptStream(train, opts.bucket_size, seed, validation, opts.validation_seed)


class CalibriObjective(Objective):
    """The objective ``calibri`` builds: its direction is its reward's (see the module's docstring)."""

    def __init__(self, opts: CalibriOptions) -> None:
        from calibri.rewards.combine import build_reward

        from .generation import ImageGenerator
        from .models import load_pipeline
        from .prompts import load_prompts

        self.options = opts
        device = opts.device or "cpu"
        self.pipe = load_pipeline(opts.model, opts.dtype, device)
        self.calibrator = calibrator_for(self.pipe.transformer, opts).attach()
        self.space = self.calibrator.space(opts.with_omega, opts.sigma, opts.omega_sigma)
        self.reward = build_reward(opts.reward, field=f"{FIELD}.reward", device=device)
        self.direction = "maximize" if self.reward.higher_is_better else "minimize"
        self.generator = ImageGenerator(self.pipe, opts.steps, opts.guidance_scale, opts.height, opts.width,
                                        opts.batch_size, opts.negative_prompt, opts.pipeline_options)
        if opts.text_encoders_to_cpu:
            for spec in (opts.prompts, opts.validation_prompts):
                if spec is not None:
                    self.generator.encode(load_prompts(spec, f"{FIELD}.prompts").prompts)
            self.generator.text_encoders_to_cpu()

    # -- the contract -----------------------------------------------------------------------
    def evaluate(self, candidates: Sequence[Params], ctx: RoundContext) -> list[EvalResult]:
        prompts = list(ctx.data.get("prompts") or [])
        if not prompts:
            raise ValueError("the round carries no prompts (ctx.data['prompts'])")
        metadata = list(ctx.data.get("metadata") or [{} for _ in prompts])
        steps = ctx.data.get("steps")
        return [self.score(params, prompts, metadata, ctx.seed, steps) for params in candidates]

    def close(self) -> None:
        self.calibrator.detach()

    # -- building blocks (also used by reports and ``calibri evaluate``) -----------------------
    def images(self, params: Params | None, prompts: Sequence[str], seed: int, steps: int | None = None) -> Any:
        """Images for ``params`` (None: the identity calibration) — N×3×H×W in [0, 1]."""
        self.calibrator.reset()  # names a candidate leaves out (e.g. ω when not searched) are at identity
        if params is not None:
            self.calibrator.set_values(dict(params))
        return self.generator.generate(prompts, seed, steps)

    def score(self, params: Params | None, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]],
              seed: int, steps: int | None = None) -> EvalResult:
        images = self.images(params, prompts, seed, steps)
        scores, details = score_images(self.reward, images, prompts, metadata)
        n = len(scores)
        metrics = {"reward_sem": float(scores.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0}
        metrics.update({f"reward.{name}": float(np.mean(values)) for name, values in details.items()})
        return EvalResult(value=float(scores.mean()), metrics=metrics, artifacts={"n_images": n})


def score_images(reward: Any, images: Any, prompts: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-image scores and, where the reward offers them, per-component scores."""
    if hasattr(reward, "score_with_details"):
        total, details = reward.score_with_details(images, list(prompts), list(metadata))
        return np.asarray(total, dtype=np.float64), {k: np.asarray(v) for k, v in details.items()}
    return np.asarray(reward(images, list(prompts), list(metadata)), dtype=np.float64), {}

