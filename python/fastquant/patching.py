"""fastquant.patch: swap compressed layers into a model in place, and report what was done."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from fastquant import _native
from fastquant.modules import SUPPORTED_GROUP_SIZES, Int8Linear, is_quantizable_linear, linear_weight

METHODS = ("int8",)

# Below this many weights the int8 kernel cannot beat the float one: the layer is a few KiB, sits in
# L1/L2 either way, and the per-call overhead dominates.
MIN_WEIGHT_ELEMENTS = 4096

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    format: str
    bytes_before: int
    bytes_after: int
    kernel: str
    note: str = ""


@dataclass
class Report:
    layers: list[LayerReport]

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    def to_markdown(self) -> str:
        lines = [
            "| layer | shape (out, in) | format | bytes before | bytes after | kernel (M=1 / M=512) | note |",
            "|---|---|---|---:|---:|---|---|",
        ]
        for r in self.layers:
            lines.append(
                f"| {r.name} | {r.shape[0]}x{r.shape[1]} | {r.format} | {r.bytes_before:,} | {r.bytes_after:,} "
                f"| {r.kernel} | {r.note} |"
            )
        ratio = self.bytes_before / max(self.bytes_after, 1)
        lines.append(f"| **total** | | | {self.bytes_before:,} | {self.bytes_after:,} | | {ratio:.2f}x smaller |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _matches(name: str, patterns: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(name == p or p in parts or name.endswith("." + p) for p in patterns)


def _tensor_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """For each parameter storage, the modules that hold it (several when weights are tied)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(param.data_ptr(), []).append((name, module))
    return owners


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def patch(
    model: nn.Module,
    method: str = "int8",
    *,
    group_size: int | None = None,
    skip: Iterable[str] = ("lm_head",),
    filter_fn: FilterFn | None = None,
    quantize_tied: bool = False,
) -> nn.Module:
    """Replace the model's linear layers with compressed ones, in place, and return the model.

    Args:
        method: ``"int8"``: int8 weight-only, per-channel scales or per-group with ``group_size``.
        group_size: None for one scale per output channel, else one of 32, 64, 128, 256.
        skip: layer names (full qualified names or single name components) to leave in float.
        filter_fn: ``filter_fn(module, qualified_name) -> bool``; only layers it accepts are compressed.
        quantize_tied: a linear weight shared with an embedding is left in float unless this is True;
            then the linear layer gets its own int8 copy and the embedding keeps the float weight.

    Layers that are skipped keep a reason, shown by :func:`fastquant.report`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
    if group_size is not None and group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be None (per-channel) or one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    skip = tuple(skip)
    owners = _tensor_owners(model)
    notes: dict[str, str] = getattr(model, "_fastquant_notes", {})
    replaced: dict[int, Int8Linear] = {}  # weight storage -> its quantized layer, so shared linears stay shared

    targets = [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if is_quantizable_linear(module) and not isinstance(module, Int8Linear)
    ]
    for name, module in targets:
        weight = linear_weight(module)
        if _matches(name, skip):
            notes[name] = "skipped by name"
            continue
        if filter_fn is not None and not filter_fn(module, name):
            notes[name] = "rejected by filter_fn"
            continue
        if weight.numel() < MIN_WEIGHT_ELEMENTS:
            notes[name] = f"too small to gain ({weight.numel()} weights < {MIN_WEIGHT_ELEMENTS})"
            continue
        storage = module.weight.data_ptr()
        other_owners = [n for n, m in owners.get(storage, []) if not is_quantizable_linear(m)]
        if other_owners and not quantize_tied:
            notes[name] = f"weight tied to {', '.join(other_owners)}; pass quantize_tied=True to quantize a copy"
            continue
        if storage not in replaced:
            try:
                replaced[storage] = Int8Linear.from_linear(module, group_size)
            except ValueError as exc:
                raise ValueError(f"layer {name!r}: {exc}") from exc
        _set_submodule(model, name, replaced[storage])
        notes[name] = f"int8 copy; float weight kept for {', '.join(other_owners)}" if other_owners else ""
    model._fastquant_notes = notes
    return model


def _kernel_paths(layer: Int8Linear) -> str:
    device = layer.qweight.device
    n, k = layer.qweight.shape
    paths = [_native.int8_linear_kernel_path(device, m, n, k, layer.group_size_arg, layer.dtype) for m in (1, 512)]
    return paths[0] if paths[0] == paths[1] else " / ".join(paths)


def report(model: nn.Module) -> Report:
    """A per-layer table of the model's linear layers: name, shape, format, bytes before/after, kernel."""
    notes: dict[str, str] = getattr(model, "_fastquant_notes", {})
    rows: list[LayerReport] = []
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            n, k = module.qweight.shape
            float_bytes = n * k * torch.finfo(module.dtype).bits // 8
            packed_bytes = module.qweight.numel() + module.scales.numel() * module.scales.element_size()
            rows.append(
                LayerReport(
                    name, (n, k), module.format, float_bytes, packed_bytes, _kernel_paths(module), notes.get(name, "")
                )
            )
        elif is_quantizable_linear(module):
            weight = linear_weight(module)
            size = weight.numel() * weight.element_size()
            rows.append(
                LayerReport(
                    name,
                    tuple(weight.shape),
                    f"float ({str(weight.dtype).removeprefix('torch.')})",
                    size,
                    size,
                    "torch",
                    notes.get(name, ""),
                )
            )
    return Report(rows)
