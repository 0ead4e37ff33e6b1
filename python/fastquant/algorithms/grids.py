"""Quantization grids: what a weight is rounded onto, by round-to-nearest or inside GPTQ's column loop.

A *grid* describes a format (int8 per-channel or per-group; int4 per-group, symmetric or with an offset). For
one layer it gives:

- :meth:`rtn`: codes and scales by round-to-nearest (what ``fastquant.patch`` does without calibration);
- :meth:`rounder`: a :class:`ColumnRounder` that GPTQ (:func:`fastquant.pruning.sparsegpt_prune`) calls for one
  input column at a time, so that one loop quantizes every format. int8 fixes its scales before the loop (from
  the weight it is given); int4 fixes each group's scale (and offset) when the loop reaches the group's first
  column, from the weights as they are then (already carrying the compensation of the columns before), as the
  reference GPTQ implementations do: a group's grid then fits the values that will actually be rounded.

Codes are int8 (N, K) for int8 and uint8 (N, K), 0..15 and unpacked, for int4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastquant.kernels import reference

INT4_GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class Quantized:
    """A layer's codes and grid: int8 codes with fp32 scales, or uint8 int4 codes with fp16 scales/offsets."""

    codes: Tensor
    scales: Tensor
    offsets: Tensor | None = None


class ColumnRounder:
    """Rounds a (K, N)-transposed weight one input column (a row of length N) at a time, recording the codes.

    ``group_size`` > 0 asks the caller to call :meth:`start_group` with the current values of columns
    [first, first + group_size) before rounding the first of them, and to keep a group inside one lazy-update
    block (so those values are up to date); 0 means the grid is fixed already."""

    group_size: int = 0

    def start_group(self, first: int, columns: Tensor) -> None:
        """Fix the grid of the group starting at column ``first``; ``columns`` is (count, N)."""

    def fix_groups(self, weight_t: Tensor) -> None:
        """Fix every group's grid at once from ``weight_t`` (K, N), before the loop ("static groups"): what GPTQ
        with activation order needs, since it reaches a group's columns out of order."""
        if self.group_size == 0:
            return  # the grid is fixed already
        for first in range(0, weight_t.shape[0], self.group_size):
            self.start_group(first, weight_t[first : first + self.group_size])

    def round(self, index: int, column: Tensor) -> Tensor:
        """Column ``index`` (N,) rounded onto the grid, as fp32 values; records its codes."""
        raise NotImplementedError

    def result(self) -> Quantized:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- int8
@dataclass(frozen=True)
class Int8Grid:
    """Symmetric int8 on [-127, 127], one fp32 scale per output channel (``group_size`` -1) or per group."""

    group_size: int = -1

    def rtn(self, weight: Tensor) -> Quantized:
        codes, scales = reference.int8_quantize(weight, self.group_size)
        return Quantized(codes, scales)

    def dequantize(self, q: Quantized) -> Tensor:
        return reference.int8_dequantize(q.codes, q.scales, self.group_size)

    def rounder(self, weight: Tensor, scales: Tensor | None = None) -> ColumnRounder:
        """GPTQ rounding with the scales of ``weight``'s round-to-nearest (or the given ``scales``), fixed for
        the whole loop."""
        if scales is None:
            scales = reference.int8_quantize(weight, self.group_size)[1]
        return _Int8Rounder(scales, weight.shape[1], self.group_size)


class _Int8Rounder(ColumnRounder):
    def __init__(self, scales: Tensor, k: int, group_size: int) -> None:
        self.scales = scales
        self.step = reference.expand_group_scales(scales.float(), k, group_size).t().contiguous()  # (K, N)
        self.codes = torch.zeros(self.step.shape, dtype=torch.int8, device=scales.device)

    def round(self, index: int, column: Tensor) -> Tensor:
        step = self.step[index].to(column.device)
        c = torch.round(column / step).clamp_(-reference.INT8_MAX, reference.INT8_MAX)
        self.codes[index] = c.to(torch.int8)
        return c * step

    def result(self) -> Quantized:
        return Quantized(self.codes.t().contiguous(), self.scales)


# ---------------------------------------------------------------------------------------------- int4
def check_int4_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    return group_size


def int4_codes(weight: Tensor, scales: Tensor, offsets: Tensor | None, group_size: int) -> Tensor:
    """uint8 (N, K) codes of ``weight`` rounded to nearest on a given fp16 grid (the rule of
    :func:`fastquant.kernels.reference.int4_quantize`: symmetric round(w / d) + 8, asymmetric round((w - o) / d),
    clamped to [0, 15]; a group of step 0 gets code 8 / 0)."""
    k = weight.shape[1]
    w = weight.float()
    d = reference.expand_group_scales(scales.float(), k, group_size)
    if offsets is None:
        q = torch.round(w / d) + reference.INT4_SYMMETRIC_ZERO
        zero = reference.INT4_SYMMETRIC_ZERO
    else:
        q = torch.round((w - reference.expand_group_scales(offsets.float(), k, group_size)) / d)
        zero = 0
    return torch.where(d == 0, torch.full_like(q, zero), q).clamp_(0, 15).to(torch.uint8)


@dataclass(frozen=True)
class Int4Grid:
    """int4, one fp16 scale per group of ``group_size`` input columns; symmetric (llama.cpp Q4_0's rule,
    w = s (q - 8)) or asymmetric with an fp16 offset per group (Q4_1's, w = s q + o). See INT4 in the README."""

    group_size: int = 32
    symmetric: bool = True

    def __post_init__(self) -> None:
        check_int4_group_size(self.group_size)

    def rtn(self, weight: Tensor) -> Quantized:
        qweight, scales, offsets = reference.int4_quantize(weight, self.group_size, self.symmetric)
        return Quantized(reference.int4_unpack(qweight, weight.shape[1]), scales, offsets)

    def dequantize(self, q: Quantized) -> Tensor:
        k = q.codes.shape[1]
        return reference.int4_dequantize(reference.int4_pack(q.codes), q.scales, q.offsets, k, self.group_size)

    def rounder(self, weight: Tensor, scales: Tensor | None = None) -> ColumnRounder:
        if scales is not None:
            raise ValueError("int4 GPTQ fixes each group's scale as it reaches the group; pass no scales")
        return _Int4Rounder(weight.shape, self.group_size, self.symmetric, weight.device)


class _Int4Rounder(ColumnRounder):
    def __init__(self, shape: torch.Size, group_size: int, symmetric: bool, device: torch.device) -> None:
        n, k = shape
        n_groups = -(-k // group_size)
        self.group_size = group_size
        self.symmetric = symmetric
        self.scales = torch.zeros(n, n_groups, dtype=torch.float16, device=device)
        self.offsets = None if symmetric else torch.zeros(n, n_groups, dtype=torch.float16, device=device)
        self.codes = torch.zeros(k, n, dtype=torch.uint8, device=device)
        self._started = torch.zeros(n_groups, dtype=torch.bool)
        # Each group's fp32 step and offset, (groups, N): a column is rounded with its own group's grid, also when
        # activation order reaches the groups' columns out of order.
        self._d = torch.zeros(n_groups, n, dtype=torch.float32, device=device)
        self._o = None if symmetric else torch.zeros(n_groups, n, dtype=torch.float32, device=device)

    def start_group(self, first: int, columns: Tensor) -> None:
        if first % self.group_size != 0:
            raise ValueError(f"a group starts at a multiple of {self.group_size}, got column {first}")
        g = first // self.group_size
        # Round-to-nearest of the group as it stands fixes its grid: exactly RTN's rule on these values.
        _, scales, offsets = reference.int4_quantize(columns.t(), self.group_size, self.symmetric)
        self.scales[:, g] = scales[:, 0]
        self._d[g] = scales[:, 0].float()
        if offsets is not None:
            self.offsets[:, g] = offsets[:, 0]
            self._o[g] = offsets[:, 0].float()
        self._started[g] = True

    def round(self, index: int, column: Tensor) -> Tensor:
        g = index // self.group_size
        if not self._started[g]:
            raise RuntimeError(f"column {index}: start_group was not called for its group")
        # One column is a (1, N) weight whose N "groups" of one element carry the rows' steps.
        d = self._d[g]
        o = None if self._o is None else self._o[g]
        c = int4_codes(column[None, :], d[None, :], None if o is None else o[None, :], 1)[0]
        self.codes[index] = c
        if o is None:
            return d * (c.float() - reference.INT4_SYMMETRIC_ZERO)
        return d * c.float() + o

    def result(self) -> Quantized:
        if not bool(self._started.all()):
            raise RuntimeError("int4 GPTQ ended before every group was started")
        return Quantized(self.codes.t().contiguous(), self.scales, self.offsets)


class PermutedRounder(ColumnRounder):
    """``inner`` seen through a column permutation: the loop's column ``i`` is the weight's column
    ``perm[i]``, so codes land in the weight's own order. The inner grids must be fixed before the loop
    (:meth:`ColumnRounder.fix_groups`), so this rounder asks for no group starts."""

    def __init__(self, inner: ColumnRounder, perm: Tensor) -> None:
        self.inner = inner
        self.perm = perm.tolist()

    def round(self, index: int, column: Tensor) -> Tensor:
        return self.inner.round(self.perm[index], column)

    def result(self) -> Quantized:
        return self.inner.result()


Grid = Int8Grid | Int4Grid
