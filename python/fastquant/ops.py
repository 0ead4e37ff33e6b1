"""Schemas and fake kernels of the fastquant operators, with their reference kernels registered.

Every op is declared once here. Native kernels (csrc/cpu, csrc/cuda) register for the CPU and CUDA
dispatch keys of the same op; the pure-PyTorch reference in :mod:`fastquant.reference` is registered
for CompositeExplicitAutograd, so it runs on any device without a native kernel. The fake kernels
give shapes and dtypes only, which lets ``torch.compile(fullgraph=True)`` trace through the ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastquant import reference

_lib = torch.library.Library("fastquant", "DEF")  # noqa: TOR901 - the namespace is defined once, here

_lib.define("int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int group_size) -> Tensor")

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_int8_linear_args(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int) -> None:
    """The argument rules every int8_linear kernel enforces, with the same wording as the C++ checks."""
    prefix = "fastquant.int8_linear:"
    if x.dtype not in ACTIVATION_DTYPES:
        raise RuntimeError(f"{prefix} x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1:
        raise RuntimeError(f"{prefix} x must have at least 1 dimension, got a scalar")
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise RuntimeError(
            f"{prefix} qweight must be a 2-D int8 tensor (N, K), got {qweight.dtype} of shape {tuple(qweight.shape)}"
        )
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise RuntimeError(
            f"{prefix} x has {x.shape[-1]} input features (shape {tuple(x.shape)}) but qweight is (N, K) = ({n}, {k})"
        )
    if scales.dtype != torch.float32:
        raise RuntimeError(f"{prefix} scales must be float32, got {scales.dtype}")
    if group_size == -1:
        if tuple(scales.shape) != (n,):
            raise RuntimeError(f"{prefix} per-channel scales must have shape (N,) = ({n},), got {tuple(scales.shape)}")
    else:
        if group_size <= 0:
            raise RuntimeError(f"{prefix} group_size must be -1 (per-channel) or positive, got {group_size}")
        n_groups = -(-k // group_size)
        if tuple(scales.shape) != (n, n_groups):
            raise RuntimeError(
                f"{prefix} group-wise scales for qweight ({n}, {k}) and group_size {group_size} must have shape "
                f"({n}, {n_groups}), got {tuple(scales.shape)}"
            )
    if bias is not None:
        if bias.dtype != x.dtype:
            raise RuntimeError(f"{prefix} bias dtype {bias.dtype} must match x dtype {x.dtype}")
        if tuple(bias.shape) != (n,):
            raise RuntimeError(f"{prefix} bias must have shape ({n},), got {tuple(bias.shape)}")
    devices = {t.device for t in (x, qweight, scales, bias) if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"{prefix} all tensors must be on one device, got {sorted(str(d) for d in devices)}")


@torch.library.register_fake("fastquant::int8_linear")
def _int8_linear_fake(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int) -> Tensor:
    check_int8_linear_args(x, qweight, scales, bias, group_size)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.impl(_lib, "int8_linear", "CompositeExplicitAutograd")
def _int8_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int) -> Tensor:
    check_int8_linear_args(x, qweight, scales, bias, group_size)
    return reference.int8_linear(x, qweight, scales, bias, group_size)


def _int8_linear_setup_context(ctx, inputs, output) -> None:
    x, qweight, scales, bias, group_size = inputs
    ctx.save_for_backward(qweight, scales)
    ctx.group_size = group_size
    ctx.x_dtype = x.dtype


def _int8_linear_backward(ctx, grad_out: Tensor):
    # Gradients flow to the activations (and bias) only: the int8 weight is frozen, which is what
    # adapters trained on top of a quantized base (LoRA-style) need.
    qweight, scales = ctx.saved_tensors
    weight = reference.int8_dequantize(qweight, scales, ctx.group_size)
    grad_x = (grad_out.float() @ weight).to(ctx.x_dtype)
    grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_bias, None


torch.library.register_autograd(
    "fastquant::int8_linear", _int8_linear_backward, setup_context=_int8_linear_setup_context
)


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None, group_size: int = -1) -> Tensor:
    """``x @ (qweight * scales).T + bias`` with fp32 accumulation, on the best kernel for x's device."""
    return torch.ops.fastquant.int8_linear(x, qweight, scales, bias, group_size)
