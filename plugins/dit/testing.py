"""The adapter contract suite: what every DiT architecture adapter must guarantee, as tests.

It lives with the DiT plugin rather than in ``calibri.core.testing`` because every check runs a
real diffusers pipeline (torch, diffusers, transformers), which calibri's core does not need.
A plugin author names a builder of a tiny pipeline of the architecture; the checks run that
pipeline and its transformer on the inputs the pipeline itself passes:

* **identity** -- attached at all scales 1, the transformer's output and the pipeline's images
  are bit-identical to the stock ones, and stay so after ``detach()``;
* **every site acts** -- each site set away from 1 changes the output;
* **bake** -- folding random scales and ω into the weights gives the hooks' output (within
  ``bake_rtol``; a wrong ``linear`` or ``linear_chunk`` shows here), and unbaking restores the model;
* **ensemble** -- two copies in the adapter's ``default_form``, at their initial values, give the
  stock pipeline's images bit for bit (plain CFG at the guidance scale for ``cfg``; the plain
  model for ``distilled``), and each copy is reached (changing either changes the images: the
  conditional/unconditional calls are told apart as ``cfg_batched`` / ``cfg_sequential`` say);
* **time buckets** -- the pipeline's first call, at pure noise, passes ``timestep_max`` (within
  10 %), and a two-bucket calibration applies bucket 0 there and bucket 1 at a tenth of it;
* **calibration file** -- saved and applied again, a calibration gives the same values and
  bit-identical output;
* **pipeline family** -- images made from cached prompt encodings (:class:`ImageGenerator`)
  match the stock pipeline's for the same prompt, negative prompt and seed.

With pytest, subclass :class:`AdapterContract` in a ``test_*.py`` module, in a ``Test*`` class::

    from calibri.plugins.dit.testing import AdapterContract

    from my_plugin import tiny_lumina_pipeline


    class TestLumina(AdapterContract):
        pipeline_factory = staticmethod(tiny_lumina_pipeline)   # seed -> pipeline
        call_options = {}                                       # extra pipeline arguments

The adapter is the registered one for the transformer (``adapter_class`` names another). Without
pytest's collection, :func:`check_adapter_contract` runs every check and raises
``AssertionError`` naming the first that fails.
"""
from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .adapters import Adapter
from .calibration import Calibrator, find_adapter
from .generation import Family, ImageGenerator, family_of
from .prompts import image_seed

__all__ = ["AdapterContract", "check_adapter_contract", "contract_checks"]

#: What bucket 0 must see at the pipeline's first call: noise = timestep / timestep_max.
PURE_NOISE = (0.9, 1.0 + 1e-3)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return copy.copy(value)


class AdapterContract:
    """The checks as ``test_*`` methods; a subclass sets :attr:`pipeline_factory`."""

    #: ``factory(seed)`` → a tiny diffusers pipeline of the architecture.
    pipeline_factory: ClassVar[Callable[[int], Any] | None] = None
    #: The adapter under test; None: the registered adapter for the pipeline's transformer.
    adapter_class: ClassVar[type[Adapter] | None] = None
    #: Extra keyword arguments of every pipeline call (``use_resolution_binning=False``, ...).
    call_options: ClassVar[dict[str, Any]] = {}
    prompt: ClassVar[str] = "a red circle on a blue square"
    negative_prompt: ClassVar[str] = "blurry, low quality"
    height: ClassVar[int] = 32
    width: ClassVar[int] = 32
    steps: ClassVar[int] = 2
    guidance_scale: ClassVar[float] = 4.0
    seed: ClassVar[int] = 0
    #: Relative tolerance (of the output's largest magnitude) between baked weights and hooks.
    bake_rtol: ClassVar[float] = 1e-4

    _cache: ClassVar[dict[type, dict[str, Any]]] = {}

    # -- what the checks share ---------------------------------------------------------------
    def make_pipeline(self) -> Any:
        """The pipeline under test (override to build it yourself)."""
        factory = next((vars(k)["pipeline_factory"] for k in type(self).__mro__ if "pipeline_factory" in vars(k)), None)
        if isinstance(factory, staticmethod):  # set as a plain function or a staticmethod: either works
            factory = factory.__func__
        if factory is None:
            raise TypeError(f"{type(self).__name__}: set pipeline_factory (seed -> pipeline) or override make_pipeline")
        return factory(self.seed)

    def _state(self) -> dict[str, Any]:
        """Built once per contract class: the pipeline, its stock images and transformer calls."""
        state = AdapterContract._cache.get(type(self))
        if state is None:
            pipe = self.make_pipeline()
            state = {"pipe": pipe}
            AdapterContract._cache[type(self)] = state
            state["images"], state["calls"] = self.run_pipeline(record=True)
            state["reference"] = self.call(state["calls"][0])
        return state

    @property
    def pipe(self) -> Any:
        return self._state()["pipe"]

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def family(self) -> Family:
        return family_of(self.pipe)

    def adapter(self) -> Adapter:
        return self.adapter_class() if self.adapter_class is not None else find_adapter(self.transformer)

    def calibrator(self, granularity: str = "gate", **options: Any) -> Calibrator:
        return Calibrator(self.transformer, granularity, adapter=self.adapter(), **options).attach()  # type: ignore[arg-type]

    def pipeline_arguments(self) -> dict[str, Any]:
        """The stock call: prompt, negative prompt (where the family has CFG), guidance, size, steps."""
        kwargs: dict[str, Any] = {"prompt": self.prompt, "num_inference_steps": self.steps, "height": self.height,
                                  "width": self.width, self.family.guidance_argument: self.guidance_scale,
                                  **self.call_options}
        if self.family.has_cfg:
            kwargs["negative_prompt"] = self.negative_prompt
        return kwargs

    def run_pipeline(self, record: bool = False) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Images (float32, CPU) of the stock call with a fixed generator, and, with ``record``,
        a copy of the keyword arguments of every transformer call."""
        calls: list[dict[str, Any]] = []

        def keep(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            named = dict(kwargs)
            if args:
                named.setdefault("hidden_states", args[0])
            calls.append(_clone(named))

        handle = self.transformer.register_forward_pre_hook(keep, with_kwargs=True) if record else None
        try:
            with torch.no_grad():
                images = self.pipe(generator=[torch.Generator().manual_seed(image_seed(self.seed, 0))],
                                   output_type="pt", **self.pipeline_arguments()).images
        finally:
            if handle is not None:
                handle.remove()
        return torch.as_tensor(images).float().cpu(), calls

    def call(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """The transformer's output on a recorded call."""
        with torch.no_grad():
            return self.transformer(**{**_clone(kwargs), "return_dict": False})[0]

    @staticmethod
    def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
        scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
        return float((a.float() - b.float()).abs().max()) <= rtol * scale

    # -- the checks ----------------------------------------------------------------------------
    def test_identity_is_bit_exact(self) -> None:
        state = self._state()
        cal = self.calibrator()
        try:
            assert torch.equal(self.call(state["calls"][0]), state["reference"]), \
                "identity: attached at all scales 1, the transformer's output is not bit-identical to the stock output"
            assert torch.equal(self.run_pipeline()[0], state["images"]), \
                "identity: attached at all scales 1, the pipeline's images are not bit-identical to the stock images"
        finally:
            cal.detach()
        assert torch.equal(self.call(state["calls"][0]), state["reference"]), "identity: detach() did not restore the model"

    def test_every_site_changes_the_output(self) -> None:
        state = self._state()
        cal = self.calibrator()
        try:
            assert cal.sites, "the adapter lists no gates for this model"
            for name in cal.site_names:
                cal.reset()
                cal.set_values({name: 0.5})
                assert not torch.equal(self.call(state["calls"][0]), state["reference"]), \
                    f"site {name} set to 0.5 does not change the output: it scales nothing the model uses"
        finally:
            cal.detach()

    def test_bake_matches_the_hooks(self) -> None:
        state = self._state()
        cal = self.calibrator()
        try:
            rng = np.random.default_rng(0)
            values = {name: float(v) for name, v in zip(cal.site_names, rng.uniform(0.5, 1.5, len(cal.sites)))}
            cal.set_values({**values, "omega": 1.25})
            hooked = self.call(state["calls"][0])
            cal.bake()
            baked = self.call(state["calls"][0])
            worst = float((hooked.float() - baked.float()).abs().max())
            assert self._close(hooked, baked, self.bake_rtol), \
                f"bake: the weights with the scales folded in differ from the hooks by {worst:.3g} " \
                f"(a gate's linear or linear_chunk does not produce what its module output carries)"
            cal.unbake()
            cal.reset()
            assert torch.equal(self.call(state["calls"][0]), state["reference"]), "bake: unbake() did not restore the weights"
        finally:
            cal.detach()

    def test_ensemble_at_its_initial_values_is_the_stock_pipeline(self) -> None:
        state = self._state()
        form = self.adapter().default_form
        options: dict[str, Any] = {"copies": 2, "form": form}
        if form == "cfg":
            options["guidance_scale"] = self.guidance_scale
        cal = self.calibrator(**options)
        try:
            assert torch.equal(self.run_pipeline()[0], state["images"]), \
                f"ensemble ({form}): at its initial values the images differ from the stock pipeline's"
            for copy_index in range(2):
                cal.reset()
                cal.set_values({f"c{copy_index}.{name}": 0.5 for name in cal.site_names}
                               | ({"omega.0": 0.5, "omega.1": 0.5} if form == "distilled" else {}))
                assert not torch.equal(self.run_pipeline()[0], state["images"]), \
                    f"ensemble ({form}): copy {copy_index} is never used (the pipeline's calls are not told apart: " \
                    f"check cfg_batched / cfg_sequential)"
        finally:
            cal.detach()

    def test_time_buckets_follow_timestep_max(self) -> None:
        state = self._state()
        adapter = self.adapter()
        first = state["calls"][0]
        timestep = first.get("timestep")
        assert isinstance(timestep, torch.Tensor), "time buckets: the pipeline passes no timestep tensor"
        noise = float(timestep.flatten()[0]) / adapter.timestep_max
        assert PURE_NOISE[0] <= noise <= PURE_NOISE[1], \
            f"time buckets: at pure noise the pipeline passes timestep {float(timestep.flatten()[0]):g}, " \
            f"but the adapter's timestep_max is {adapter.timestep_max:g}"
        low = {**first, "timestep": (timestep.double() * 0.1).to(timestep.dtype)}
        reference_low = self.call(low)
        cal = self.calibrator(time_buckets=2)
        try:
            for bucket, changed, kept in ((0, first, low), (1, low, first)):
                cal.reset()
                cal.set_values({f"t{bucket}.{name}": 0.5 for name in cal.site_names})
                reference_kept = reference_low if kept is low else state["reference"]
                assert not torch.equal(self.call(changed), reference_low if changed is low else state["reference"]), \
                    f"time buckets: bucket {bucket}'s scales are not applied where they belong"
                assert torch.equal(self.call(kept), reference_kept), \
                    f"time buckets: bucket {bucket}'s scales leak into the other bucket"
        finally:
            cal.detach()

    def test_calibration_file_round_trips(self, tmp_path: Path | None = None) -> None:
        from .calibration_file import apply_calibration, check_fits, load_calibration, save_calibration

        state = self._state()
        folder = Path(tmp_path) if tmp_path is not None else Path(tempfile.mkdtemp(prefix="calibri-contract-"))
        path = folder / "calibration.json"
        cal = self.calibrator("layer")
        try:
            rng = np.random.default_rng(1)
            cal.set_values({name: float(v) for name, v in zip(cal.site_names, rng.uniform(0.5, 1.5, len(cal.sites)))}
                           | {"omega": 0.9})
            values, output = cal.values(), self.call(state["calls"][0])
            save_calibration(cal, path)
        finally:
            cal.detach()
        if self.adapter_class is None:
            loaded = apply_calibration(self.transformer, path)
        else:
            document = load_calibration(path)
            loaded = Calibrator(self.transformer, document["granularity"], document["copies"], document["form"],
                                document.get("guidance_scale"), adapter=self.adapter(),
                                time_buckets=document.get("time_buckets", 1))
            check_fits(loaded, document, path)
            loaded.attach()
            loaded.set_values({k: float(v) for k, v in document["values"].items()})
        try:
            assert loaded.values() == values, "calibration file: the values read back differ from those saved"
            assert torch.equal(self.call(state["calls"][0]), output), \
                "calibration file: applied again, the calibration gives another output"
        finally:
            loaded.detach()

    def test_family_reproduces_the_stock_pipeline(self) -> None:
        state = self._state()
        negative = self.negative_prompt if self.family.has_cfg else None
        generator = ImageGenerator(self.pipe, self.steps, self.guidance_scale, self.height, self.width,
                                   negative_prompt=negative, pipeline_options=self.call_options)
        images = generator.generate([self.prompt], self.seed)
        assert self._close(images, state["images"].clamp(0, 1), 1e-4), \
            "pipeline family: images from cached prompt encodings differ from the stock pipeline's"


def contract_checks() -> list[str]:
    """The names of the checks, in the order they run."""
    return [name for name in vars(AdapterContract) if name.startswith("test_")]


def check_adapter_contract(pipeline_factory: Callable[[int], Any], *, adapter_class: type[Adapter] | None = None,
                           call_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Run every check on ``pipeline_factory(0)``'s pipeline; ``{check: "passed"}``, or an
    ``AssertionError`` naming the first check that fails."""
    contract_class = type("Contract", (AdapterContract,), {
        "pipeline_factory": staticmethod(pipeline_factory), "adapter_class": adapter_class,
        "call_options": dict(call_options or {})})
    contract = contract_class()
    results = {}
    try:
        for name in contract_checks():
            try:
                getattr(contract, name)()
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from None
            results[name] = "passed"
    finally:
        AdapterContract._cache.pop(contract_class, None)
    return results
