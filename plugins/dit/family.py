"""A pipeline family: how calibri encodes prompts for one kind of diffusers pipeline and passes
guidance, and the lookup of a pipeline's family among those plugins registered with the
``calibri_register_pipeline_families`` hook (by the class names of the pipeline's MRO).

No torch here: the registry imports this module whenever it is built.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from calibri.core.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["HOOK", "Family", "UnknownPipeline", "family_for", "family_of", "registered_families",
           "unknown_pipeline_message"]


@dataclass(frozen=True)
class Family:
    """How to encode prompts and pass guidance for one kind of pipeline.

    ``encode(pipe, prompt, device)`` returns the pipeline keyword arguments of one prompt's
    encoding. Where the family has classifier-free guidance, ``negatives`` renames those of the
    negative prompt's encoding into the pipeline's negative arguments: the negative prompt is
    encoded once (by ``encode_negative`` where the pipeline encodes it differently from a prompt,
    else by ``encode``) and shared by every image.
    """

    encode: Callable[[Any, str, torch.device], dict[str, torch.Tensor]]
    guidance_argument: str
    negatives: Mapping[str, str] = field(default_factory=dict)
    default_negative: str = ""
    #: Names of tensors that are per-token masks (padded with zeros when prompts differ in length).
    masks: tuple[str, ...] = ()
    #: How the pipeline encodes the negative prompt, where that differs from ``encode`` (Sana
    #: leaves its instruction prefix off the negative prompt); None: like any prompt.
    encode_negative: Callable[[Any, str, torch.device], dict[str, torch.Tensor]] | None = None

    def encode_the_negative(self, pipe: Any, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        """The negative prompt's encoding, under the pipeline's negative argument names."""
        encode = self.encode_negative or self.encode
        return {self.negatives[key]: value for key, value in encode(pipe, prompt, device).items()}

    @property
    def arguments(self) -> tuple[str, ...]:
        """The pipeline arguments this family sets: the negative ones and the guidance argument
        (the prompt's own are the negatives' keys)."""
        return (*self.negatives, *self.negatives.values(), self.guidance_argument)

    @property
    def has_cfg(self) -> bool:
        return bool(self.negatives)


HOOK = "calibri_register_pipeline_families"


class UnknownPipeline(UserError, ValueError):
    """No registered family for a pipeline class (a ``ValueError`` too, for callers that asked
    before the families became a hook)."""


def registered_families() -> dict[str, Family]:
    """Pipeline class name → its family, as plugins registered them."""
    from calibri.core.plugins import get_registry

    return {reg.name: reg.factory for reg in get_registry().items("pipeline_families")
            if isinstance(reg.factory, Family)}


def family_for(cls: type) -> Family | None:
    """The family of a pipeline class: the first class of its MRO with a registered family."""
    families = registered_families()
    return next((families[c.__name__] for c in cls.__mro__ if c.__name__ in families), None)


def family_of(pipe: Any) -> Family:
    """The family of a pipeline (instance), or a one-line error saying which hook to implement."""
    family = family_for(type(pipe))
    if family is None:
        raise UnknownPipeline(unknown_pipeline_message(type(pipe).__name__))
    return family


def unknown_pipeline_message(class_name: str) -> str:
    known = ", ".join(sorted(registered_families())) or "none"
    return (f"calibri does not know how to encode prompts for {class_name}: a plugin registers it with "
            f"the {HOOK} hook (see docs/plugins.md); known pipelines: {known}")
