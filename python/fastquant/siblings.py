"""Sibling projections as one product: fastquant layers that read the same input (q, k, v; gate, up) computed
by one call when the decode step is compiled.

At batch 1 a small model's decode step calls its linear layers ~200 times per token (SmolLM2-135M: 211). Every
call pays a fixed cost (the op's checks, an output allocation, a fork and join of the thread team: a few
microseconds on 2 cores) and streams a short weight (k_proj: 192 x 576 int8, 110 KB) that the threads cut into
slivers. vLLM merges these projections in its model code (``QKVParallelLinear``, ``MergedColumnParallelLinear``);
here the groups are found, not written per model: one probe forward records which fastquant layers receive the
very same input tensor. Their weights are then laid out again as consecutive rows of one tensor, each layer
keeping a view of its own rows, so the merged layer costs no memory and ``state_dict``, ``fastquant.save`` and
``load_state_dict`` see the same values as before. While :func:`merged` is active (``compile_for_decode`` exports
its step inside it) the first layer of a group called on an input computes every member's output in one call and
the others take their slice; outside it every layer computes alone, exactly as before.

Each output column is the same dot product either way (the kernels compute columns independently, and x is
rounded once per row either way), so merging changes no result: tested bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from fastquant.modules import Int4Linear, Int8Linear

_MERGEABLE = (Int8Linear, Int4Linear)
# Where the merged layers hang while a step is exported: registered, so that export lifts their tensors as the
# model's own buffers (read by the compiled step from the model at run time), and removed afterwards.
_HOLDER = "_fastquant_merged_siblings"


def _format(layer: nn.Module) -> tuple:
    """What layers must share to be one layer: class, input width, grid, activation rounding, dtypes, device."""
    return (
        type(layer),
        layer.in_features,
        layer.group_size,
        getattr(layer, "symmetric", None),
        layer.int8_activations,
        layer._dtype,
        layer._parameters["bias"] is None,
        tuple((name, t.dtype, t.device) for name, t in layer._buffers.items() if t is not None),
    )


def find(model: nn.Module, probe: dict[str, Any]) -> list[list[nn.Module]]:
    """Groups of two or more fastquant int8/int4 layers that received the very same input tensor during one
    forward of ``model(**probe)`` (without gradient) and share a format, each in call order. A layer called more
    than once joins no group."""
    inputs: dict[nn.Module, list[Tensor]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            inputs.setdefault(module, []).append(args[0])

    layers = [m for m in model.modules() if type(m) in _MERGEABLE]
    handles = [m.register_forward_pre_hook(record) for m in layers]
    try:
        with torch.no_grad():
            model(**probe)
    finally:
        for h in handles:
            h.remove()
    # Keyed by the input's id: ``inputs`` holds every input, so no id is reused while grouping.
    by_input: dict[tuple, list[nn.Module]] = {}
    for module, seen in inputs.items():
        if len(seen) == 1:
            by_input.setdefault((id(seen[0]), _format(module)), []).append(module)
    return [members for members in by_input.values() if len(members) > 1]


def _back_to_back(tensors: list[Tensor]) -> Tensor | None:
    """The one tensor whose rows are ``tensors``' rows in order, if they already lie back to back in one storage
    (a previous merge), else None."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        same = t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not (same and t.is_contiguous() and t.storage_offset() == offset and t.shape[1:] == first.shape[1:]):
            return None
        offset += t.numel()
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        first.untyped_storage(), first.storage_offset(), shape
    )


def _stacked(tensors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """(rows, views): one tensor holding ``tensors`` as consecutive rows and a view of each one's rows. When they
    already lie so, no copy, and the views are ``tensors`` themselves: a compiled step built before holds those
    very objects, and a new object would look like a replaced weight to its staleness check."""
    rows = _back_to_back(tensors)
    if rows is not None:
        return rows, tensors
    rows = torch.cat([t.detach() for t in tensors])
    views, start = [], 0
    for t in tensors:
        views.append(rows[start : start + t.shape[0]])
        start += t.shape[0]
    return rows, views


@torch.no_grad()
def merge_rows(members: list[nn.Module]) -> nn.Module:
    """One layer of the members' format computing all their outputs, in order. The members' tensors become views
    of its tensors (their values unchanged; the first merge copies each weight once, later ones nothing)."""
    first = members[0]
    n = sum(m.out_features for m in members)
    has_bias = first._parameters["bias"] is not None
    if isinstance(first, Int8Linear):
        merged = Int8Linear(
            first.in_features, n, has_bias, first.group_size, "meta", first._dtype, first.int8_activations
        )
    else:
        merged = Int4Linear(
            first.in_features,
            n,
            has_bias,
            first.group_size,
            first.symmetric,
            "meta",
            first._dtype,
            first.int8_activations,
        )
    for name, t in first._buffers.items():
        if t is None:
            continue
        rows, views = _stacked([m._buffers[name] for m in members])
        merged._buffers[name] = rows
        for m, view in zip(members, views, strict=True):
            m._buffers[name] = view
    if has_bias:
        biases = [m._parameters["bias"] for m in members]
        rows, views = _stacked(biases)
        merged._parameters["bias"] = nn.Parameter(rows, requires_grad=False)
        for m, view, bias in zip(members, views, biases, strict=True):
            if view is not bias:
                m._parameters["bias"] = nn.Parameter(view, requires_grad=bias.requires_grad)
    return merged


class _Group:
    """A merged group while :func:`merged` is active: the first member called on an input runs the merged layer
    and keeps the other members' slices for them, keyed by the input's identity and version (an input changed in
    place since, or another input, computes afresh)."""

    def __init__(self, members: list[nn.Module], merged_layer: nn.Module) -> None:
        self.members = members
        self.layer = merged_layer
        self.sizes = [m.out_features for m in members]
        self.clear()

    def clear(self) -> None:
        self.x: Tensor | None = None
        self.version = -1
        self.parts: list[Tensor | None] = []

    def output(self, index: int, x: Tensor) -> Tensor:
        if not (self.x is x and self.version == x._version and self.parts[index] is not None):
            y = self.layer(x)
            # Each part as the member alone returns it: contiguous (a no-op for one row of x).
            self.parts = [p.contiguous() for p in y.split(self.sizes, dim=-1)]
            self.x, self.version = x, x._version
        part, self.parts[index] = self.parts[index], None
        return part


@contextmanager
def merged(model: nn.Module, groups: list[list[nn.Module]]) -> Iterator[None]:
    """Within the context the groups' members compute through their merged layer (see the module docstring);
    the merged layers are registered under ``model`` for as long, so that ``torch.export`` lifts their tensors as
    buffers. Their weights are laid out as views first (kept after the context)."""
    active = [_Group(members, merge_rows(members)) for members in groups]
    nn.Module.__setattr__(model, _HOLDER, nn.ModuleList([g.layer for g in active]))
    try:
        for group in active:
            for i, member in enumerate(group.members):
                # An instance attribute: nn.Module.__call__ looks up self.forward, so this shadows the class's.
                member.forward = lambda x, g=group, i=i: g.output(i, x)
        yield
    finally:
        for group in active:
            group.clear()
            for member in group.members:
                member.__dict__.pop("forward", None)
        delattr(model, _HOLDER)
