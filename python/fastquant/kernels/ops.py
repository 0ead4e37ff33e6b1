"""Schemas and fake kernels of the fastquant operators, with their reference kernels registered.

Every op is declared once here. Native kernels (csrc/cpu, csrc/cuda) register for the CPU and CUDA
dispatch keys of the same op; the pure-PyTorch reference in :mod:`fastquant.kernels.reference` is registered
for CompositeExplicitAutograd, so it runs on any device without a native kernel. The fake kernels
give shapes and dtypes only, which lets ``torch.compile(fullgraph=True)`` trace through the ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fastquant.kernels import reference

_lib = torch.library.Library("fastquant", "DEF")  # noqa: TOR901 - the namespace is defined once, here

_lib.define(
    "int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int group_size, "
    "bool int8_activations=False) -> Tensor"
)
_lib.define(
    "int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, Tensor? bias, int in_features, "
    "int group_size, bool int8_activations=False) -> Tensor"
)
_lib.define(
    "sparse_csr_linear(Tensor x, Tensor values, Tensor column_indices, Tensor row_offsets, Tensor? scales, "
    "Tensor? bias, int in_features, int group_size) -> Tensor"
)
_lib.define(
    "sparse_linear(Tensor x, Tensor values, Tensor masks, Tensor row_offsets, Tensor? scales, Tensor? bias, "
    "int in_features, int group_size) -> Tensor"
)

_lib.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------- the checks every op shares
# Worded and ordered as csrc/op_contract.h, so a fake, reference, CPU or CUDA kernel refuses the same
# arguments with the same words.


def _check_activations(prefix: str, x: Tensor) -> None:
    if x.dtype not in ACTIVATION_DTYPES:
        raise RuntimeError(f"{prefix} x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1:
        raise RuntimeError(f"{prefix} x must have at least 1 dimension, got a scalar")


def group_count(k: int, group_size: int) -> int:
    """Groups of ``group_size`` columns covering ``k`` columns (the last one may be partial)."""
    return -(-k // group_size)


def _check_group_size(prefix: str, group_size: int, multiple: int) -> None:
    """-1 (per-channel) or a positive multiple of ``multiple`` (1: any positive value)."""
    if group_size == -1 or (group_size > 0 and group_size % multiple == 0):
        return
    rule = "positive" if multiple == 1 else f"a positive multiple of {multiple}"
    raise RuntimeError(f"{prefix} group_size must be -1 (per-channel) or {rule}, got {group_size}")


def _check_scales(prefix: str, scales: Tensor, what: str, n: int, k: int, group_size: int) -> None:
    """float32 scales of a weight ``what`` (n x k): (N,) per channel, (N, groups) per group."""
    if scales.dtype != torch.float32:
        raise RuntimeError(f"{prefix} scales must be float32, got {scales.dtype}")
    if group_size == -1:
        if tuple(scales.shape) != (n,):
            raise RuntimeError(f"{prefix} per-channel scales must have shape (N,) = ({n},), got {tuple(scales.shape)}")
        return
    n_groups = group_count(k, group_size)
    if tuple(scales.shape) != (n, n_groups):
        raise RuntimeError(
            f"{prefix} group-wise scales for {what} ({n}, {k}) and group_size {group_size} must have shape "
            f"({n}, {n_groups}), got {tuple(scales.shape)}"
        )


def _check_bias(prefix: str, x: Tensor, bias: Tensor | None, n: int) -> None:
    if bias is None:
        return
    if bias.dtype != x.dtype:
        raise RuntimeError(f"{prefix} bias dtype {bias.dtype} must match x dtype {x.dtype}")
    if tuple(bias.shape) != (n,):
        raise RuntimeError(f"{prefix} bias must have shape ({n},), got {tuple(bias.shape)}")


def _check_in_features(prefix: str, x: Tensor, k: int, what: str) -> None:
    if x.shape[-1] != k:
        raise RuntimeError(f"{prefix} x has {x.shape[-1]} input features (shape {tuple(x.shape)}) but {what}")


def _check_one_device(prefix: str, *tensors: Tensor | None) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"{prefix} all tensors must be on one device, got {sorted(str(d) for d in devices)}")


def _register_kernels(
    name: str,
    check: Callable[..., None],
    reference_kernel: Callable[..., Tensor],
    out_features: Callable[..., int],
    check_contents: Callable[..., None] | None = None,
) -> None:
    """Registers op ``name``'s fake kernel (the argument check, then an empty output of x's leading shape and
    ``out_features(*args)`` columns) and its pure-PyTorch reference for every device without a native kernel
    (the check, the content check the fake cannot make, then the reference)."""

    def fake(*args: object) -> Tensor:
        check(*args)
        x = args[0]
        return x.new_empty((*x.shape[:-1], out_features(*args)))

    def reference_fallback(*args: object) -> Tensor:
        check(*args)
        if check_contents is not None:
            check_contents(*args)
        return reference_kernel(*args)

    torch.library.register_fake(f"fastquant::{name}")(fake)
    _lib.impl(name, reference_fallback, "CompositeExplicitAutograd")


# ---------------------------------------------------------------- int8_linear


def check_int8_linear_args(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    bias: Tensor | None,
    group_size: int,
    int8_activations: bool = False,
) -> None:
    """The argument rules every int8_linear kernel enforces (csrc/int8_linear_contract.h)."""
    prefix = "fastquant.int8_linear:"
    _check_activations(prefix, x)
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise RuntimeError(
            f"{prefix} qweight must be a 2-D int8 tensor (N, K), got {qweight.dtype} of shape {tuple(qweight.shape)}"
        )
    n, k = qweight.shape
    _check_in_features(prefix, x, k, f"qweight is (N, K) = ({n}, {k})")
    _check_group_size(prefix, group_size, 1)
    _check_scales(prefix, scales, "qweight", n, k, group_size)
    _check_bias(prefix, x, bias, n)
    _check_one_device(prefix, x, qweight, scales, bias)


_register_kernels("int8_linear", check_int8_linear_args, reference.int8_linear, lambda x, qweight, *_: qweight.shape[0])


def int8_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    bias: Tensor | None = None,
    group_size: int = -1,
    *,
    int8_activations: bool = False,
) -> Tensor:
    """``x @ (qweight * scales).T + bias`` with fp32 accumulation, on the best kernel for x's device.
    ``int8_activations`` rounds x to int8 per block of 32 columns first (reference.int8_activation_round: the
    arithmetic of llama.cpp's Q8_0 and fbgemm's dynamic quantization, which lets the CPU decode kernel multiply
    bytes by bytes)."""
    return torch.ops.fastquant.int8_linear(x, qweight, scales, bias, group_size, int8_activations)


# ---------------------------------------------------------------- sparse_linear (bitmap16 weight)

SPARSE_VALUE_DTYPES = reference.SPARSE_VALUE_DTYPES
BITMAP16_PADDING = reference.SPARSE_PADDING  # csrc/formats.h kBitmap16Padding
SPARSE_GROUP_MULTIPLE = 16  # csrc/formats.h kSparseGroupMultiple: whole 16-column mask words


def _check_values(prefix: str, values: Tensor) -> None:
    if values.dtype not in SPARSE_VALUE_DTYPES or values.dim() != 1:
        raise RuntimeError(
            f"{prefix} values must be a 1-D float32, bfloat16, float16 or int8 tensor, got {values.dtype} "
            f"of shape {tuple(values.shape)}"
        )


def _check_sparse_scales_and_bias(
    prefix: str,
    x: Tensor,
    values: Tensor,
    scales: Tensor | None,
    bias: Tensor | None,
    n: int,
    k: int,
    group_size: int,
) -> None:
    """sparse_linear and sparse_csr_linear: int8 values need scales (groups of whole 16-column mask words),
    float values take none."""
    _check_group_size(prefix, group_size, SPARSE_GROUP_MULTIPLE)
    if values.dtype == torch.int8:
        if scales is None:
            raise RuntimeError(f"{prefix} int8 values need float32 scales, got None")
        _check_scales(prefix, scales, "weight", n, k, group_size)
    elif scales is not None:
        raise RuntimeError(f"{prefix} scales must be None for {values.dtype} values (only int8 values are scaled)")
    _check_bias(prefix, x, bias, n)


def check_sparse_linear_args(
    x: Tensor,
    values: Tensor,
    masks: Tensor,
    row_offsets: Tensor,
    scales: Tensor | None,
    bias: Tensor | None,
    in_features: int,
    group_size: int,
) -> None:
    """The shape/dtype/device rules every sparse_linear kernel enforces, worded as the C++ checks.

    The contents of row_offsets and masks are checked by :func:`check_sparse_linear_contents` (the fake
    kernel cannot read them).
    """
    prefix = "fastquant.sparse_linear:"
    _check_activations(prefix, x)
    _check_values(prefix, values)
    if masks.dtype != torch.int16 or masks.dim() != 2:
        raise RuntimeError(
            f"{prefix} masks must be a 2-D int16 tensor (N, ceil(K / 16)), got {masks.dtype} of shape "
            f"{tuple(masks.shape)}"
        )
    if in_features < 0:
        raise RuntimeError(f"{prefix} in_features must be >= 0, got {in_features}")
    k = in_features
    n = masks.shape[0]
    n_chunks = group_count(k, 16)
    _check_in_features(prefix, x, k, f"in_features is {k}")
    if masks.shape[1] != n_chunks:
        raise RuntimeError(
            f"{prefix} masks has {masks.shape[1]} chunks per row but in_features {k} needs ceil({k} / 16) = {n_chunks}"
        )
    if row_offsets.dtype != torch.int64 or tuple(row_offsets.shape) != (n + 1,):
        raise RuntimeError(
            f"{prefix} row_offsets must be an int64 tensor of shape (N + 1,) = ({n + 1},), got "
            f"{row_offsets.dtype} of shape {tuple(row_offsets.shape)}"
        )
    if values.numel() < BITMAP16_PADDING:
        raise RuntimeError(
            f"{prefix} values must end with {BITMAP16_PADDING} elements of padding, got {values.numel()} elements"
        )
    _check_sparse_scales_and_bias(prefix, x, values, scales, bias, n, k, group_size)
    _check_one_device(prefix, x, values, masks, row_offsets, scales, bias)


def check_sparse_linear_contents(values: Tensor, masks: Tensor, row_offsets: Tensor, in_features: int) -> None:
    """Checks that row_offsets and masks agree, so that no kernel reads outside ``values``.

    row_offsets[0] = 0, no row has a negative count, no mask bit is set past in_features,
    row_offsets[N] + 64 (padding) <= values.numel(), and every row's count equals the popcount of its masks
    (one pass over the N * K / 16 mask words; the C++ kernels do it on each block of rows just before
    reading it, and look for a decreasing offset only once a row is refused). Same wording as the C++ checks.
    """
    prefix = "fastquant.sparse_linear:"
    n = masks.shape[0]
    offsets = row_offsets.cpu()
    if int(offsets[0]) != 0:
        raise RuntimeError(f"{prefix} row_offsets[0] must be 0, got {int(offsets[0])}")
    counts = offsets[1:] - offsets[:-1]
    bad = (counts < 0).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise RuntimeError(
            f"{prefix} row_offsets must not decrease: row {i} goes from {int(offsets[i])} to {int(offsets[i + 1])}"
        )
    rem = in_features % 16
    if rem and n:
        tail = (masks[:, -1].to(torch.int32) & 0xFFFF) >> rem
        bad = tail.nonzero()
        if bad.numel():
            raise RuntimeError(f"{prefix} masks of row {int(bad[0])} keep columns past in_features ({in_features})")
    total = int(offsets[-1])
    if total + BITMAP16_PADDING > values.numel():
        raise RuntimeError(
            f"{prefix} row_offsets[N] = {total} kept weights need values of at least {total + 64} elements "
            f"(64 of padding), got {values.numel()}"
        )
    kept = reference.sparse_mask_bits(masks, masks.shape[1] * 16).sum(dim=1).cpu()
    bad = (kept != counts).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise RuntimeError(
            f"{prefix} row {i} keeps {int(kept[i])} weights in masks but row_offsets gives it {int(counts[i])}"
        )


_register_kernels(
    "sparse_linear",
    check_sparse_linear_args,
    reference.sparse_linear,
    lambda x, values, masks, *_: masks.shape[0],
    lambda x, values, masks, row_offsets, scales, bias, in_features, group_size: check_sparse_linear_contents(
        values, masks, row_offsets, in_features
    ),
)


def sparse_linear(
    x: Tensor,
    values: Tensor,
    masks: Tensor,
    row_offsets: Tensor,
    scales: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    in_features: int,
    group_size: int = -1,
) -> Tensor:
    """``x @ W.T + bias`` for a bitmap16 sparse weight W (see reference.sparse_pack), fp32 accumulation."""
    return torch.ops.fastquant.sparse_linear(x, values, masks, row_offsets, scales, bias, in_features, group_size)


# ---------------------------------------------------------------- sparse_csr_linear (csr16 weight)


def check_sparse_csr_linear_args(
    x: Tensor,
    values: Tensor,
    column_indices: Tensor,
    row_offsets: Tensor,
    scales: Tensor | None,
    bias: Tensor | None,
    in_features: int,
    group_size: int,
) -> None:
    """The shape/dtype/device rules every sparse_csr_linear kernel enforces, worded as the C++ checks.

    The contents of row_offsets and column_indices are checked by :func:`check_sparse_csr_linear_contents`.
    """
    prefix = "fastquant.sparse_csr_linear:"
    _check_activations(prefix, x)
    _check_values(prefix, values)
    if column_indices.dtype != torch.int16 or tuple(column_indices.shape) != tuple(values.shape):
        raise RuntimeError(
            f"{prefix} column_indices must be an int16 tensor of the values' shape {tuple(values.shape)}, got "
            f"{column_indices.dtype} of shape {tuple(column_indices.shape)}"
        )
    if row_offsets.dtype != torch.int64 or row_offsets.dim() != 1 or row_offsets.numel() < 1:
        raise RuntimeError(
            f"{prefix} row_offsets must be a non-empty 1-D int64 tensor (N + 1,), got {row_offsets.dtype} of "
            f"shape {tuple(row_offsets.shape)}"
        )
    if not 0 <= in_features <= reference.SPARSE_CSR_MAX_IN_FEATURES:
        raise RuntimeError(
            f"{prefix} in_features must be in [0, {reference.SPARSE_CSR_MAX_IN_FEATURES}] (16-bit column indices), "
            f"got {in_features}"
        )
    k = in_features
    _check_in_features(prefix, x, k, f"in_features is {k}")
    _check_sparse_scales_and_bias(prefix, x, values, scales, bias, row_offsets.numel() - 1, k, group_size)
    _check_one_device(prefix, x, values, column_indices, row_offsets, scales, bias)


def check_sparse_csr_linear_contents(column_indices: Tensor, row_offsets: Tensor, in_features: int) -> None:
    """row_offsets[0] = 0, offsets never decrease, row_offsets[N] <= the values' length, and every kept
    column index (read as uint16) is below in_features. Same wording as the C++ checks (whose kernels check
    each row's offsets and indices just before reading it, and look for a decreasing offset once one fails)."""
    prefix = "fastquant.sparse_csr_linear:"
    offsets = row_offsets.cpu()
    if int(offsets[0]) != 0:
        raise RuntimeError(f"{prefix} row_offsets[0] must be 0, got {int(offsets[0])}")
    bad = (offsets.diff() < 0).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise RuntimeError(
            f"{prefix} row_offsets must not decrease: row {i} goes from {int(offsets[i])} to {int(offsets[i + 1])}"
        )
    total = int(offsets[-1])
    if total > column_indices.numel():
        raise RuntimeError(
            f"{prefix} row_offsets[N] = {total} kept weights but values has {column_indices.numel()} elements"
        )
    columns = column_indices[:total].to(torch.int64) & 0xFFFF
    bad = (columns >= in_features).nonzero()
    if bad.numel():
        row = int(torch.searchsorted(offsets, int(bad[0]), right=True)) - 1
        worst = int(columns[int(offsets[row]) : int(offsets[row + 1])].max())
        raise RuntimeError(f"{prefix} row {row} has column index {worst}, not below in_features ({in_features})")


_register_kernels(
    "sparse_csr_linear",
    check_sparse_csr_linear_args,
    reference.sparse_csr_linear,
    lambda x, values, column_indices, row_offsets, *_: row_offsets.shape[0] - 1,
    lambda x, values, column_indices, row_offsets, scales, bias, in_features, group_size: (
        check_sparse_csr_linear_contents(column_indices, row_offsets, in_features)
    ),
)


def sparse_csr_linear(
    x: Tensor,
    values: Tensor,
    column_indices: Tensor,
    row_offsets: Tensor,
    scales: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    in_features: int,
    group_size: int = -1,
) -> Tensor:
    """``x @ W.T + bias`` for a csr16 sparse weight W (see reference.sparse_column_indices), fp32 accumulation."""
    return torch.ops.fastquant.sparse_csr_linear(
        x,
        values,
        column_indices,
        row_offsets,
        scales,
        bias,
        in_features,
        group_size,
    )


# ---------------------------------------------------------------- int4_linear (two codes per byte, group scales)


def check_int4_linear_args(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    offsets: Tensor | None,
    bias: Tensor | None,
    in_features: int,
    group_size: int,
    int8_activations: bool = False,
) -> None:
    """The argument rules every int4_linear kernel enforces, with the same wording as the C++ checks
    (csrc/int4_linear_contract.h). Every byte of qweight is a valid pair of codes, so shapes and dtypes
    are all there is to check."""
    prefix = "fastquant.int4_linear:"
    _check_activations(prefix, x)
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise RuntimeError(
            f"{prefix} qweight must be a 2-D uint8 tensor (N, ceil(K / 64) * 32), got {qweight.dtype} of shape "
            f"{tuple(qweight.shape)}"
        )
    if in_features < 0:
        raise RuntimeError(f"{prefix} in_features must be >= 0, got {in_features}")
    if group_size <= 0 or group_size % 32 != 0:
        raise RuntimeError(f"{prefix} group_size must be a positive multiple of 32, got {group_size}")
    n, k = qweight.shape[0], in_features
    _check_in_features(prefix, x, k, f"in_features is {k}")
    width = group_count(k, 64) * 32
    if qweight.shape[1] != width:
        raise RuntimeError(
            f"{prefix} qweight has {qweight.shape[1]} bytes per row but in_features {k} needs "
            f"ceil({k} / 64) * 32 = {width}"
        )
    n_groups = group_count(k, group_size)
    for name, t in (("scales", scales), ("offsets", offsets)):
        if t is None:
            continue
        if t.dtype != torch.float16:
            raise RuntimeError(f"{prefix} {name} must be float16, got {t.dtype}")
        if tuple(t.shape) != (n, n_groups):
            raise RuntimeError(
                f"{prefix} {name} for N = {n}, in_features {k} and group_size {group_size} must have shape "
                f"({n}, {n_groups}), got {tuple(t.shape)}"
            )
    _check_bias(prefix, x, bias, n)
    _check_one_device(prefix, x, qweight, scales, offsets, bias)


_register_kernels("int4_linear", check_int4_linear_args, reference.int4_linear, lambda x, qweight, *_: qweight.shape[0])


def int4_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    offsets: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    in_features: int,
    group_size: int = 32,
    int8_activations: bool = False,
) -> Tensor:
    """``x @ W.T + bias`` for an int4 weight W (see reference.int4_quantize), fp32 accumulation, on the best
    kernel for x's device. ``offsets`` None means symmetric codes (w = s * (q - 8)). ``int8_activations``
    rounds x to int8 per block of 32 columns first (reference.int8_activation_round: llama.cpp's arithmetic
    for Q4_0, which halves the multiplies per weight of the CPU decode kernel)."""
    return torch.ops.fastquant.int4_linear(x, qweight, scales, offsets, bias, in_features, group_size, int8_activations)


# ---------------------------------------------------------------- decode_attention


def check_decode_attention_args(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> None:
    """The argument rules of decode_attention (csrc/decode_attention_contract.h words them alike)."""
    prefix = "fastquant.decode_attention:"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in ACTIVATION_DTYPES or t.dim() != 4:
            raise RuntimeError(
                f"{prefix} {name} must be a 4-D float32, bfloat16 or float16 tensor, got {t.dtype} of shape "
                f"{tuple(t.shape)}"
            )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise RuntimeError(f"{prefix} k and v must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    b, h, _, d = q.shape
    if k.shape != v.shape or tuple(k.shape[:2]) != (b, h) or k.shape[3] != d:
        raise RuntimeError(
            f"{prefix} k and v must both have shape (B, H, S, D) = ({b}, {h}, S, {d}) for q of shape "
            f"{tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if mask is not None:
        target = (b, h, q.shape[2], k.shape[2])
        if mask.dtype not in (torch.bool, q.dtype) or mask.dim() != 4:
            raise RuntimeError(
                f"{prefix} mask must be a 4-D bool or {q.dtype} tensor, got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        if any(m not in (1, t) for m, t in zip(mask.shape, target, strict=True)):
            raise RuntimeError(
                f"{prefix} mask of shape {tuple(mask.shape)} does not broadcast to (B, H, R, S) = {target}"
            )
    if not math.isfinite(scale):
        raise RuntimeError(f"{prefix} scale must be finite, got {scale}")
    _check_one_device(prefix, q, k, v, mask)


_register_kernels(
    "decode_attention", check_decode_attention_args, reference.decode_attention, lambda q, k, v, *_: v.shape[-1]
)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Attention of a few query rows per key/value head (a decode step): q (B, H, R, D) against k, v (B, H, S, D),
    ``mask`` (bool or additive, broadcast to (B, H, R, S)) as in ``F.scaled_dot_product_attention``; scale defaults
    to ``D ** -0.5``. Computed in fp32; positions a bool mask drops (or an additive -inf) cost nothing."""
    return torch.ops.fastquant.decode_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)


# ---------------------------------------------------------------- autograd: the weight is frozen
# Gradients reach x and the bias, not the quantized or pruned weight: what adapters trained on top of a compressed
# base (LoRA-style) need. grad_x = grad_y @ W in fp32 (W the reference dequantization), grad_bias = grad_y summed
# over rows. The extension registers this backward in C++ (csrc/frozen_weight_autograd.cpp): a Python autograd
# kernel runs on every call that reaches the Autograd key, gradients or not (4-6 us on a 2-core Zen 5, and HF
# ``generate`` calls ~210 layers per SmolLM2 token under no_grad). This one is the oracle, and is registered when
# the extension did not load.

# op: (position of bias among the op's inputs, the float32 weight from the inputs after x)
_FROZEN_WEIGHTS: dict[str, tuple[int, Callable[..., Tensor]]] = {
    "int8_linear": (3, lambda q, s, _, g, _x8: reference.int8_dequantize(q, s, g)),
    "int4_linear": (4, lambda q, s, o, _, k, g, _x8: reference.int4_dequantize(q, s, o, k, g)),
    "sparse_linear": (5, lambda v, m, r, s, _, k, g: reference.sparse_dequantize(v, m, r, s, k, g)),
    "sparse_csr_linear": (5, lambda v, c, r, s, _, k, g: reference.sparse_csr_dequantize(v, c, r, s, k, g)),
}


def _frozen_weight_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*(a if isinstance(a, Tensor) else None for a in inputs[1:]))
    ctx.other_inputs = [None if isinstance(a, Tensor) else a for a in inputs[1:]]
    ctx.x_dtype = inputs[0].dtype


def _frozen_weight_backward(bias_at: int, dequantize: Callable[..., Tensor]) -> Callable[..., tuple]:
    def backward(ctx, grad_out: Tensor) -> tuple:
        args = [t if t is not None else other for t, other in zip(ctx.saved_tensors, ctx.other_inputs, strict=True)]
        grads: list[Tensor | None] = [None] * (len(args) + 1)
        grads[0] = (grad_out.float() @ dequantize(*args)).to(ctx.x_dtype)
        if ctx.needs_input_grad[bias_at]:
            grads[bias_at] = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return tuple(grads)

    return backward


def register_reference_autograd() -> None:
    """Registers the Python autograd of every op (for a process without the compiled extension)."""
    for name, (bias_at, dequantize) in _FROZEN_WEIGHTS.items():
        torch.library.register_autograd(
            f"fastquant::{name}",
            _frozen_weight_backward(bias_at, dequantize),
            setup_context=_frozen_weight_setup_context,
        )
