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
    return scales.repeat_interleave(group_size, dim=1)[:, :k]


def int8_dequantize(qweight: Tensor, scales: Tensor, group_size: int) -> Tensor:
    """The float32 weight an int8 weight and its scales stand for."""
    return qweight.float() * expand_group_scales(scales.float(), qweight.shape[1], group_size)


def int8_quantize(weight: Tensor, group_size: int = -1) -> tuple[Tensor, Tensor]:
    """Symmetric round-to-nearest int8 quantization with one fp32 scale per row or per group of a row.

    The grid is [-127, 127] (not -128) so that the grid is symmetric and negating a weight negates its
    code. A group that is all zeros gets scale 1 so that dequantization stays exactly zero.
    """
    n, k = weight.shape
    w = weight.detach().float()
    if group_size == -1:
        amax = w.abs().amax(dim=1)
    else:
        n_groups = -(-k // group_size)
        padded = F.pad(w, (0, n_groups * group_size - k))
        amax = padded.abs().view(n, n_groups, group_size).amax(dim=2)
    scales = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    qweight = torch.round(w / expand_group_scales(scales, k, group_size))
    return qweight.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scales


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int) -> Tensor:
    """y = x @ (qweight * scales).T + bias, accumulated in fp32, returned in x's dtype."""
    y = F.linear(x.float(), int8_dequantize(qweight, scales, group_size))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
