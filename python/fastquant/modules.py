"""Drop-in replacements for float layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastquant import ops, reference

SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)


def linear_weight(layer: nn.Module) -> Tensor:
    """The (out_features, in_features) weight of an nn.Linear or a transformers Conv1D (stored transposed)."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
        return layer.weight.t()
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(layer).__name__}")


def is_quantizable_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


class Int8Linear(nn.Module):
    """A linear layer whose weight is stored as int8 with fp32 scales (per output channel or per group).

    The forward pass runs ``torch.ops.fastquant.int8_linear``: a fused dequantize-matmul that never
    materializes the float weight. Activations keep their dtype; accumulation is fp32.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if group_size is not None and group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size must be None (per-channel) or one of {SUPPORTED_GROUP_SIZES}, got {group_size}"
            )
        if dtype not in ops.ACTIVATION_DTYPES:
            raise ValueError(f"dtype must be one of {ops.ACTIVATION_DTYPES}, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        scale_shape = (out_features,) if group_size is None else (out_features, -(-in_features // group_size))
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(scale_shape, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._dtype = dtype

    @property
    def group_size_arg(self) -> int:
        return -1 if self.group_size is None else self.group_size

    @property
    def format(self) -> str:
        return "int8 per-channel" if self.group_size is None else f"int8 group={self.group_size}"

    @classmethod
    def from_linear(cls, linear: nn.Module, group_size: int | None = None) -> Int8Linear:
        """Quantize an nn.Linear (or transformers Conv1D). Raises ValueError on NaN/inf weights."""
        weight = linear_weight(linear)
        if not torch.isfinite(weight).all():
            bad = (~torch.isfinite(weight)).sum().item()
            raise ValueError(f"cannot quantize a weight of shape {tuple(weight.shape)} with {bad} NaN/inf values")
        out_features, in_features = weight.shape
        dtype = weight.dtype if weight.dtype in ops.ACTIVATION_DTYPES else torch.float32
        layer = cls(in_features, out_features, linear.bias is not None, group_size, weight.device, dtype)
        qweight, scales = reference.int8_quantize(weight, -1 if group_size is None else group_size)
        layer.qweight.copy_(qweight)
        layer.scales.copy_(scales)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return ops.int8_linear(x, self.qweight, self.scales, self.bias, self.group_size_arg)

    def dequantize(self) -> Tensor:
        """The float weight this layer computes with, (out_features, in_features), in the layer's dtype."""
        return reference.int8_dequantize(self.qweight, self.scales, self.group_size_arg).to(self._dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else self._dtype

    def _apply(self, fn, recurse: bool = True):
        # Module.to(dtype) and .half() cast every floating tensor. The scales must keep fp32 precision
        # (they are applied in fp32 so fp16 activations never overflow): only the activation dtype moves.
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float32:
            self.scales = scales.to(self.scales.device)
        probe = fn(torch.empty(0, dtype=self._dtype))
        if probe.dtype in ops.ACTIVATION_DTYPES:
            self._dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format}"
        )
