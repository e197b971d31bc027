"""Attach Calibri scales to a live diffusers transformer, switch candidates in place, bake.

One fp32 table holds every scale: a row per ensemble copy, a column per site, plus a constant 1.
Forward hooks on the modules that emit the gates multiply each gate slice by its table entry
(in fp32, cast back to the model's dtype), so all-ones is bit-identical to the untouched model and
a candidate switch is one in-place copy — no hook re-registration, no new tensors in the model.
The output weight ω and the ensemble are a diffusers ``ModelHook`` on the transformer (per
instance: no class is patched), which also learns from the pipeline's ``cache_context`` whether a
call is the conditional or the unconditional one.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from calibri.core.space import Float, Space

from .adapters import Adapter, Form
from .sites import Gate, Granularity, Site, group_sites

#: Search bounds and step sizes (the paper's set-up: s in [-1, 2], ω in [-10, 10], σ0 = 0.25).
SCALE_BOUNDS = (-1.0, 2.0)
OMEGA_BOUNDS = (-10.0, 10.0)
SCALE_SIGMA = 0.25
ENSEMBLE_HOOK = "calibri_ensemble"
#: Upper bounds on what multiplies the searched parameters (the paper uses 2 copies and 1 bucket):
#: beyond them the table, the space and the optimiser's state grow past any useful search.
MAX_COPIES = 16
MAX_TIME_BUCKETS = 32


def find_adapter(model: Any) -> Adapter:
    """The registered adapter for ``model``'s class (architectures arrive by plugin)."""
    from calibri.core.errors import PluginError
    from calibri.core.plugins import get_registry

    registry = get_registry()
    adapters = [reg.factory for reg in registry.items("architectures")
                if isinstance(reg.factory, type) and issubclass(reg.factory, Adapter)]
    for adapter_cls in adapters:
        if adapter_cls.matches(model):
            return adapter_cls()
    known = ", ".join(sorted(c for adapter_cls in adapters for c in adapter_cls.model_classes))
    raise PluginError(f"no Calibri adapter for {type(model).__name__} (adapters exist for: {known})")


@dataclass
class ScaleState:
    """What the hooks read: the table, which row (copy) applies, and whether scaling is on."""

    table: torch.Tensor  # [time buckets × copies, n_sites + 1] fp32; the last column is the constant 1
    row: int = 0
    offset: int = 0  # first row of the current time bucket
    rows: torch.Tensor | None = None  # per-sample copy index for this forward (batched CFG)
    active: bool = True

    def factors(self, columns: torch.Tensor, batch: int) -> torch.Tensor:
        if self.rows is None:
            row = self.offset + self.row
            return self.table[row : row + 1, columns]
        if self.rows.shape[0] != batch:
            raise RuntimeError(f"Calibri ensemble: a gate has batch {batch}, the call's copy index {self.rows.shape[0]}")
        return self.table[self.rows + self.offset][:, columns]


def _scale_slices(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``t`` [B, ..., chunks*D] times ``factor`` [B or 1, chunks] slice by slice, in fp32."""
    chunks = factor.shape[-1]
    shape = t.shape
    view = t.reshape(*shape[:-1], chunks, shape[-1] // chunks)
    f = factor.reshape(factor.shape[0], *([1] * (t.dim() - 2)), chunks, 1)
    return (view.float() * f).to(t.dtype).reshape(shape)


class _GateHook:
    """Forward hook on one module: scales the gate slices it emits."""

    def __init__(self, state: ScaleState, output_index: int | None, columns: torch.Tensor) -> None:
        self.state, self.output_index, self.columns = state, output_index, columns

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        state = self.state
        if not state.active:
            return output
        tensor = output if self.output_index is None else output[self.output_index]
        if self.columns.device != state.table.device:
            self.columns = self.columns.to(state.table.device)
        if state.table.device != tensor.device:
            state.table = state.table.to(tensor.device)
        scaled = _scale_slices(tensor, state.factors(self.columns, tensor.shape[0]))
        if self.output_index is None:
            return scaled
        items = list(output)
        items[self.output_index] = scaled
        return tuple(items)


def _sample_of(output: Any) -> torch.Tensor:
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def _with_sample(output: Any, sample: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output


def _weighted(sample: torch.Tensor, weight: float) -> torch.Tensor:
    return sample if weight == 1.0 else (sample.float() * weight).to(sample.dtype)


def _ensemble_hook_class() -> type:
    from .compat import ContextHook

    class EnsembleHook(ContextHook):
        """Applies ω and, for ensembles, runs each copy: ``distilled`` = Σ ω_m v^{s_m} over
        sequential passes; ``cfg`` = copy 0 on conditional calls, copy 1 on unconditional ones,
        each output rescaled so the pipeline's CFG formula yields ω_0 v_c + ω_1 v_u."""

        def __init__(self, calibrator: "Calibrator") -> None:
            super().__init__()
            self.calibrator = calibrator
            self._cond_latents: Any = None  # the last conditional call's latents (cfg_sequential)

        def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            cal = self.calibrator
            if cal.watch is not None:
                cal.watch()
            forward = self.original_forward()
            state = cal.state
            if not state.active:  # baked: ω is in the weights too
                return forward(*args, **kwargs)
            bucket = cal.time_bucket(kwargs.get("timestep"))
            state.offset = bucket * cal.copies
            try:
                return self._forward(cal, forward, state, cal.omega_of(bucket), args, kwargs)
            finally:
                state.offset = 0

        def _forward(self, cal: "Calibrator", forward: Any, state: ScaleState, omega: Sequence[float],
                     args: Any, kwargs: Any) -> Any:
            if cal.form == "cfg":
                return self._cfg(forward, state, omega, args, kwargs)
            outputs, total = None, None
            for m, weight in enumerate(omega):
                if weight == 0.0 and m > 0:
                    continue  # a copy with zero weight adds nothing
                state.row = m
                try:
                    out = forward(*args, **kwargs)
                finally:
                    state.row = 0
                sample = _sample_of(out).float() * weight if len(omega) > 1 else _weighted(_sample_of(out), weight)
                total = sample if total is None else total + sample
                outputs = out if outputs is None else outputs
            dtype = _sample_of(outputs).dtype
            return _with_sample(outputs, total.to(dtype))

        def _sequential_call(self, args: Any, kwargs: Any) -> str:
            """Conditional, unless it is the second call on the latents tensor the conditional
            call had (the unconditional call of the same step)."""
            latents = kwargs.get("hidden_states", args[0] if args else None)
            if latents is not None and latents is self._cond_latents:
                self._cond_latents = None
                return "uncond"
            self._cond_latents = latents
            return "cond"

        def _cfg(self, forward: Any, state: ScaleState, omega: Sequence[float], args: Any, kwargs: Any) -> Any:
            g = self.calibrator.guidance_scale
            if self.calibrator.adapter.cfg_renormalized and omega[0] != 0.0:
                # The pipeline rescales u' + g (c' - u') to the norm of c': keep c' at the norm of
                # v_c (factor ±1) and weight u' so that the guided direction is ω0 v_c + ω1 v_u's.
                cond_factor = 1.0 if g * omega[0] > 0 else -1.0
                uncond_factor = abs(g / omega[0]) * omega[1] / (1.0 - g)
            else:
                cond_factor, uncond_factor = omega[0] / g, omega[1] / (1.0 - g)
            name = self.call_name()
            if name is None and self.calibrator.adapter.cfg_sequential:
                name = self._sequential_call(args, kwargs)
            if name in ("cond", "uncond"):
                row, factor = (0, cond_factor) if name == "cond" else (1, uncond_factor)
                state.row = row
                try:
                    out = forward(*args, **kwargs)
                finally:
                    state.row = 0
                return _with_sample(out, _weighted(_sample_of(out), factor))
            if not self.calibrator.adapter.cfg_batched:
                raise RuntimeError("Calibri cfg ensemble: the pipeline did not say which call is conditional "
                                   "(no cache_context) and this architecture neither batches CFG nor sets "
                                   "cfg_sequential")
            latents = kwargs.get("hidden_states", args[0] if args else None)
            batch = latents.shape[0]
            if batch % 2:
                raise RuntimeError("Calibri cfg ensemble: expected a CFG batch [unconditional; conditional]; "
                                   "call the pipeline with the calibration's guidance_scale")
            half = batch // 2
            state.rows = torch.cat([torch.ones(half, dtype=torch.long), torch.zeros(half, dtype=torch.long)]).to(
                state.table.device)
            try:
                out = forward(*args, **kwargs)
            finally:
                state.rows = None
            sample = _sample_of(out)
            if cond_factor == 1.0 and uncond_factor == 1.0:
                return out
            combined = torch.cat([_weighted(sample[:half], uncond_factor), _weighted(sample[half:], cond_factor)])
            return _with_sample(out, combined)

    return EnsembleHook


@dataclass
class _Baked:
    originals: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)


class Calibrator:
    """Calibri scales attached to one transformer.

    ``copies`` > 1 makes a Calibri Ensemble in ``form`` ``distilled`` (every copy sees the prompt;
    ω init (1, 0, ...)) or ``cfg`` (two copies: conditional and unconditional; ω init
    (g, 1 − g) reproduces classifier-free guidance at scale g exactly, with the pipeline called at
    ``guidance_scale`` g).
    """

    def __init__(self, transformer: torch.nn.Module, granularity: Granularity = "gate", copies: int = 1,
                 form: Form | None = None, guidance_scale: float | None = None,
                 adapter: Adapter | None = None, time_buckets: int = 1) -> None:
        self.transformer = transformer
        self.adapter = adapter or find_adapter(transformer)
        self.granularity: Granularity = granularity
        self.form: Form = form or ("single" if copies == 1 else self.adapter.default_form)
        if self.form not in ("single", "distilled", "cfg"):
            raise ValueError(f"unknown ensemble form {self.form!r} (use single, distilled or cfg)")
        if self.form == "single" and copies != 1:
            raise ValueError("form 'single' has one copy")
        if self.form == "cfg":
            if copies != 2:
                raise ValueError("the cfg form has exactly two copies (conditional, unconditional)")
            if guidance_scale is None or guidance_scale == 1.0:
                raise ValueError("the cfg form needs the pipeline's guidance_scale (not 1)")
        if not 1 <= copies <= MAX_COPIES:
            raise ValueError(f"copies must be between 1 and {MAX_COPIES}, got {copies}")
        if not 1 <= time_buckets <= MAX_TIME_BUCKETS:
            raise ValueError(f"time_buckets must be between 1 and {MAX_TIME_BUCKETS}, got {time_buckets}")
        self.copies = copies
        self.time_buckets = time_buckets
        self.guidance_scale = guidance_scale
        self.gates: list[Gate] = self.adapter.gates(transformer)
        self.sites: list[Site] = group_sites(self.gates, granularity)
        self._site_index = {site.name: i for i, site in enumerate(self.sites)}
        self.omega: list[float] = list(self.initial_omega())
        self._handles: list[Any] = []
        self._baked: _Baked | None = None
        self.state: ScaleState | None = None
        self._attached = False
        #: Called on every transformer call while attached (``apply_calibration`` sets it to check
        #: the pipeline's sampling settings against the calibration's).
        self.watch: Any = None

    # -- description ------------------------------------------------------------------------
    @property
    def site_names(self) -> list[str]:
        return [site.name for site in self.sites]

    def initial_omega(self) -> tuple[float, ...]:
        """ω of every (time bucket, copy), bucket-major."""
        if self.form == "cfg":
            g = float(self.guidance_scale)  # type: ignore[arg-type]
            per_bucket: tuple[float, ...] = (g, 1.0 - g)
        else:
            per_bucket = (1.0,) + (0.0,) * (self.copies - 1)
        return per_bucket * self.time_buckets

    def _prefixes(self) -> list[str]:
        """One prefix per table row (time bucket ``t<b>.``, then copy ``c<m>.``), bucket-major."""
        times = [""] if self.time_buckets == 1 else [f"t{b}." for b in range(self.time_buckets)]
        copies = [""] if self.copies == 1 else [f"c{m}." for m in range(self.copies)]
        return [t + c for t in times for c in copies]

    def parameter_names(self, with_omega: bool = True) -> list[str]:
        """Searched names: sites (prefixed ``c<m>.`` per copy in an ensemble and ``t<b>.`` per
        time bucket), then ω (``omega``, ``omega.<m>``, ``t<b>.omega…``)."""
        names = [prefix + n for prefix in self._prefixes() for n in self.site_names]
        if with_omega:
            times = [""] if self.time_buckets == 1 else [f"t{b}." for b in range(self.time_buckets)]
            copies = ["omega"] if self.copies == 1 else [f"omega.{m}" for m in range(self.copies)]
            names += [t + c for t in times for c in copies]
        return names

    @property
    def rows(self) -> int:
        return self.copies * self.time_buckets

    def time_bucket(self, timestep: Any) -> int:
        """The time bucket of a call: equal intervals of the noise level, from pure noise (0) down."""
        if self.time_buckets == 1 or timestep is None:
            return 0
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        noise = min(max(t / self.adapter.timestep_max, 0.0), 1.0)
        return min(int((1.0 - noise) * self.time_buckets), self.time_buckets - 1)

    def omega_of(self, bucket: int) -> list[float]:
        return self.omega[bucket * self.copies : (bucket + 1) * self.copies]

    def count(self, with_omega: bool = True) -> int:
        return len(self.parameter_names(with_omega))

    def space(self, with_omega: bool = True, sigma: float = SCALE_SIGMA, omega_sigma: float | None = None) -> Space:
        """The search space: scales on [-1, 2] from 1; ω on [-10, 10] from its initial value,
        with σ scaled to ω's magnitude (a CFG weight of 7 moves in larger steps than a scale)."""
        dims = []
        for prefix in self._prefixes():
            for site in self.sites:
                dims.append(Float(prefix + site.name, *SCALE_BOUNDS, init=1.0, sigma=sigma, group=site.group))
        if with_omega:
            for name, init in zip(self.parameter_names()[-self.rows:], self.omega_init_values()):
                step = omega_sigma if omega_sigma is not None else sigma * max(1.0, abs(init))
                dims.append(Float(name, *OMEGA_BOUNDS, init=init, sigma=step, group="omega"))
        return Space(dims)

    def omega_init_values(self) -> tuple[float, ...]:
        return self.initial_omega()

    # -- attaching --------------------------------------------------------------------------
    def attach(self) -> "Calibrator":
        """Register the hooks (once). Values start at identity: all scales 1, ω at its init."""
        if self._attached:
            return self
        from .compat import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        if ENSEMBLE_HOOK in registry.hooks:
            raise RuntimeError(f"this {type(self.transformer).__name__} already carries a Calibri calibration; "
                               "detach() it before attaching another")
        device = next((p.device for p in self.transformer.parameters()), torch.device("cpu"))
        table = torch.ones(self.rows, len(self.sites) + 1, dtype=torch.float32, device=device)
        self.state = ScaleState(table)
        self.omega = list(self.initial_omega())
        constant = len(self.sites)
        by_output: dict[tuple[str, int | None], dict[int, int]] = {}
        chunk_counts: dict[tuple[str, int | None], int] = {}
        for column, site in enumerate(self.sites):
            for gate in site.gates:
                key = (gate.ref.module, gate.ref.output_index)
                by_output.setdefault(key, {})[gate.ref.chunk] = column
                chunk_counts[key] = gate.ref.chunks
        for (module_name, output_index), chunk_columns in by_output.items():
            columns = torch.tensor([chunk_columns.get(c, constant) for c in range(chunk_counts[(module_name, output_index)])],
                                   dtype=torch.long, device=device)
            module = self.transformer.get_submodule(module_name)
            self._handles.append(module.register_forward_hook(_GateHook(self.state, output_index, columns)))
        registry.register_hook(_ensemble_hook_class()(self), ENSEMBLE_HOOK)
        self._attached = True
        return self

    def detach(self) -> None:
        """Remove every hook and restore baked weights: the model is as it was."""
        if not self._attached:
            return
        if self._baked is not None:
            self.unbake()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        from .compat import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.transformer).remove_hook(ENSEMBLE_HOOK, recurse=False)
        self._attached = False

    # -- values -----------------------------------------------------------------------------
    def set_values(self, values: Mapping[str, float] | Sequence[float] | np.ndarray) -> None:
        """Write a candidate: a mapping by :meth:`parameter_names` (missing names keep their
        value) or a vector in that order (with or without ω). In place; cheap."""
        if self._baked is not None:
            raise RuntimeError("the calibration is baked into the weights; unbake() before changing values")
        assert self.state is not None, "attach() first"
        names = self.parameter_names()
        n_scales = len(names) - self.rows
        if isinstance(values, Mapping):
            unknown = set(values) - set(names)
            if unknown:
                raise KeyError(f"not parameters of this calibration: {sorted(unknown)[:5]}")
            current = self.values()
            vector = [float(values.get(name, current[name])) for name in names]
        else:
            vector = [float(v) for v in values]
            if len(vector) == n_scales:
                vector += self.omega
            if len(vector) != len(names):
                raise ValueError(f"expected {n_scales} or {len(names)} values, got {len(vector)}")
        scales = torch.tensor(vector[:n_scales], dtype=torch.float32).reshape(self.rows, len(self.sites))
        self.state.table[:, : len(self.sites)].copy_(scales)
        self.omega = vector[n_scales:]

    def values(self) -> dict[str, float]:
        assert self.state is not None, "attach() first"
        scales = self.state.table[:, : len(self.sites)].detach().cpu().reshape(-1).tolist()
        return dict(zip(self.parameter_names(), [*scales, *self.omega]))

    def reset(self) -> None:
        """Back to identity (all scales 1, ω at its initial value)."""
        names = self.parameter_names()
        self.set_values([1.0] * (len(names) - self.rows) + list(self.initial_omega()))

    # -- baking -----------------------------------------------------------------------------
    def bake(self) -> None:
        """Fold the current scales (and ω) into the weights: gate rows of the modulation Linears
        (or the branch's output projection) and the final projection. Inference then costs
        nothing extra; :meth:`unbake` restores the original weights exactly."""
        if self.copies != 1 or self.time_buckets != 1:
            raise RuntimeError("an ensemble (several copies) or a timestep-dependent calibration cannot be baked "
                               "into one set of weights")
        if self._baked is not None:
            return
        assert self.state is not None, "attach() first"
        baked = _Baked()
        scales = self.state.table[0, : len(self.sites)].detach().cpu().tolist()
        with torch.no_grad():
            for site, s in zip(self.sites, scales):
                for gate in site.gates:
                    ref = gate.ref
                    self._scale_rows(baked, ref.linear, ref.linear_chunk, ref.linear_chunks, s)
            self._scale_rows(baked, self.adapter.output_linear, 0, 1, self.omega[0])
        self._baked = baked
        self.state.active = False

    def _scale_rows(self, baked: _Baked, linear_name: str, chunk: int, chunks: int, factor: float) -> None:
        linear = self.transformer.get_submodule(linear_name)
        rows = linear.weight.shape[0] // chunks
        sl = slice(chunk * rows, (chunk + 1) * rows)
        for pname in ("weight", "bias"):
            param = getattr(linear, pname, None)
            if param is None:
                continue
            key = (f"{linear_name}.{pname}", f"{chunk}/{chunks}")
            if key not in baked.originals:
                baked.originals[key] = param.data[sl].clone()
            param.data[sl] = (baked.originals[key].float() * factor).to(param.dtype)

    def detach_hooks_keep_weights(self) -> None:
        """Remove the hooks but keep baked weights: a plain model that carries the calibration
        (to save with ``save_pretrained``). Needs :meth:`bake` first."""
        if self._baked is None:
            raise RuntimeError("bake() first, or use detach() to restore the original model")
        self._baked = None
        self.state.active = True  # type: ignore[union-attr]
        self.detach()

    def unbake(self) -> None:
        if self._baked is None:
            return
        with torch.no_grad():
            for (pname, chunk_text), original in self._baked.originals.items():
                module_name, attr = pname.rsplit(".", 1)
                param = getattr(self.transformer.get_submodule(module_name), attr)
                chunk, chunks = map(int, chunk_text.split("/"))
                rows = param.shape[0] // chunks
                param.data[chunk * rows : (chunk + 1) * rows] = original
        self._baked = None
        assert self.state is not None
        self.state.active = True

    @property
    def baked(self) -> bool:
        return self._baked is not None


def attach(transformer: torch.nn.Module, granularity: Granularity = "gate", copies: int = 1, form: Form | None = None,
           guidance_scale: float | None = None, time_buckets: int = 1) -> Calibrator:
    """Attach Calibri scales to ``transformer`` (identity until values are set)."""
    return Calibrator(transformer, granularity, copies, form, guidance_scale, time_buckets=time_buckets).attach()

