"""Registers the Calibri plugin's architectures (and, lazily, its commands) with calibri."""
from __future__ import annotations

from calibri.core.hookspecs import hookimpl

from .adapters import BUILT_IN_ADAPTERS


@hookimpl
def calibri_register_architectures(register):
    for adapter in BUILT_IN_ADAPTERS:
        register(adapter.name, adapter)


@hookimpl
def calibri_register_pipeline_families(register):
    from .families import BUILT_IN_FAMILIES

    for pipeline, (family, description) in BUILT_IN_FAMILIES.items():
        register(pipeline, family, description=description)


@hookimpl
def calibri_register_commands(register):
    from .ablate import ablate_command
    from .commands import bake_command, evaluate_command, sites_command
    from .official import import_official_command

    register(sites_command)
    register(bake_command)
    register(evaluate_command)
    register(import_official_command)
    register(ablate_command)


@hookimpl
def calibri_register_callbacks(register):
    from .report import CalibrationReport

    register("calibration_report", CalibrationReport)


def dit_space(model_config: str, granularity: str = "gate", copies: int = 1, form: str | None = None,
              guidance_scale: float | None = None, with_omega: bool = True, sigma: float = 0.25,
              omega_sigma: float | None = None):
    """Calibri scales of a DiT (config file or known model name), built on the meta device."""
    from calibri.core.errors import ConfigError, UserError

    from .calibration import Calibrator
    from .models import build_on_meta, load_model_config

    if granularity not in ("block", "layer", "gate"):
        raise ConfigError("space.options.granularity", f"must be block, layer or gate, got {granularity!r}")
    try:
        model = build_on_meta(load_model_config(model_config), model_config)
    except UserError as exc:
        raise ConfigError("space.options.model_config", str(exc)) from None
    try:
        calibrator = Calibrator(model, granularity, copies, form, guidance_scale)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError("space.options", str(exc)) from None
    return calibrator.space(with_omega=with_omega, sigma=sigma, omega_sigma=omega_sigma)


@hookimpl
def calibri_register_objectives(register):
    from .objective import calibri_objective, calibri_space, calibri_stream, check_calibri

    register("calibri", calibri_objective, space=calibri_space, check=check_calibri, stream=calibri_stream)


@hookimpl
def calibri_register_spaces(register):
    register("dit", dit_space)
