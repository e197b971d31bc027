"""``calibri flowgrpo evaluate``: base, +LoRA, +calibration and LoRA+calibration, Flow-GRPO's way.

The paper's Table 4 stacks a calibration on a Flow-GRPO LoRA; this command measures that matrix
under Flow-GRPO's own evaluation protocol, so its numbers line up with the ``eval_reward_*`` a
Flow-GRPO user already knows: the plain Euler ODE (Flow-GRPO's noise level 0, which is what a
diffusers pipeline samples), 40 steps, guidance 4.5, 512×512, an empty negative prompt, 128 text
tokens, on a dataset's test split. Every one of those is an option, for other models (the toy
model samples 32×32 with 12 tokens).

One pipeline is loaded. The rows without the LoRA are made first; then the LoRA is merged into
the same transformer (Flow-GRPO's own ``PeftModel.from_pretrained(...).merge_and_unload()``, through
:func:`calibri.plugins.flow_grpo.lora.load_flowgrpo_lora`) and the rows with it are made. Every
row sees the same prompts and the same per-image seeds (calibri's seed policy,
:func:`calibri.plugins.dit.prompts.image_seed`), so the differences from the base row are paired.
Images come from calibri's own generator and calibration hooks (the objective's
:meth:`~calibri.plugins.dit.objective.CalibriObjective.images`), and the table is
:mod:`calibri.plugins.dit.evaluation`'s.

The same calibration is applied to the base model (``+calibration``) and to base+LoRA
(``LoRA+calibration``); the output says which model it was made on (a calibration made on a LoRA
is, on the base model, used off the model it was found for).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

#: Flow-GRPO's SD3 evaluation protocol (its config and train script).
FLOW_GRPO_MODEL = "stabilityai/stable-diffusion-3.5-medium"
EVAL_STEPS = 40
EVAL_GUIDANCE = 4.5
EVAL_SIZE = 512
TEXT_TOKENS = 128
#: Row names, in the order they are reported (the paper's Table 4 order is base, +calibration,
#: +LoRA, both; :func:`~calibri.plugins.dit.evaluation.markdown_table` puts the base row first).
BASE, LORA, CALIBRATED, BOTH = "baseline", "+LoRA", "+calibration", "LoRA+calibration"


@dataclass(frozen=True)
class CalibrationSource:
    """A calibration to evaluate: its values, the structure its objective needs, and the LoRA (if
    any) it was made on."""

    path: Path
    document: dict[str, Any]
    omega_sum: tuple[float, float] | None
    made_on_lora: str | None

    @property
    def values(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.document["values"].items()}


def read_calibration(path: str | Path) -> CalibrationSource:
    """A calibration file, or a run directory (its ``calibration.json`` when the report wrote one,
    else its selected values from ``best.json`` and its structure from ``config.yaml``)."""
    from calibri.core.config import read_yaml
    from calibri.core.errors import UserError
    from calibri.plugins.dit.calibration_file import load_calibration
    from calibri.plugins.dit.report import run_best, selected_values

    path = Path(path)
    if not path.exists():
        raise UserError(f"--calibration: {path}: no such calibration file or run directory")
    if not path.is_dir():
        document = load_calibration(path)
        return CalibrationSource(path, document, None, _lora_named(document.get("lora")
                                                                     or (document.get("calibrated_for") or {}).get("lora")))
    if not (path / "config.yaml").is_file():
        raise UserError(f"--calibration: {path}: not a calibri run directory (no config.yaml)")
    config = read_yaml(path / "config.yaml")
    objective = config.get("objective") if isinstance(config, dict) else None
    if not isinstance(objective, dict) or objective.get("name") != "calibri":
        raise UserError(f"--calibration: {path}: not a Calibri calibration run")
    options = objective.get("options") or {}
    omega_sum = tuple(options["omega_sum"]) if options.get("omega_sum") else None
    lora = _lora_named(options.get("lora"))
    if (path / "calibration.json").is_file():
        document = load_calibration(path / "calibration.json")
        return CalibrationSource(path / "calibration.json", document, None,
                                 _lora_named(document.get("lora") or (document.get("calibrated_for") or {}).get("lora"))
                                 or lora)
    values, _ = selected_values(run_best(path), path / "best.json")
    steps = options.get("steps", 15)
    document = {"granularity": options.get("granularity", "layer"), "copies": options.get("copies", 1),
                "form": options.get("form"), "guidance_scale": options.get("guidance_scale"),
                "time_buckets": options.get("time_buckets", 1), "values": values,
                "calibrated_for": {"steps": [steps] if isinstance(steps, int) else steps if isinstance(steps, list) else None,
                                   "guidance_scale": options.get("guidance_scale")}}
    return CalibrationSource(path, document, omega_sum, lora)  # type: ignore[arg-type]


def _lora_named(record: Any) -> str | None:
    """The LoRA a calibration records it was made on: a path, or a record with one."""
    if isinstance(record, Mapping):
        record = record.get("path")
    return str(record) if isinstance(record, (str, Path)) and str(record) else None


def numbers(text: str, kind: type, option: str, low: float) -> list:
    """Comma-separated numbers of ``kind``, each at least ``low``; one line naming ``option``."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None
    if not values:
        raise click.BadParameter("give at least one", param_hint=option)
    if any(v < low for v in values) or len(set(values)) != len(values):
        raise click.BadParameter(f"expected distinct numbers of at least {low}, got {text!r}", param_hint=option)
    return values


def reward_spec(text: str) -> Any:
    """``--reward``: a registered name, or a YAML/JSON spec (``{name: flowgrpo, options: {...}}``,
    ``{pickscore: 1.0, ocr: 0.2}``)."""
    import yaml

    if not text.lstrip().startswith(("{", "[")):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"not a reward name or YAML spec: {str(exc).splitlines()[0]}",
                                 param_hint="--reward") from None


@click.command("evaluate")
@click.option("--model", default=FLOW_GRPO_MODEL, show_default=True,
              help="The base pipeline: a folder, a hub id, or 'toy'.")
@click.option("--lora", type=click.Path(), default=None,
              help="A Flow-GRPO LoRA: checkpoint-N/ or its lora/ folder (adds the +LoRA rows).")
@click.option("--calibration", type=click.Path(), default=None,
              help="A calibration file or calibration run directory (adds the +calibration rows).")
@click.option("--prompts", default=None,
              help="Prompts to evaluate on, any prompt source (a dataset's test split, e.g. flowgrpo:DIR:test); "
                   "default: the calibration run's validation prompts, or the toy model's held-out split.")
@click.option("--max-prompts", type=click.IntRange(min=1), default=None, help="Only the first N prompts.")
@click.option("--seeds", "seeds_text", default="0", show_default=True,
              help="Comma-separated seeds; image j of seed s is drawn from image_seed(s, j) in every row.")
@click.option("--reward", "reward_text", default=None,
              help="Reward: a name or a YAML spec such as '{name: flowgrpo, options: {reward_fn: {pickscore: 1.0}}}' "
                   "(default: toy_oracle for the toy model).")
@click.option("--steps", type=click.IntRange(min=1), default=EVAL_STEPS, show_default=True, help="Sampling steps.")
@click.option("--guidance", type=float, default=EVAL_GUIDANCE, show_default=True,
              help="Guidance scale (a cfg-form calibration samples with its own ω instead).")
@click.option("--size", type=click.IntRange(min=1), default=None,
              help=f"Image side in pixels (default {EVAL_SIZE}, or the model's own where its size is fixed).")
@click.option("--max-sequence-length", type=click.IntRange(min=1), default=None,
              help=f"Text tokens of the T5 encoder (default {TEXT_TOKENS} where the pipeline takes it).")
@click.option("--negative-prompt", default="", show_default=True, help="Negative prompt (Flow-GRPO: empty).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per call.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Model dtype (auto: bf16 on CUDA, fp32 on CPU).")
@click.option("--device", default=None, help="Torch device (default: cpu).")
@click.option("--grid-prompts", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts in the image grid (first seed).")
@click.option("-o", "--output", type=click.Path(), default="flowgrpo-evaluation", show_default=True,
              help="Folder for evaluation.md, evaluation.csv, evaluation.json and grid.png.")
def evaluate(model: str, lora: str | None, calibration: str | None, prompts: str | None, max_prompts: int | None,
             seeds_text: str, reward_text: str | None, steps: int, guidance: float, size: int | None,
             max_sequence_length: int | None, negative_prompt: str, batch_size: int, dtype: str, device: str | None,
             grid_prompts: int, output: str) -> None:
    """Base, +LoRA, +calibration and LoRA+calibration on the same prompts and seeds, Flow-GRPO's protocol.

    Prints the table (mean reward ± s.e., paired difference from the base row), and writes it with
    an image grid and a JSON record to --output. Every option is checked before the model loads.
    """
    from calibri.core.errors import UserError
    from calibri.plugins.dit.models import check_device, finite_number
    from calibri.plugins.dit.objective import MAX_GUIDANCE, MAX_STEPS, check_reward_spec

    from .lora import check_fits, merged_lora

    seeds = numbers(seeds_text, int, "--seeds", 0)
    if steps > MAX_STEPS:
        raise click.BadParameter(f"at most {MAX_STEPS}, got {steps}", param_hint="--steps")
    finite_number(guidance, "--guidance", MAX_GUIDANCE)
    if device is not None:
        check_device(device, "--device")
    sampling = _sampling(model, size, max_sequence_length)
    source = read_calibration(calibration) if calibration is not None else None
    is_toy = _is_toy(model)
    spec = reward_spec(reward_text) if reward_text is not None else ("toy_oracle" if is_toy else None)
    if spec is None:
        raise UserError("--reward: give the reward to evaluate with, e.g. "
                        "'{name: flowgrpo, options: {reward_fn: {pickscore: 1.0}}}'")
    check_reward_spec(spec, "--reward")
    texts, metadata, where = _prompts(prompts, source, is_toy, spec, max_prompts)
    checkpoint = _check_lora(lora, model)
    out = Path(output)
    try:  # before the model loads: an hour of images is not made for a folder that cannot be written
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"-o/--output: cannot create {out}: {exc.strerror or exc}") from None

    objective = _objective(model, source, spec, guidance, steps, sampling, negative_prompt, batch_size, dtype, device)
    try:
        if source is not None:
            _warn_off(source, objective, steps)
        if checkpoint is not None:  # before any image: a hub model is checked only once loaded
            check_fits(checkpoint, objective.pipe.transformer, "--lora")
        rows, grid, scores = _matrix(objective, source, checkpoint, texts, metadata, seeds, steps, guidance, grid_prompts)
        lora_record = merged_lora(objective.pipe.transformer)
        guidance_used = objective.generator.guidance_scale
    finally:
        objective.close()
    _write(out, rows, grid, scores, {
        "model": model, "lora": lora_record, "calibration": None if source is None else {
            "path": str(source.path), "made_on_lora": source.made_on_lora,
            "applied_to": [r for r in (CALIBRATED, BOTH if checkpoint else None) if r],
            "granularity": source.document["granularity"], "copies": source.document["copies"],
            "form": source.document["form"], "pipeline_guidance": guidance_used},
        "protocol": {"sampler": "Euler ODE (noise level 0)", "steps": steps, "guidance": guidance,
                     "height": sampling["height"], "width": sampling["width"],
                     "max_sequence_length": sampling["max_sequence_length"], "negative_prompt": negative_prompt,
                     "reward": spec, "prompts": where, "n_prompts": len(texts), "seeds": seeds}})


# -- checks before anything loads ---------------------------------------------------------------
def _is_toy(model: str) -> bool:
    from calibri.plugins.dit.models import SHIPPED_MODELS, resolve_model

    return model in SHIPPED_MODELS or Path(model).resolve() == Path(resolve_model("toy")).resolve()


def _prompts(spec: str | None, source: CalibrationSource | None, is_toy: bool, reward: Any,
             limit: int | None) -> tuple[list[str], list[Any], str]:
    from calibri.core.config import read_yaml
    from calibri.core.errors import UserError
    from calibri.plugins.dit.objective import check_reward_prompts
    from calibri.plugins.dit.prompts import load_prompts

    field = "--prompts"
    if spec is None and source is not None and source.path.is_dir():
        options = (read_yaml(source.path / "config.yaml").get("objective") or {}).get("options") or {}
        spec, field = options.get("validation_prompts"), f"{source.path}: objective.options.validation_prompts"
    if spec is None and is_toy:
        spec = "toy/validation"
    if spec is None:
        raise UserError("--prompts: give the prompts to evaluate on (Flow-GRPO: the test split, flowgrpo:DIR:test)")
    loaded = load_prompts(spec, field)
    texts, metadata = list(loaded.prompts)[:limit], list(loaded.metadata)[:limit]
    check_reward_prompts(reward, loaded, "--prompts")
    return texts, metadata, str(spec)


def _check_lora(path: str | None, model: str) -> Any:
    """The LoRA folder, checked without loading a tensor (and against the model's transformer
    config where a local folder gives one)."""
    if path is None:
        return None
    from calibri.core.errors import UserError
    from calibri.plugins.dit.models import build_on_meta, transformer_config

    from .lora import check_lora

    try:
        meta = build_on_meta(transformer_config(model))
    except UserError:  # a hub id: checked against the loaded model, before it is merged
        meta = None
    return check_lora(path, "--lora", meta)


def _sampling(model: str, size: int | None, max_sequence_length: int | None) -> dict[str, Any]:
    """Image size and text length for ``model``: Flow-GRPO's where the pipeline takes them, its own
    otherwise; an explicit option the pipeline cannot take is a one-line error."""
    import inspect

    from calibri.core.errors import UserError
    from calibri.plugins.dit.models import pipeline_class, pixel_multiple

    try:
        cls, multiple = pipeline_class(model), pixel_multiple(model)
    except UserError as exc:
        raise UserError(f"--model: {exc}") from None
    takes_size = takes_length = True  # a hub id: Flow-GRPO's SD3 pipeline takes both
    if cls is not None:
        takes_size = "height" in inspect.signature(cls.__call__).parameters
        encode = getattr(cls, "encode_prompt", None)
        takes_length = encode is not None and "max_sequence_length" in inspect.signature(encode).parameters
    if size is not None and not takes_size:
        raise UserError(f"--size: {cls.__name__} makes images of a fixed size; leave --size unset")
    if max_sequence_length is not None and not takes_length:
        raise UserError(f"--max-sequence-length: {cls.__name__} takes no text length; leave it unset")
    side = (size or EVAL_SIZE) if takes_size else None
    if side is not None and multiple is not None and side % multiple:
        raise UserError(f"--size: must be a multiple of {multiple} for this model (its VAE and patch size), got {side}")
    return {"height": side, "width": side, "explicit_length": max_sequence_length is not None,
            "max_sequence_length": (max_sequence_length or TEXT_TOKENS) if takes_length else None}


def _objective(model: str, source: CalibrationSource | None, reward: Any, guidance: float, steps: int,
               sampling: dict[str, Any], negative_prompt: str, batch_size: int, dtype: str,
               device: str | None) -> Any:
    """The calibri objective the rows are made with: the model, a calibration of the file's
    structure (identity where there is none), the reward, Flow-GRPO's sampling settings."""
    import pydantic

    from calibri.core.errors import ConfigError, UserError
    from calibri.plugins.dit.objective import FIELD, CalibriObjective, CalibriOptions

    structure: dict[str, Any] = {"granularity": "layer", "copies": 1, "form": None, "guidance_scale": guidance}
    if source is not None:
        document = source.document
        cal_guidance = document.get("guidance_scale") if document["form"] == "cfg" else guidance
        structure = {"granularity": document["granularity"], "copies": document["copies"], "form": document["form"],
                     "guidance_scale": cal_guidance, "time_buckets": document.get("time_buckets", 1),
                     "omega_sum": source.omega_sum}
    try:
        options = CalibriOptions(model=model, reward=reward, steps=steps, height=sampling["height"],
                                 width=sampling["width"], negative_prompt=negative_prompt, batch_size=batch_size,
                                 dtype=dtype, device=device, **structure)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise UserError(f"{source.path if source else '--model'}: {where}: "
                        f"{error['msg'].removeprefix('Value error, ')}") from None
    try:
        objective = CalibriObjective(options)
    except ConfigError as exc:  # name this command's option, not a config field
        for prefix, option in ((f"{FIELD}.model", "--model"), (f"{FIELD}.reward", "--reward"),
                               (f"{FIELD}.height", "--size"), (f"{FIELD}.width", "--size")):
            if exc.field == prefix or exc.field.startswith(prefix + "."):
                raise UserError(f"{option}{exc.field[len(prefix):]}: {exc.message}") from None
        raise
    if sampling["max_sequence_length"] is not None and not _limit_text_tokens(objective, int(sampling["max_sequence_length"])):
        if sampling["explicit_length"]:
            objective.close()
            raise UserError(f"--max-sequence-length: {type(objective.pipe).__name__} takes no text length; leave it unset")
        sampling["max_sequence_length"] = None
    return objective


def _limit_text_tokens(objective: Any, tokens: int) -> bool:
    """Encode prompts (and the negative prompt) with ``tokens`` T5 tokens, as Flow-GRPO does (SD3's
    pipeline defaults to 256): the pipeline's ``encode_prompt`` gets the length, and the image
    generator is made again so that the negative prompt is encoded with it too. False where the
    pipeline's encoder takes no length."""
    import functools

    from calibri.plugins.dit.generation import ImageGenerator

    import inspect

    pipe, old = objective.pipe, objective.generator
    if "max_sequence_length" not in inspect.signature(pipe.encode_prompt).parameters:
        return False
    pipe.encode_prompt = functools.partial(type(pipe).encode_prompt, pipe, max_sequence_length=tokens)
    objective.generator = ImageGenerator(pipe, old.steps, old.guidance_scale, old.height, old.width, old.batch_size,
                                         old.negative_prompt, old.pipeline_options)
    return True


def _warn_off(source: CalibrationSource, objective: Any, steps: int) -> None:
    """One warning line when the protocol samples off the settings the calibration recorded."""
    from calibri.plugins.dit.calibration_file import off_settings, scheduler_settings, warn_off_settings

    height, width = objective.generator.resolution()
    warn_off_settings(source.path, off_settings(
        source.document.get("calibrated_for"), steps=[steps], guidance_scale=objective.generator.effective_guidance(),
        scheduler=scheduler_settings(getattr(objective.pipe, "scheduler", None)), height=height, width=width))


# -- the matrix ------------------------------------------------------------------------------
def _matrix(objective: Any, source: CalibrationSource | None, checkpoint: Any, texts: Sequence[str],
            metadata: Sequence[Any], seeds: Sequence[int], steps: int, guidance: float, grid_prompts: int,
            ) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """The rows (base first, paired differences from it), the grid's images (first seed) and each
    row's per-image scores (seeds in turn, prompts in order within a seed). The
    rows without the LoRA come first; then it is merged and the rows with it follow. Without a
    calibration the rows use the identity; under a cfg-form calibration (its pipeline guidance is
    the calibration's), identity scales with ω = (g, 1 − g): plain CFG at ``guidance``."""
    import numpy as np

    from calibri.core.errors import UserError
    from calibri.plugins.dit.evaluation import Row, _sem, variant_values
    from calibri.plugins.dit.objective import score_images

    from .lora import load_flowgrpo_lora

    pick = np.linspace(0, len(texts) - 1, min(grid_prompts, len(texts))).round().astype(int).tolist()
    base_values = variant_values(objective, f"guidance={guidance:g}", None)[0] if objective.calibrator.form == "cfg" \
        else None
    calibrated = None
    if source is not None:
        calibrated = source.values
        unknown = sorted(set(calibrated) - set(objective.calibrator.parameter_names()))
        if unknown:
            raise UserError(f"--calibration: {source.path}: values for parameters this model's calibration does not "
                            f"have ({', '.join(unknown[:3])})")
    plan = [(BASE, False, base_values)] + ([(CALIBRATED, False, calibrated)] if source is not None else [])
    if checkpoint is not None:
        plan += [(LORA, True, base_values)] + ([(BOTH, True, calibrated)] if source is not None else [])
    scores: dict[str, Any] = {}
    details: dict[str, dict[str, Any]] = {}
    grid: dict[str, Any] = {"prompts": [texts[i] for i in pick], "images": {}}
    merged = False
    for name, with_lora, values in plan:
        if with_lora and not merged:
            merged = True
            objective.calibrator.detach()  # merged with no hooks on the model; attached again after
            load_flowgrpo_lora(objective.pipe.transformer, checkpoint.folder, "--lora")
            objective.calibrator.attach()
        parts, terms = [], []
        for i, seed in enumerate(seeds):
            images = objective.images(values, texts, seed, steps)
            if i == 0:
                grid["images"][name] = images[pick]  # in the rows' order below
            total, detail = score_images(objective.reward, images, texts, metadata)
            parts.append(total)
            terms.append(detail)
        scores[name] = np.concatenate(parts)
        details[name] = {k: float(np.mean(np.concatenate([d[k] for d in terms]))) for k in terms[0]}
        click.echo(f"  {name}: {scores[name].mean():.4f} ({len(scores[name])} images)", err=True)
    order = [name for name in (BASE, LORA, CALIBRATED, BOTH) if name in scores]
    grid["images"] = {name: grid["images"][name] for name in order}
    rows = []
    for name in order:
        s = scores[name]
        row = Row(name, steps, float(s.mean()), _sem(s), len(s), terms=details[name] or None)
        if name != BASE:
            delta = s - scores[BASE]
            row.diff, row.diff_sem = float(delta.mean()), _sem(delta)
        rows.append(row)
    return rows, grid, scores


# -- outputs ---------------------------------------------------------------------------------
def _write(out: Path, rows: Sequence[Any], grid: Mapping[str, Any], scores: Mapping[str, Any],
           record: dict[str, Any]) -> None:
    from calibri.plugins.dit.evaluation import markdown_table, write_csv

    table = markdown_table(rows)
    notes = [f"{record['protocol']['n_prompts']} prompts ({record['protocol']['prompts']}) × seeds "
             f"{', '.join(map(str, record['protocol']['seeds']))}; {record['protocol']['steps']} steps, the same "
             f"prompts and seeds in every row; differences are paired, from the base row."]
    calibration = record["calibration"]
    if calibration is not None:
        made_on = calibration["made_on_lora"]
        notes.append(f"Calibration {calibration['path']}: made on {'the LoRA ' + made_on if made_on else 'the base model'}; "
                     f"applied to {' and '.join('base' if r == CALIBRATED else 'base+LoRA' for r in calibration['applied_to'])}.")
        merged = record["lora"]
        if made_on and merged and Path(made_on).resolve() != Path(merged["path"]).resolve():
            notes.append(f"The LoRA of the +LoRA rows ({merged['path']}) is not the one the calibration was made on.")
    text = table + "\n\n" + "\n".join(notes) + "\n"
    (out / "evaluation.md").write_text(text, encoding="utf-8")
    write_csv(rows, out / "evaluation.csv")
    record["rows"] = [{**asdict(row), "scores": [float(v) for v in scores[row.variant]]} for row in rows]
    (out / "evaluation.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    image_grid(grid["images"], grid["prompts"]).save(out / "grid.png")
    click.echo(text.rstrip())
    click.echo(f"written: {out}")


def image_grid(rows: Mapping[str, Any], prompts: Sequence[str], cell: int = 128) -> Any:
    """One row of images per variant (N×3×H×W in [0, 1], same prompts and seeds), labelled, as a PIL
    image; small images are enlarged without smoothing so pixels stay visible."""
    import textwrap

    import numpy as np
    from PIL import Image, ImageDraw

    label_width, header = 120, 36
    n = len(prompts)
    canvas = Image.new("RGB", (label_width + n * cell, header + len(rows) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for j, prompt in enumerate(prompts):
        draw.multiline_text((label_width + j * cell + 2, 2), "\n".join(textwrap.wrap(prompt, 22)[:3]), fill="black")
    for i, (name, images) in enumerate(rows.items()):
        top = header + i * cell
        draw.text((4, top + cell // 2 - 6), "base" if name == BASE else name, fill="black")
        for j in range(n):
            array = (images[j].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(array)
            resample = Image.NEAREST if tile.width < cell else Image.BICUBIC
            canvas.paste(tile.resize((cell, cell), resample), (label_width + j * cell, top))
    return canvas
