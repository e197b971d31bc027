"""Scale sites of a DiT: where each residual branch's output (or its AdaLN gate) can be scaled.

An architecture adapter lists :class:`Gate` s, the finest unit: one residual branch of one stream
of one block. A granularity groups gates into :class:`Site` s, each one searched scalar:

* ``gate``  — every gate on its own (``double.7.img.attn``),
* ``layer`` — the streams of one sublayer share a scalar (``double.7.attn``),
* ``block`` — every gate of a block shares a scalar (``double.7``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Granularity = Literal["block", "layer", "gate"]
GRANULARITIES: tuple[str, ...] = ("block", "layer", "gate")


@dataclass(frozen=True)
class GateRef:
    """Where one gate lives in the module tree.

    ``module``/``output_index``/``chunk``/``chunks``: the forward output that carries the gate
    (or the branch output itself), and which of ``chunks`` equal slices of its last dimension.
    ``linear``/``linear_chunk``/``linear_chunks``: the Linear whose output rows produce those
    values, for folding the scale into weights (:meth:`Calibrator.bake`).
    """

    module: str
    output_index: int | None
    chunk: int
    chunks: int
    linear: str
    linear_chunk: int
    linear_chunks: int


@dataclass(frozen=True)
class Gate:
    """One residual branch: ``group`` (``double``, ``single``, ``block``), block ``index``,
    ``stream`` (``img``/``txt``, or None for a single-stream block) and ``branch`` (``attn``,
    ``mlp``, ``attn2``, ``cross``, or None when a block has one fused branch)."""

    group: str
    index: int
    stream: str | None
    branch: str | None
    ref: GateRef

    @property
    def block_name(self) -> str:
        return f"{self.group}.{self.index}"

    @property
    def layer_name(self) -> str:
        return self.block_name if self.branch is None else f"{self.block_name}.{self.branch}"

    @property
    def gate_name(self) -> str:
        parts = [self.block_name] + [p for p in (self.stream, self.branch) if p is not None]
        return ".".join(parts)

    def site_name(self, granularity: Granularity) -> str:
        return {"block": self.block_name, "layer": self.layer_name, "gate": self.gate_name}[granularity]

    def space_group(self, granularity: Granularity) -> str:
        if granularity == "block" or self.branch is None:
            return self.group
        return f"{self.group}.{self.branch}"


@dataclass(frozen=True)
class Site:
    """One searched scalar and the gates it multiplies."""

    name: str
    group: str
    gates: tuple[Gate, ...]


def group_sites(gates: Sequence[Gate], granularity: Granularity) -> list[Site]:
    """Sites at ``granularity``, in the adapter's gate order (first appearance)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r} (use one of {', '.join(GRANULARITIES)})")
    order: dict[str, list[Gate]] = {}
    groups: dict[str, str] = {}
    for gate in gates:
        name = gate.site_name(granularity)
        order.setdefault(name, []).append(gate)
        groups.setdefault(name, gate.space_group(granularity))
    return [Site(name, groups[name], tuple(members)) for name, members in order.items()]
