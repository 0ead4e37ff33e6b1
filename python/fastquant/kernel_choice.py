"""Measured kernel choice for pruned layers: keep the sparse kernel only where it beats the dense one.

Whether a sparse weight pays off depends on the machine (memory bandwidth, cores, instruction set), the
layer's shape and its sparsity, so the choice is timed, not predicted: at decode (one token) a pruned layer
runs both its sparse form and the dense form of the same numbers, and the faster one is kept. Decisions are
cached per process by everything that changes the answer, so a model with many layers of a few shapes
measures each shape once.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from fastquant.modules import Int8Linear, SparseLinear

# Enough repetitions that the median is stable to a few percent for layers of 10 us and more, few enough
# that patching a model with dozens of distinct shapes takes well under a second per shape.
WARMUP_CALLS = 3
TIMED_CALLS = 15


@dataclass(frozen=True)
class KernelChoice:
    winner: str  # "sparse" or "dense"
    dense_kind: str  # "float" or "int8"
    sparse_ms: float
    dense_ms: float
    sparsity: float

    def describe(self) -> str:
        faster, slower = sorted((self.sparse_ms, self.dense_ms))
        ratio = slower / faster if faster > 0 else float("inf")
        kept = "sparse kernel" if self.winner == "sparse" else f"dense {self.dense_kind} kernel"
        return (
            f"{self.sparsity:.0%} pruned; {kept} kept: sparse {self.sparse_ms:.3f} ms vs dense "
            f"{self.dense_kind} {self.dense_ms:.3f} ms at 1 token ({ratio:.2f}x)"
        )


_cache: dict[tuple, KernelChoice] = {}


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    from fastquant import _native

    isa = _native.native.cpu_isa() if _native.native is not None else "reference"
    return f"cpu:{isa}:{torch.get_num_threads()} threads"


def _median_ms(layer: nn.Module, x: torch.Tensor) -> float:
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(WARMUP_CALLS):
            layer(x)
        times = []
        for _ in range(TIMED_CALLS):
            sync()
            start = time.perf_counter()
            layer(x)
            sync()
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def choose_kernel(sparse: SparseLinear, dense: nn.Module) -> KernelChoice:
    """Time ``sparse`` against ``dense`` (the same pruned weights as nn.Linear/Conv1D or Int8Linear) on one
    token and say which to keep. Cached by device, threads, shape, value format and sparsity (to 1%)."""
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
        # Alternate the two, twice, so a frequency change or a noisy neighbour hits both alike.
        sparse_runs, dense_runs = [], []
        for _ in range(2):
            sparse_runs.append(_median_ms(sparse, x))
            dense_runs.append(_median_ms(dense, x))
        sparse_ms, dense_ms = min(sparse_runs), min(dense_runs)
        winner = "sparse" if sparse_ms < dense_ms else "dense"
        _cache[key] = KernelChoice(winner, dense_kind, sparse_ms, dense_ms, sparse.sparsity)
    cached = _cache[key]
    return KernelChoice(cached.winner, dense_kind, cached.sparse_ms, cached.dense_ms, sparse.sparsity)
