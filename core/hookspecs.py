"""The plugin hooks. Every hook takes a ``register`` callback and returns nothing.

A plugin is a module (or object) with functions decorated by :data:`hookimpl`, installed under the
``calibri`` entry-point group. Built-in features register through these same hooks. What each
``register`` accepts is documented in ``docs/plugins.md`` (one section per hook).
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("calibri")
hookimpl = pluggy.HookimplMarker("calibri")


@hookspec
def calibri_register_optimizers(register):
    """Register optimisers: ``register(name, factory, *, kinds=("float", "int"), description="")``.

    ``factory(space, settings, **options)`` returns a :class:`calibri.core.optimizer.Optimizer`."""


@hookspec
def calibri_register_objectives(register):
    """Register objectives: ``register(name, factory, *, space=None, stream=None, description="")``.

    ``factory(**options)`` returns a :class:`calibri.core.objective.Objective`; ``space(**options)``
    gives its space without building it; ``stream(seed=..., **options)`` its per-round data stream."""


@hookspec
def calibri_register_spaces(register):
    """Register named parameterisations: ``register(name, factory, *, description="")``.

    ``factory(**options)`` returns a :class:`calibri.core.space.Space`."""


@hookspec
def calibri_register_executors(register):
    """Register executors: ``register(name, factory, *, description="")``.

    ``factory(recipe, *, workers, devices, **options)`` returns a
    :class:`calibri.core.executor.Executor`."""


@hookspec
def calibri_register_rewards(register):
    """Register image rewards: ``register(name, factory, *, description="")``."""


@hookspec
def calibri_register_architectures(register):
    """Register DiT architecture adapters: ``register(name, factory, *, description="")``."""


@hookspec
def calibri_register_callbacks(register):
    """Register run callbacks: ``register(name, factory, *, description="")``.

    ``factory(**options)`` returns an object with any of ``on_run_start(info)``,
    ``on_round_end(record)`` and ``on_run_end(summary)``."""


@hookspec
def calibri_register_prompt_sources(register):
    """Register prompt-set sources: ``register(scheme, loader, *, description="")``.

    A prompt spec ``SCHEME:REST`` (``prompts:``, ``validation_prompts:``, ``--prompts``) is loaded
    by ``loader(rest, field)``, which returns a :class:`calibri.plugins.dit.prompts.PromptSet`
    and raises :class:`calibri.core.errors.ConfigError` on ``field`` for bad input."""


@hookspec
def calibri_register_pipeline_families(register):
    """Register how calibri drives a diffusers pipeline class: ``register(pipeline_class_name,
    family, *, description="")``.

    ``family`` is a :class:`calibri.plugins.dit.generation.Family`: how one prompt is encoded
    (once, then reused), the guidance argument, the negative arguments and the default negative
    prompt. A pipeline is matched by the class names of its MRO, so a subclass inherits its base's
    family."""


@hookspec
def calibri_register_commands(register):
    """Register CLI commands: ``register(command)`` with a :class:`click.Command`."""
