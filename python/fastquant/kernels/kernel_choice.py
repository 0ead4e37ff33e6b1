"""Measured kernel choice for pruned layers: keep the sparse kernel only where it beats the dense one.

Whether a sparse weight pays off depends on the machine (memory bandwidth, cores, instruction set), the
layer's shape and its sparsity, so the choice is timed, not predicted: at decode (one token) a pruned layer
runs its sparse form in each layout (bitmap16; csr16, which does work per kept weight rather than per 16
columns) and the dense form of the same numbers, and the fastest is kept. Decisions are
cached per process by everything that changes the answer, so a model with many layers of a few shapes
measures each shape once.

Each timed call reads its weights from memory, not from cache: at decode a token streams every layer of the
model once, so a layer's weights have left the cache by the time it runs again (a model worth compressing is
larger than the last-level cache). Timing one copy over and over would instead measure a cache-resident
weight, where the dense kernel (fewer instructions per weight) wins and the byte savings of the sparse one
do not show. So the calls rotate over copies of the layer totalling twice the last-level cache.
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastquant.modules import Int8Linear, SparseLinear

# Enough repetitions that the median is stable to a few percent for layers of 10 us and more, few enough
# that patching a model with dozens of distinct shapes takes well under a second per shape.
WARMUP_CALLS = 3
TIMED_CALLS = 25
# fastquant.patch times no layer with fewer weights (64K: 256 KiB in float32): at one token either kernel
# takes a few microseconds, mostly the call itself, and timing it would cost more than the choice can save.
MIN_TIMED_WEIGHTS = 2**16


@dataclass(frozen=True)
class KernelChoice:
    winner: str  # "sparse" or "dense"
    layout: str  # the faster sparse layout: "bitmap16" or "csr16"
    dense_kind: str  # "float" or "int8"
    sparse_ms: dict[str, float]  # per sparse layout timed
    dense_ms: float
    sparsity: float

    def describe(self) -> str:
        best_sparse = self.sparse_ms[self.layout]
        faster, slower = sorted((best_sparse, self.dense_ms))
        ratio = slower / faster if faster > 0 else float("inf")
        kept = f"sparse {self.layout} kernel" if self.winner == "sparse" else f"dense {self.dense_kind} kernel"
        timed = ", ".join(f"{layout} {ms:.3f} ms" for layout, ms in self.sparse_ms.items())
        return (
            f"{self.sparsity:.0%} pruned; {kept} kept: sparse {timed} vs dense {self.dense_kind} "
            f"{self.dense_ms:.3f} ms at 1 token, weights from memory ({ratio:.2f}x)"
        )


_cache: dict[tuple, KernelChoice] = {}


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    from fastquant.kernels import extension

    isa = extension.native.cpu_isa() if extension.native is not None else "reference"
    return f"cpu:{isa}:{torch.get_num_threads()} threads"


# Used when the cache size cannot be read (larger than the last-level cache of current server CPUs and GPUs).
DEFAULT_LAST_LEVEL_CACHE_BYTES = 64 * 2**20
MAX_COPIES = 256


@functools.cache
def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or (
            DEFAULT_LAST_LEVEL_CACHE_BYTES
        )
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=DEFAULT_LAST_LEVEL_CACHE_BYTES)


def _weight_bytes(layer: nn.Module) -> int:
    tensors = {id(t): t for t in [*layer.parameters(), *layer.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def _copies_from_memory(layer: nn.Module, device: torch.device) -> list[nn.Module]:
    """``layer`` and enough copies of it that cycling through them evicts each one from the cache."""
    wanted = math.ceil(2 * last_level_cache_bytes(device) / max(_weight_bytes(layer), 1))
    return [layer] + [copy.deepcopy(layer) for _ in range(min(MAX_COPIES, max(wanted, 2)) - 1)]


def _median_ms(layers: list[nn.Module], x: torch.Tensor) -> float:
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for layer in layers[: max(WARMUP_CALLS, 2)]:
            layer(x)
        times = []
        for i in range(TIMED_CALLS):
            layer = layers[(i + 1) % len(layers)]
            sync()
            start = time.perf_counter()
            layer(x)
            sync()
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def choose_kernel(sparse: SparseLinear, dense: nn.Module) -> KernelChoice:
    """Time ``sparse`` in each layout (bitmap16, and csr16 where K allows) against ``dense`` (the same pruned
    weights as nn.Linear/Conv1D or Int8Linear) on one token and say which to keep. Cached by device, threads,
    shape, value format and sparsity (to 1%)."""
    dense_kind = "int8" if isinstance(dense, Int8Linear) else "float"
    device = sparse.masks.device
    key = (
        _device_key(device),
        sparse.out_features,
        sparse.in_features,
        sparse.values.dtype,
        sparse.group_size,
        sparse.dtype,
        sparse.bias is not None,
        dense_kind,
        round(sparse.sparsity, 2),
    )
    if key not in _cache:
        x = torch.randn(1, sparse.in_features, dtype=sparse.dtype, device=device)
        candidates = {
            layout: _copies_from_memory(copy.deepcopy(sparse).set_layout(layout), device) for layout in sparse.layouts()
        }
        candidates["dense"] = _copies_from_memory(dense, device)
        # Alternate the candidates, twice, so a frequency change or a noisy neighbour hits all alike.
        runs: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(2):
            for name, copies in candidates.items():
                runs[name].append(_median_ms(copies, x))
        del candidates
        best = {name: min(times) for name, times in runs.items()}
        dense_ms = best.pop("dense")
        layout = min(best, key=best.__getitem__)
        winner = "sparse" if best[layout] < dense_ms else "dense"
        _cache[key] = KernelChoice(winner, layout, dense_kind, best, dense_ms, sparse.sparsity)
    cached = _cache[key]
    return KernelChoice(cached.winner, cached.layout, dense_kind, cached.sparse_ms, cached.dense_ms, sparse.sparsity)
