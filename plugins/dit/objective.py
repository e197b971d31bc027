"""The Calibri objective: a candidate's scales → images of a bucket of prompts → mean reward.

Registered as the objective ``calibri``. One worker loads the pipeline once, attaches the
calibration once, and for each candidate writes its values in place, generates the round's
images (the round's prompts, one shared seed: common random numbers) and scores them. The value is
the mean reward; the metrics hold its standard error and every reward component's (or the toy
oracle's every term's) mean. The same objective, given the validation split, scores held-out
prompts with fixed seeds — that is what selects the run's result (``validation.every``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from calibri.core.errors import ConfigError, UserError
from calibri.core.objective import EvalResult, Objective, RoundContext
from calibri.core.space import Params, Space

Granularity = Literal["block", "layer", "gate"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class CalibriOptions:
    """The options of the ``calibri`` objective (YAML: ``objective.options``)."""

    model: str = "toy"
    model_config: str | None = None
    granularity: Granularity = "layer"
    copies: int = 1
    form: Literal["single", "distilled", "cfg"] | None = None
    guidance_scale: float | None = None
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
    pipeline_options: dict[str, Any] = field(default_factory=dict)
    dtype: DType = "auto"
    text_encoders_to_cpu: bool = False
    device: str | None = None

    def __post_init__(self) -> None:
        for name in ("copies", "time_buckets", "bucket_size", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"objective.options.{name}", f"must be at least 1, got {getattr(self, name)}")
        if self.validation_seed < 0:
            raise ConfigError("objective.options.validation_seed", f"must be at least 0, got {self.validation_seed}")
        if self.form == "cfg" and (self.guidance_scale is None or self.guidance_scale == 1.0):
            raise ConfigError("objective.options.guidance_scale", "the cfg form needs the guidance scale it starts from (not 1)")


def calibri_objective(model: str = "toy", model_config: str | None = None, granularity: Granularity = "layer",
                      copies: int = 1, form: Literal["single", "distilled", "cfg"] | None = None,
                      guidance_scale: float | None = None, time_buckets: int = 1, with_omega: bool = True,
                      sigma: float = 0.25,
                      omega_sigma: float | None = None, reward: Any = "toy_oracle", prompts: Any = "toy/calibration",
                      validation_prompts: Any = "toy/validation", bucket_size: int = 16, validation_seed: int = 0,
                      steps: int = 15, height: int | None = None, width: int | None = None, batch_size: int = 16,
                      negative_prompt: str | None = None, pipeline_options: dict[str, Any] | None = None,
                      dtype: DType = "auto", text_encoders_to_cpu: bool = False,
                      device: str | None = None) -> "CalibriObjective":
    """Calibrate ``model`` (a pipeline folder, a hub id, or ``toy``) against ``reward``.

    ``time_buckets`` > 1 gives every scale and ω one value per interval of the noise level
    (timestep-dependent calibration; not bakeable into weights)."""
    options = dict(locals())
    options["pipeline_options"] = pipeline_options or {}
    return CalibriObjective(CalibriOptions(**options))


def _options(options: Mapping[str, Any]) -> CalibriOptions:
    known = set(CalibriOptions.__dataclass_fields__)
    values = {k: v for k, v in options.items() if k in known}
    if values.get("pipeline_options") is None:
        values.pop("pipeline_options", None)
    return CalibriOptions(**values)


def calibrator_for(transformer: Any, opts: CalibriOptions) -> Any:
    from .calibration import Calibrator

    try:
        return Calibrator(transformer, opts.granularity, opts.copies, opts.form, opts.guidance_scale,
                          time_buckets=opts.time_buckets)
    except ValueError as exc:
        raise ConfigError("objective.options", str(exc)) from None


def calibri_space(**options: Any) -> Space:
    """The search space, from the transformer's config on the meta device (no weights loaded)."""
    from .models import build_on_meta, transformer_config

    opts = _options(options)
    try:
        meta = build_on_meta(transformer_config(opts.model, opts.model_config))
    except UserError as exc:
        raise ConfigError("objective.options.model", str(exc)) from None
    return calibrator_for(meta, opts).space(opts.with_omega, opts.sigma, opts.omega_sigma)


def check_calibri(**options: Any) -> None:
    """Cheap checks before anything heavy is built: prompt files, reward spec names."""
    from .prompts import load_prompts

    opts = _options(options)
    load_prompts(opts.prompts, "objective.options.prompts")
    if opts.validation_prompts is not None:
        load_prompts(opts.validation_prompts, "objective.options.validation_prompts")
    _check_reward_spec(opts.reward)


def _check_reward_spec(spec: Any) -> None:
    from calibri.core.plugins import get_registry

    names = [spec] if isinstance(spec, str) else [spec.get("name")] if isinstance(spec, Mapping) and "name" in spec else []
    registry = get_registry()
    for name in names:
        registry.get("rewards", name, "objective.options.reward")


def calibri_stream(seed: int, **options: Any) -> Any:
    from .prompts import PromptStream, load_prompts

    opts = _options(options)
    train = load_prompts(opts.prompts, "objective.options.prompts")
    validation = (load_prompts(opts.validation_prompts, "objective.options.validation_prompts")
                  if opts.validation_prompts is not None else None)
    return PromptStream(train, opts.bucket_size, seed, validation, opts.validation_seed)


class CalibriObjective(Objective):
    direction = "maximize"

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
        self.reward = build_reward(opts.reward, field="objective.options.reward", device=device)
        self.generator = ImageGenerator(self.pipe, opts.steps, opts.guidance_scale, opts.height, opts.width,
                                        opts.batch_size, opts.negative_prompt, opts.pipeline_options)
        if opts.text_encoders_to_cpu:
            for spec in (opts.prompts, opts.validation_prompts):
                if spec is not None:
                    self.generator.encode(load_prompts(spec, "objective.options.prompts").prompts)
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


def options_dict(opts: CalibriOptions) -> dict[str, Any]:
    return asdict(opts)
