"""The Calibri objective: a candidate's scales → images of a bucket of prompts → mean reward.

Registered as the objective ``calibri``. One worker loads the pipeline once, attaches the
calibration once, and for each candidate writes its values in place, generates the round's
images (the round's prompts, one shared seed: common random numbers) and scores them. The value is
the mean reward; the metrics hold its standard error and every reward component's (or the toy
oracle's every term's) mean. Given several step counts (``steps: [2, 4]``), every candidate is
scored at each on the same prompts and seeds and the per-NFE means are combined (``steps_combine``:
their mean, or the worst of them), so one calibration serves a range of NFEs; the per-NFE means are
kept as ``reward@<n>`` metrics. The run's direction is the reward's: maximised when higher is better,
minimised otherwise (``total_variation``). The same objective, given the validation split, scores
held-out prompts with fixed seeds — that is what selects the run's result (``validation.every``).

Its options are declared once, by :class:`CalibriOptions`: the run's config is validated against
it (:func:`calibri.core.options.validate_options`), and the factory and its extras (``space``,
``check``, ``stream``) receive the validated options and build the model without validating again.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pydantic

from calibri.core.errors import ConfigError, UserError
from calibri.core.objective import EvalResult, Objective, RoundContext
from calibri.core.options import options_model
from calibri.core.space import Params, Space

if TYPE_CHECKING:
    from .buckets import BucketSchedule
    from .calibration import Calibrator

Granularity = Literal["block", "layer", "gate"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
FIELD = "objective.options"

#: Upper bounds of the sizes the options set, so a typo (``1e6``) is refused before anything is
#: built, never run for days: sampling steps, prompts per round, images per pipeline call, image
#: side in pixels, and the magnitude of a guidance scale.
MAX_STEPS = 1000
MAX_BUCKET_SIZE = 1024
MAX_BATCH_SIZE = 1024
MAX_IMAGE_SIDE = 16384
MAX_GUIDANCE = 100.0
#: At most this many step counts in ``steps`` (each one costs a full generation per candidate).
MAX_NFES = 16
#: Pipeline arguments the objective sets itself, and the option that sets each (None: internal);
#: the guidance argument is added per pipeline family (``guidance_scale``, ``true_cfg_scale``).
MANAGED_ARGUMENTS: dict[str, str | None] = {
    "num_inference_steps": "steps", "height": "height", "width": "width", "negative_prompt": "negative_prompt",
    "prompt": None, "prompt_2": None, "prompt_3": None, "prompt_embeds": None, "pooled_prompt_embeds": None,
    "prompt_embeds_mask": None, "negative_prompt_embeds": None, "negative_pooled_prompt_embeds": None,
    "negative_prompt_embeds_mask": None, "prompt_attention_mask": None, "negative_prompt_attention_mask": None,
    "generator": None, "output_type": None, "return_dict": None,
}


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
    lora: str | None = None
    granularity: Granularity = "layer"
    copies: int = 1
    form: Literal["single", "distilled", "cfg"] | None = None
    guidance_scale: float | None = pydantic.Field(None, validate_default=True)
    time_buckets: int = 1
    with_omega: bool = True
    omega_sum: tuple[float, float] | None = None
    sigma: float = 0.25
    omega_sigma: float | None = None
    reward: Any = "toy_oracle"
    prompts: Any = "toy/calibration"
    validation_prompts: Any = "toy/validation"
    bucket_size: int | list[tuple[int, int]] = 16  # a count, or [[first_round, size], ...] (buckets.py)
    validation_seed: int = 0
    steps: int | list[int] = 15
    steps_combine: Literal["mean", "worst"] = "mean"
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

    @property
    def step_counts(self) -> tuple[int, ...]:
        """The NFEs the calibration is made for, ascending (one for ``steps: 4``)."""
        return (self.steps,) if isinstance(self.steps, int) else tuple(self.steps)

    @property
    def bucket_schedule(self) -> "BucketSchedule":
        """Prompts per round as a schedule (one step from round 0 for a fixed ``bucket_size``)."""
        from .buckets import BucketSchedule

        return BucketSchedule.of(self.bucket_size)

    @pydantic.field_validator("bucket_size", mode="before")
    @classmethod
    def _bucket_size(cls, value: Any) -> Any:
        from .buckets import check_bucket_size

        return check_bucket_size(value, MAX_BUCKET_SIZE)

    @pydantic.field_validator("copies", "time_buckets", "batch_size")
    @classmethod
    def _count(cls, value: int, info: pydantic.ValidationInfo) -> int:
        from .calibration import MAX_COPIES, MAX_TIME_BUCKETS

        if value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        most = {"copies": MAX_COPIES, "time_buckets": MAX_TIME_BUCKETS, "batch_size": MAX_BATCH_SIZE}[info.field_name]
        if value > most:
            raise ValueError(f"must be at most {most}, got {value}")
        return value

    @pydantic.field_validator("steps", mode="before")
    @classmethod
    def _step_counts(cls, value: Any) -> int | list[int]:
        """A step count, a list of them, or an inclusive range ``"FIRST..LAST"``; a list comes out
        ascending, so ``[4, 2]`` and ``[2, 4]`` are the same calibration."""
        if isinstance(value, str) and ".." in value:
            first, _, last = value.partition("..")
            try:
                low, high = int(first), int(last)
            except ValueError:
                raise ValueError(f"a range is written FIRST..LAST (e.g. 2..8), got {value!r}") from None
            if low > high:
                raise ValueError(f"the range {value!r} is empty (FIRST is above LAST)")
            if high - low + 1 > MAX_NFES:
                raise ValueError(f"at most {MAX_NFES} step counts, got {high - low + 1} in {value!r}")
            counts = list(range(low, high + 1))
        elif isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("give at least one step count")
            if len(value) > MAX_NFES:
                raise ValueError(f"at most {MAX_NFES} step counts, got {len(value)}")
            counts = [_step_count(item) for item in value]
            repeated = sorted({c for c in counts if counts.count(c) > 1})
            if repeated:
                raise ValueError(f"lists {', '.join(map(str, repeated))} more than once")
            return sorted(counts)
        else:
            return _step_count(value)
        for count in counts:
            _step_count(count)
        return counts

    @pydantic.field_validator("omega_sum")
    @classmethod
    def _omega_sum(cls, value: tuple[float, float] | None,
                   info: pydantic.ValidationInfo) -> tuple[float, float] | None:
        if value is None:
            return None
        low, high = value
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ValueError(f"must be [LOW, HIGH] with finite LOW <= HIGH, got {list(value)!r}")
        if not low <= 1.0 <= high:  # every form starts at sum 1: plain CFG, or the model as it is
            raise ValueError(f"must contain 1, the sum at the starting point, got {list(value)!r}")
        if info.data.get("with_omega") is False:
            raise ValueError("bounds the searched ω: needs with_omega: true")
        return (float(low), float(high))

    @pydantic.field_validator("height", "width")
    @classmethod
    def _image_side(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= MAX_IMAGE_SIDE:
            raise ValueError(f"must be between 1 and {MAX_IMAGE_SIDE} pixels, got {value}")
        return value

    @pydantic.field_validator("sigma", "omega_sigma")
    @classmethod
    def _step_size(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"must be a positive finite number, got {value!r}")
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
        if value is not None and not (math.isfinite(value) and abs(value) <= MAX_GUIDANCE):
            raise ValueError(f"must be a finite number between {-MAX_GUIDANCE:g} and {MAX_GUIDANCE:g}, got {value!r}")
        if info.data.get("form") == "cfg" and (value is None or value == 1.0):
            raise ValueError("the cfg form needs the guidance scale it starts from (not 1)")
        return value

    @pydantic.field_validator("pipeline_options", mode="before")
    @classmethod
    def _no_pipeline_options(cls, value: Any) -> Any:
        return {} if value is None else value

    @pydantic.field_validator("pipeline_options")
    @classmethod
    def _not_managed(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in MANAGED_ARGUMENTS:
                option = MANAGED_ARGUMENTS[key]
                raise ValueError(f"{key!r} is set by calibri" + (f": use objective.options.{option}" if option else ""))
        return value


def _step_count(value: Any) -> int:
    """One step count: an integer (or an integral number) from 1 to MAX_STEPS."""
    if isinstance(value, bool):
        raise ValueError(f"expected a step count, got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"expected a step count, a list of them or a range FIRST..LAST, got {value!r}") from None
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"expected a whole number of steps, got {value!r}")
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"expected a step count, a list of them or a range FIRST..LAST, got {value!r}")
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    if value > MAX_STEPS:
        raise ValueError(f"must be at most {MAX_STEPS}, got {value}")
    return value


def project_omega(params: Params, names: Sequence[Sequence[str]], bounds: tuple[float, float]) -> Params:
    """``params`` with each time bucket's ω shifted, all by the same amount, so their sum lies in
    ``bounds`` (the nearest such point: a Euclidean projection). ``names`` lists each bucket's ω
    names; a bucket already inside is left exactly as it is."""
    low, high = bounds
    out = dict(params)
    for bucket in names:
        present = [name for name in bucket if name in out]
        if not present:
            continue
        total = math.fsum(float(out[name]) for name in present)
        target = min(max(total, low), high)
        if target != total:
            shift = (target - total) / len(present)
            for name in present:
                out[name] = float(out[name]) + shift
    return out


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


def meta_calibrator(options: Mapping[str, Any]) -> tuple[Any, Calibrator, CalibriOptions]:
    """The transformer built from its config on the meta device (no weights loaded), its calibrator
    and the checked options; a config that cannot be read is a ``ConfigError`` naming the field."""
    from .models import build_on_meta, transformer_config

    opts = CalibriOptions.trusted(options)
    field = f"{FIELD}.model_config" if opts.transformer_config is not None else f"{FIELD}.model"
    try:
        meta = build_on_meta(transformer_config(opts.model, opts.transformer_config))
    except UserError as exc:
        raise ConfigError(field, str(exc)) from None
    return meta, calibrator_for(meta, opts), opts


def calibri_space(**options: Any) -> Space:
    """The search space, from the transformer's config on the meta device (no weights loaded)."""
    _, calibrator, opts = meta_calibrator(options)
    return calibrator.space(opts.with_omega, opts.sigma, opts.omega_sigma)


def check_calibri(**options: Any) -> None:
    """Cheap checks before anything heavy is built: prompt files, reward spec names and devices,
    and, where the model is a local folder, the image size and pipeline options against its
    pipeline class and configs (no weights are loaded)."""
    from .models import check_pipeline_source, pipeline_class, pixel_multiple
    from .prompts import load_prompts

    opts = CalibriOptions.trusted(options)
    prompt_sets = {f"{FIELD}.prompts": load_prompts(opts.prompts, f"{FIELD}.prompts")}
    if opts.validation_prompts is not None:
        field = f"{FIELD}.validation_prompts"
        prompt_sets[field] = load_prompts(opts.validation_prompts, field)
    check_reward_spec(opts.reward)
    for field, prompts in prompt_sets.items():
        check_reward_prompts(opts.reward, prompts, field)
    try:
        check_pipeline_source(opts.model)
        cls, multiple = pipeline_class(opts.model), pixel_multiple(opts.model)
    except UserError as exc:
        raise ConfigError(f"{FIELD}.model", str(exc)) from None
    check_pipeline_arguments(cls, opts, multiple)
    if opts.lora is not None:
        check_lora_option(opts)


def check_lora_option(opts: CalibriOptions) -> None:
    """The ``lora`` folder's files, and, where the transformer's config is at hand (a local folder
    or ``model_config``), that the LoRA fits its modules — on the meta device, no weights loaded."""
    from calibri.plugins.flow_grpo.lora import check_lora

    from .models import build_on_meta, transformer_config

    try:
        meta = build_on_meta(transformer_config(opts.model, opts.transformer_config))
    except UserError:
        meta = None  # a hub id without model_config: checked against the real model once it loads
    check_lora(opts.lora, f"{FIELD}.lora", meta)


def check_reward_spec(spec: Any, field: str = f"{FIELD}.reward") -> None:
    """The reward names ``spec`` gives are registered, and the devices it holds exist here."""
    from calibri.core.plugins import get_registry

    names = [spec] if isinstance(spec, str) else [spec.get("name")] if isinstance(spec, Mapping) and "name" in spec else []
    registry = get_registry()
    for name in names:
        registry.get("rewards", name, field)
    _check_devices_in(spec, field)


def reward_names(spec: Any) -> set[str]:
    """Every reward name a reward spec mentions (a combined reward's components included)."""
    names: set[str] = set()
    if isinstance(spec, str):
        names.add(spec)
    elif isinstance(spec, Mapping):
        if isinstance(spec.get("name"), str):
            names.add(spec["name"])
            options = spec.get("options")
            if isinstance(options, Mapping) and "components" in options:
                names |= reward_names(options["components"])
        elif "components" in spec:
            names |= reward_names(spec["components"])
        else:  # {label: weight} or {label: {name, weight, options}}
            for key, value in spec.items():
                names |= reward_names(value) if isinstance(value, Mapping) and "name" in value else {str(key)}
    elif isinstance(spec, (list, tuple)):
        for item in spec:
            names |= reward_names(item)
    return names


def check_reward_prompts(spec: Any, prompts: Any, field: str) -> None:
    """Let each reward of ``spec`` refuse prompts it cannot score (the toy oracle scores toy-world
    prompts only) before any image is made: a reward factory's optional ``check_prompts(prompts,
    metadata, field)``."""
    from calibri.core.plugins import get_registry

    registry = get_registry()
    for name in sorted(reward_names(spec)):
        try:
            registration = registry.get("rewards", name)
        except ConfigError:
            continue
        check = getattr(registration.factory, "check_prompts", None)
        if callable(check):
            check(list(prompts.prompts), list(prompts.metadata), field)


def _check_devices_in(spec: Any, field: str) -> None:
    """Every ``device: ...`` anywhere in a reward spec (a component's options included) names a
    device this machine has: refused now, not after the model has loaded."""
    from .models import check_device

    if isinstance(spec, Mapping):
        for key, value in spec.items():
            where = f"{field}.{key}"
            if key == "device" and value is not None:
                check_device(value, where)
            else:
                _check_devices_in(value, where)
    elif isinstance(spec, (list, tuple)):
        for i, value in enumerate(spec):
            _check_devices_in(value, f"{field}[{i}]")


def check_pipeline_arguments(cls: Any, opts: CalibriOptions, multiple: int | None) -> None:
    """``height``/``width`` and ``pipeline_options`` against the pipeline class's ``__call__``
    (when known) and the multiple its image sides must be (when known); errors name the option."""
    import inspect

    from .family import family_for, unknown_pipeline_message

    for name in ("height", "width"):
        value = getattr(opts, name)
        if value is not None and multiple is not None and value % multiple:
            raise ConfigError(f"{FIELD}.{name}", f"must be a multiple of {multiple} for this model "
                                                 f"(its VAE and patch size), got {value}")
    if cls is None:
        return
    family = family_for(cls)
    if family is None:
        raise ConfigError(f"{FIELD}.model", unknown_pipeline_message(cls.__name__))
    guidance = family.guidance_argument
    if guidance in opts.pipeline_options:
        raise ConfigError(f"{FIELD}.pipeline_options.{guidance}",
                          f"{guidance!r} is set by calibri: use objective.options.guidance_scale")
    for key in opts.pipeline_options:
        if key in family.arguments:  # a plugin family's own encoding arguments
            raise ConfigError(f"{FIELD}.pipeline_options.{key}", f"{key!r} is set by calibri")
    try:
        parameters = inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    for name in ("height", "width"):
        if getattr(opts, name) is not None and name not in parameters:
            raise ConfigError(f"{FIELD}.{name}", f"{cls.__name__} makes images of a fixed size; leave {name} unset")
    known = sorted(p for p in parameters if p not in ("self", guidance) and p not in MANAGED_ARGUMENTS)
    for key in opts.pipeline_options:
        if key not in parameters:
            listed = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
            raise ConfigError(f"{FIELD}.pipeline_options.{key}",
                              f"{cls.__name__} takes no argument {key!r} (it takes: {listed or 'none'})")


def calibri_stream(seed: int, **options: Any) -> Any:
    from .prompts import PromptStream, load_prompts

    opts = CalibriOptions.trusted(options)
    train = load_prompts(opts.prompts, f"{FIELD}.prompts")
    validation = (load_prompts(opts.validation_prompts, f"{FIELD}.validation_prompts")
                  if opts.validation_prompts is not None else None)
    return PromptStream(train, opts.bucket_schedule, seed, validation, opts.validation_seed)


class CalibriObjective(Objective):
    """The objective ``calibri`` builds: its direction is its reward's (see the module's docstring)."""

    def __init__(self, opts: CalibriOptions) -> None:
        from calibri.rewards.combine import build_reward

        from .generation import ImageGenerator
        from .models import load_pipeline, loaded_pixel_multiple
        from .prompts import load_prompts

        self.options = opts
        device = opts.device or "cpu"
        try:
            self.pipe = load_pipeline(opts.model, opts.dtype, device)
        except UserError as exc:
            raise ConfigError(f"{FIELD}.model", str(exc)) from None
        check_pipeline_arguments(type(self.pipe), opts, loaded_pixel_multiple(self.pipe))  # a hub id: now
        if opts.lora is not None:  # merged before the hooks: the calibration is made on the adapted model
            from calibri.plugins.flow_grpo.lora import load_flowgrpo_lora

            self.pipe.transformer = load_flowgrpo_lora(self.pipe.transformer, opts.lora, f"{FIELD}.lora")
        self.calibrator = calibrator_for(self.pipe.transformer, opts).attach()
        self.space = self.calibrator.space(opts.with_omega, opts.sigma, opts.omega_sigma)
        self.reward = build_reward(opts.reward, field=f"{FIELD}.reward", device=device)
        self.direction = "maximize" if self.reward.higher_is_better else "minimize"
        self.step_counts = opts.step_counts
        self.generator = ImageGenerator(self.pipe, self.step_counts[0], opts.guidance_scale, opts.height, opts.width,
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
    def feasible(self, params: Params | None) -> tuple[Params | None, bool]:
        """``(values, projected)``: the values images are made with — ``params`` with each time
        bucket's ω moved into ``omega_sum`` when that guard is set — and whether they moved."""
        bounds = self.options.omega_sum
        if params is None or bounds is None:
            return params, False
        omega = self.calibrator.parameter_names()[-self.calibrator.rows:]
        per_bucket = [omega[b * self.calibrator.copies : (b + 1) * self.calibrator.copies]
                      for b in range(self.calibrator.time_buckets)]
        projected = project_omega(params, per_bucket, bounds)
        return projected, projected != dict(params)

    def images(self, params: Params | None, prompts: Sequence[str], seed: int, steps: int | None = None) -> Any:
        """Images for ``params`` (None: the identity calibration) — N×3×H×W in [0, 1]."""
        self._set(self.feasible(params)[0])
        return self.generator.generate(prompts, seed, steps)

    def _set(self, values: Params | None) -> None:
        self.calibrator.reset()  # names a candidate leaves out (e.g. ω when not searched) are at identity
        if values is not None:
            self.calibrator.set_values(dict(values))

    def score(self, params: Params | None, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]],
              seed: int, steps: int | Sequence[int] | None = None) -> EvalResult:
        """One candidate's result: at each step count (the options' by default) the mean reward of
        the same prompts and seeds, combined by ``steps_combine`` when there are several."""
        counts = (self.step_counts if steps is None else (int(steps),) if isinstance(steps, (int, np.integer))
                  else tuple(int(s) for s in steps))
        values, projected = self.feasible(params)
        self._set(values)
        per_nfe = []
        for n_steps in counts:
            images = self.generator.generate(prompts, seed, n_steps)
            per_nfe.append(score_images(self.reward, images, prompts, metadata))
        n = len(per_nfe[0][0])
        artifacts: dict[str, Any] = {"n_images": n * len(counts)}
        if len(counts) == 1:
            scores, details = per_nfe[0]
            metrics = {"reward_sem": _sem(scores)}
            metrics.update({f"reward.{name}": mean_applicable(v) for name, v in details.items()})
            value = float(scores.mean())
        else:
            value, metrics = self._combine(counts, per_nfe)
        if self.options.omega_sum is not None:
            metrics["omega_projected"] = float(projected)
        return EvalResult(value=value, metrics=metrics, artifacts=artifacts)

    def _combine(self, counts: Sequence[int], per_nfe: Sequence[tuple[np.ndarray, dict[str, np.ndarray]]],
                 ) -> tuple[float, dict[str, float | None]]:
        """The value over several NFEs from each NFE's mean, computed exactly as a one-NFE value is
        (``float(scores.mean())``), so it equals the mean (or worst) of one-NFE evaluations."""
        means = [float(scores.mean()) for scores, _ in per_nfe]
        metrics: dict[str, float | None] = {}
        for n_steps, (scores, _), mean in zip(counts, per_nfe, means):
            metrics[f"reward@{n_steps}"] = mean
            metrics[f"reward_sem@{n_steps}"] = _sem(scores)
        if self.options.steps_combine == "worst":
            worst = (min if self.direction == "maximize" else max)(range(len(means)), key=lambda i: means[i])
            value = means[worst]
            metrics["reward_sem"] = _sem(per_nfe[worst][0])
        else:
            value = math.fsum(means) / len(means)
            metrics["reward_sem"] = _sem(np.mean([scores for scores, _ in per_nfe], axis=0))  # paired per image
        for name in per_nfe[0][1]:
            applicable = [m for m in (mean_applicable(details[name]) for _, details in per_nfe) if m is not None]
            metrics[f"reward.{name}"] = float(np.mean(applicable)) if applicable else None
        return value, metrics

    def calibrated_for(self) -> dict[str, Any]:
        """The sampling settings this objective scores under, recorded in the calibration file so
        that using it off them can be warned about: step counts (and how they were combined), the
        scheduler's class and shift, the guidance scale, the image size; and the LoRA merged under
        the calibration (its folder and the sha256 of its weights), if any."""
        from calibri.plugins.flow_grpo.lora import merged_lora

        scheduler = getattr(self.pipe, "scheduler", None)
        config = dict(getattr(scheduler, "config", None) or {})
        height, width = self.generator.resolution()
        lora = merged_lora(self.pipe.transformer)
        settings: dict[str, Any] = {
            "steps": list(self.step_counts), "steps_combine": self.options.steps_combine,
            "scheduler": {"class": type(scheduler).__name__ if scheduler is not None else None,
                          "shift": _plain_number(config.get("shift")),
                          "use_dynamic_shifting": config.get("use_dynamic_shifting")},
            "guidance_scale": self.generator.effective_guidance(),
            "height": height, "width": width}
        if lora is not None:
            settings["lora"] = lora
        return settings


def _sem(values: np.ndarray) -> float:
    n = len(values)
    return float(np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else 0.0


def _plain_number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def mean_applicable(values: Any) -> float | None:
    """A reward component's mean over the images it applies to: NaN marks an image it does not
    apply to (GenEval's −10 for another tag), as Flow-GRPO averages only the values ≠ −10."""
    values = np.asarray(values, dtype=np.float64)
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else None


def score_images(reward: Any, images: Any, prompts: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-image scores and, where the reward offers them, per-component scores."""
    if hasattr(reward, "score_with_details"):
        total, details = reward.score_with_details(images, list(prompts), list(metadata))
        return np.asarray(total, dtype=np.float64), {k: np.asarray(v) for k, v in details.items()}
    return np.asarray(reward(images, list(prompts), list(metadata)), dtype=np.float64), {}

