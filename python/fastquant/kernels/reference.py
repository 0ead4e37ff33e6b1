"""Pure-PyTorch reference kernels.

Each function here is the specification of the fastquant op of the same name: the tests compare
the native kernels against it, and it runs whenever no native kernel is built for a device. Keep
them short and obviously right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

INT8_MAX = 127


def expand_group_scales(scales: Tensor, k: int, group_size: int) -> Tensor:
    """(N,) or (N, ceil(K/G)) scales as an (N, K) tensor: one scale per weight element."""
    if group_size == -1:
        return scales[:, None].expand(-1, k)
    # A group wider than K is one group: repeating its scale K times, not group_size times, keeps the
    # intermediate at (N, K) whatever group_size is.
    return scales.repeat_interleave(min(group_size, k), dim=1)[:, :k]


def int8_dequantize(qweight: Tensor, scales: Tensor, group_size: int) -> Tensor:
    """The float32 weight an int8 weight and its scales stand for."""
    return qweight.float() * expand_group_scales(scales.float(), qweight.shape[1], group_size)


def int8_quantize(weight: Tensor, group_size: int = -1) -> tuple[Tensor, Tensor]:
    """Symmetric round-to-nearest int8 quantization with one fp32 scale per row or per group of a row.

    The grid is [-127, 127] (not -128) so that the grid is symmetric and negating a weight negates its
    code. A group that is all zeros gets scale 1 so that dequantization stays exactly zero.
    """
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be -1 (per-channel) or positive, got {group_size}")
    n, k = weight.shape
    w = weight.detach().float()
    if group_size == -1:
        amax = w.abs().amax(dim=1)
    else:
        group = min(group_size, k) if k else group_size
        n_groups = -(-k // group)
        padded = F.pad(w, (0, n_groups * group - k))
        amax = padded.abs().view(n, n_groups, group).amax(dim=2)
    scales = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    qweight = torch.round(w / expand_group_scales(scales, k, group_size))
    return qweight.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scales


def _linear_fp32(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T + bias in fp32, returned in x's dtype (how every kernel accumulates)."""
    y = F.linear(x.float(), weight)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_linear(
    x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int, int8_activations: bool = False
) -> Tensor:
    """y = x @ (qweight * scales).T + bias, accumulated in fp32, returned in x's dtype. ``int8_activations``: x is
    first rounded by :func:`int8_activation_round` (as llama.cpp's Q8_0 and fbgemm's dynamic quantization round
    it), unless it holds a NaN or an infinity (then it stays as it is, so they propagate as in the float
    product)."""
    return _linear_fp32(_activations(x, int8_activations), int8_dequantize(qweight, scales, group_size), bias).to(
        x.dtype
    )


# ---------------------------------------------------------------- sparse "bitmap16" format

SPARSE_CHUNK = 16  # columns per mask word
SPARSE_PADDING = 64  # zero elements after the kept values: a kernel may load 64 from any kept position
SPARSE_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)


def sparse_mask_bits(masks: Tensor, in_features: int) -> Tensor:
    """The bool (N, K) keep-mask that int16 mask words stand for (bit j of word c is column 16c + j)."""
    bits = torch.arange(SPARSE_CHUNK, device=masks.device, dtype=torch.int32)
    words = masks.to(torch.int32) & 0xFFFF
    keep = ((words[:, :, None] >> bits) & 1).bool()
    return keep.reshape(masks.shape[0], masks.shape[1] * SPARSE_CHUNK)[:, :in_features]


def sparse_pack(weight: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Packs a pruned (N, K) weight into bitmap16 ``(values, masks, row_offsets)``.

    ``mask`` (bool, (N, K)) says which weights are kept; by default the nonzero ones. Values keep the
    weight's dtype and are followed by 64 zeros of padding.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    if weight.dtype not in SPARSE_VALUE_DTYPES:
        raise ValueError(f"weight must be float32, bfloat16, float16 or int8, got {weight.dtype}")
    if mask is None:
        mask = weight != 0
    elif mask.dtype != torch.bool or tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(
            f"mask must be a bool tensor of the weight's shape {tuple(weight.shape)}, "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    mask = mask.to(weight.device)
    n, k = weight.shape
    n_chunks = -(-k // SPARSE_CHUNK)
    padded = F.pad(mask, (0, n_chunks * SPARSE_CHUNK - k)).view(n, n_chunks, SPARSE_CHUNK)
    bits = torch.arange(SPARSE_CHUNK, device=weight.device, dtype=torch.int32)
    words = (padded.to(torch.int32) << bits).sum(dim=2, dtype=torch.int32)
    masks = torch.where(words >= 2**15, words - 2**16, words).to(torch.int16)  # two's complement of uint16
    kept = weight.detach()[mask]  # row-major: row by row, columns in increasing order
    values = torch.cat([kept, kept.new_zeros(SPARSE_PADDING)])
    counts = mask.sum(dim=1)
    row_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int64)
    return values, masks.contiguous(), row_offsets


def sparse_unpack(values: Tensor, masks: Tensor, row_offsets: Tensor, in_features: int) -> Tensor:
    """The dense (N, K) weight in values' dtype, zeros where nothing is kept.

    A gather of every (row, column)'s would-be position (row offset + kept columns before it), not a boolean
    index: the shapes never depend on the data, so torch.compile traces it (and its backward) whole."""
    keep = sparse_mask_bits(masks, in_features)
    position = row_offsets[:-1, None] + keep.cumsum(dim=1) - 1
    gathered = values[position.clamp(0, values.numel() - 1)]
    return torch.where(keep, gathered, gathered.new_zeros(()))


def sparse_dequantize(
    values: Tensor, masks: Tensor, row_offsets: Tensor, scales: Tensor | None, in_features: int, group_size: int
) -> Tensor:
    """The float32 dense weight a bitmap16 weight stands for (int8 values times their scales)."""
    dense = sparse_unpack(values, masks, row_offsets, in_features)
    if scales is None:
        return dense.float()
    return int8_dequantize(dense, scales, group_size)


def sparse_linear(
    x: Tensor,
    values: Tensor,
    masks: Tensor,
    row_offsets: Tensor,
    scales: Tensor | None,
    bias: Tensor | None,
    in_features: int,
    group_size: int,
) -> Tensor:
    """y = x @ W.T + bias with W the unpacked (and, for int8 values, scaled) weight; fp32 accumulation."""
    return _linear_fp32(x, sparse_dequantize(values, masks, row_offsets, scales, in_features, group_size), bias)


# ---------------------------------------------------------------- sparse "csr16" format
# The same kept values and row offsets as bitmap16, with an int16 column index per value (read as uint16,
# so K <= 65536) instead of the mask words. It moves 2 bytes per kept weight of index where bitmap16 moves
# 1/8 byte per weight, but a kernel does work per kept weight instead of per 16 columns: on CPUs without a
# vector expand it is the faster one at high sparsity (benchmarks/NOTES.md, "csr16").

SPARSE_CSR_MAX_IN_FEATURES = 2**16


def sparse_column_indices(masks: Tensor, in_features: int, length: int) -> Tensor:
    """The int16 column of each of the ``length`` packed values of a bitmap16 weight (zeros past the kept ones)."""
    if in_features > SPARSE_CSR_MAX_IN_FEATURES:
        raise ValueError(f"csr16 column indices hold at most {SPARSE_CSR_MAX_IN_FEATURES} columns, got {in_features}")
    keep = sparse_mask_bits(masks, in_features)
    # Each kept weight's position in the packed values (row offset + kept columns before it), scattered with
    # its column; positions of pruned weights go to a spare slot past the end. No data-dependent shapes, so it
    # runs on the meta device and under torch.compile.
    counts = keep.sum(dim=1)
    starts = counts.cumsum(0) - counts
    position = torch.where(keep, starts[:, None] + keep.cumsum(dim=1) - 1, length)
    columns = torch.arange(in_features, device=masks.device).expand_as(keep)
    indices = torch.zeros(length + 1, dtype=torch.int64, device=masks.device)
    indices.scatter_(0, position.reshape(-1).clamp(max=length), columns.reshape(-1))
    indices = indices[:length]
    return torch.where(indices >= 2**15, indices - 2**16, indices).to(torch.int16)  # two's complement of uint16


def sparse_csr_dequantize(
    values: Tensor,
    column_indices: Tensor,
    row_offsets: Tensor,
    scales: Tensor | None,
    in_features: int,
    group_size: int,
) -> Tensor:
    """The float32 dense (N, K) weight a csr16 weight stands for (codes times scales for int8 values); repeated
    columns of a row add up."""
    # Every packed position is placed (no data-dependent shapes, so torch.compile traces it): those past
    # row_offsets[N] add zero to column 0 of the last row.
    n = row_offsets.numel() - 1
    dense = torch.zeros(n, in_features, dtype=torch.float32, device=values.device)
    if n == 0 or in_features == 0:
        return dense
    position = torch.arange(values.numel(), device=values.device)
    rows = torch.searchsorted(row_offsets[1:], position, right=True).clamp(max=n - 1)
    valid = position < row_offsets[-1]
    columns = torch.where(valid, column_indices.to(torch.int64) & 0xFFFF, 0)
    kept = torch.where(valid, values.float(), 0.0)
    dense = dense.index_put_((rows, columns), kept, accumulate=True)
    # Codes first, then scales, as the dense int8 layer of the same codes: a pruned weight is a zero code, so an
    # infinite scale makes it NaN on every layout (the numerical contract).
    return dense if scales is None else int8_dequantize(dense, scales, group_size)


def sparse_csr_linear(
    x: Tensor,
    values: Tensor,
    column_indices: Tensor,
    row_offsets: Tensor,
    scales: Tensor | None,
    bias: Tensor | None,
    in_features: int,
    group_size: int,
) -> Tensor:
    """y = x @ W.T + bias with W the csr16 weight (int8 values times their scales); fp32 accumulation."""
    weight = sparse_csr_dequantize(values, column_indices, row_offsets, scales, in_features, group_size)
    return _linear_fp32(x, weight, bias)


# ---------------------------------------------------------------- int4 (two codes per byte, group-wise scales)
# Layout: qweight is uint8 (N, ceil(K/64) * 32). Block b of a row
# holds k = 64b .. 64b+63 in 32 bytes: byte j has code(64b + j) in its low nibble and code(64b + 32 + j) in its
# high nibble, so one 32-byte load gives 32 consecutive k by `& 0xF` and the next 32 by `>> 4`: a kernel streams
# the row linearly without shuffles. Codes past K are 0. scales (and offsets) are float16 (N, ceil(K/G)).

INT4_BLOCK = 64  # k per 32-byte block
INT4_GROUP_MULTIPLE = 32
INT4_SYMMETRIC_ZERO = 8  # symmetric codes stand for q - 8


def int4_pack(codes: Tensor) -> Tensor:
    """Packs uint8 codes 0..15 of shape (N, K) into the (N, ceil(K/64) * 32) int4 layout."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    n, k = codes.shape
    n_blocks = -(-k // INT4_BLOCK)
    padded = F.pad(codes.to(torch.uint8), (0, n_blocks * INT4_BLOCK - k)).view(n, n_blocks, 2, INT4_BLOCK // 2)
    return (padded[:, :, 0] | (padded[:, :, 1] << 4)).reshape(n, n_blocks * INT4_BLOCK // 2)


def int4_unpack(qweight: Tensor, in_features: int) -> Tensor:
    """The uint8 (N, K) codes of a packed int4 weight (inverse of :func:`int4_pack`)."""
    n = qweight.shape[0]
    blocks = qweight.view(n, -1, 1, INT4_BLOCK // 2)
    codes = torch.cat([blocks & 0xF, blocks >> 4], dim=2)
    return codes.reshape(n, -1)[:, :in_features]


def int4_dequantize(
    qweight: Tensor, scales: Tensor, offsets: Tensor | None, in_features: int, group_size: int
) -> Tensor:
    """The float32 (N, K) weight: s * (q - 8) (symmetric) or s * q + o (asymmetric), in fp32 (multiply, then add)."""
    codes = int4_unpack(qweight, in_features).float()
    s = expand_group_scales(scales.float(), in_features, group_size)
    if offsets is None:
        return s * (codes - INT4_SYMMETRIC_ZERO)
    return s * codes + expand_group_scales(offsets.float(), in_features, group_size)


def int4_quantize(weight: Tensor, group_size: int = 32, symmetric: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest int4 with one fp16 scale (and offset) per group of ``group_size`` columns.

    Symmetric is llama.cpp's Q4_0: m = the signed value of largest magnitude, d = m / -8, q = round(w / d) + 8
    clamped to [0, 15] (so m itself maps to code 0 and the grid reaches +7d on the other side). Asymmetric is
    Q4_1: d = (max - min) / 15, offset = min, q = round((w - offset) / d) clamped to [0, 15]. The codes are
    computed with the fp16-rounded scale and offset, so what dequantizes is the nearest point of the stored
    grid. A group whose step rounds to 0 in fp16 (all equal, or below fp16's range) gets scale 0 and code 8
    (symmetric) or 0 (asymmetric): it dequantizes to 0 or to its offset. Returns (qweight, scales, offsets|None).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    if group_size <= 0 or group_size % INT4_GROUP_MULTIPLE != 0:
        raise ValueError(f"group_size must be a positive multiple of {INT4_GROUP_MULTIPLE}, got {group_size}")
    n, k = weight.shape
    n_groups = -(-k // group_size)
    w = weight.detach().float()
    pad = n_groups * group_size - k
    if symmetric:
        groups = F.pad(w, (0, pad)).view(n, n_groups, group_size)  # zeros do not change the largest magnitude
        index = groups.abs().argmax(dim=2, keepdim=True)  # the first of equal magnitudes, as llama.cpp
        scales = (groups.gather(2, index).squeeze(2) / -8).half()
        offsets = None
        d = scales.float()
        zero = torch.full_like(w, INT4_SYMMETRIC_ZERO)
        q = torch.round(w / expand_group_scales(d, k, group_size)) + INT4_SYMMETRIC_ZERO
    else:
        lo = F.pad(w, (0, pad), value=float("inf")).view(n, n_groups, group_size).amin(dim=2)
        hi = F.pad(w, (0, pad), value=float("-inf")).view(n, n_groups, group_size).amax(dim=2)
        scales = ((hi - lo) / 15).half()
        offsets = lo.half()
        d = scales.float()
        zero = torch.zeros_like(w)
        o = expand_group_scales(offsets.float(), k, group_size)
        q = torch.round((w - o) / expand_group_scales(d, k, group_size))
    step_is_zero = expand_group_scales(d == 0, k, group_size)
    codes = torch.where(step_is_zero, zero, q).clamp_(0, 15).to(torch.uint8)
    return int4_pack(codes), scales, offsets


INT8_ACTIVATION_BLOCK = 32  # columns of x sharing one int8 step (llama.cpp's Q8_0 block)
INT8_ACTIVATION_MAX = 127
INT8_ACTIVATION_TINY = 2.0**-100  # blocks below this magnitude round to zero (their step is not a normal float)


def int8_activation_round(x: Tensor) -> Tensor:
    """x rounded as ``int8_linear`` and ``int4_linear`` with ``int8_activations=True`` round it, returned in
    fp32: per row and block of 32 columns, with m = max|x| of the block, X = round(x * (127 / m)) (an int8, half
    to even) and x~ = X * (m / 127); |x~ - x| <= m / 254. Blocks with m < 2^-100 become 0. The same fp32
    operations, in the same order, as the native kernels (csrc/int8_activations.h), so every kernel sees the same
    x~."""
    x32 = x.float()
    k = x32.shape[-1]
    blocks = -(-k // INT8_ACTIVATION_BLOCK)
    padded = F.pad(x32, (0, blocks * INT8_ACTIVATION_BLOCK - k)).unflatten(-1, (blocks, INT8_ACTIVATION_BLOCK))
    largest = padded.abs().amax(-1, keepdim=True)
    limit = torch.full_like(largest, INT8_ACTIVATION_MAX)
    inv = torch.where(largest >= INT8_ACTIVATION_TINY, limit / largest, torch.zeros_like(largest))
    rounded = torch.round(padded * inv) * (largest / limit)
    return rounded.flatten(-2)[..., :k]


def _activations(x: Tensor, int8_activations: bool) -> Tensor:
    """The x a linear op multiplies: x~ with ``int8_activations`` when x is finite, else x itself."""
    if int8_activations and bool(torch.isfinite(x).all()):
        return int8_activation_round(x)
    return x


def int4_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    offsets: Tensor | None,
    bias: Tensor | None,
    in_features: int,
    group_size: int,
    int8_activations: bool = False,
) -> Tensor:
    """y = x @ W.T + bias with W the dequantized int4 weight, accumulated in fp32, returned in x's dtype.
    ``int8_activations``: x is first rounded by :func:`int8_activation_round` (llama.cpp's Q8_0 activations
    for Q4_0, torchao's int8 dynamic activations), unless it holds a NaN or an infinity (then it stays as it is,
    so they propagate as in the float product)."""
    weight = int4_dequantize(qweight, scales, offsets, in_features, group_size)
    return _linear_fp32(_activations(x, int8_activations), weight, bias).to(x.dtype)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """``softmax(q kᵀ · scale + mask) v`` per (batch, head), in fp32, with torch's SDPA rules: a bool mask keeps
    the positions that are True, a float mask is added to the scores, and a row with no position left gives
    zeros."""
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.float()
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)
    return out.to(q.dtype)
