"""Helpers shared by the kernel tests.

Tolerance rule for int8_linear (every kernel, every device): with y64 the float64 evaluation of the
reference formula and y_ref the fp32 reference kernel's output in the activation dtype,

    |y - y64| <= 2 * |y_ref - y64| + c_path * sqrt((x^2) @ (W^2)^T) + ulp(dtype) * |y64|

where W is the dequantized weight. The first term allows what PyTorch itself loses at this precision;
the second is the rounding of the kernel's products: c_path = 2^-16 for kernels that multiply in fp32,
and 2^-6 (8 standard deviations of a 2^-9 relative rounding per product) for kernels that round
activations to bf16 before a bf16 dot product; the last is one unit of the output dtype's rounding.
sqrt((x^2) @ (W^2)^T) is the natural scale of a sum of independent products, so losing even one group of
32 terms out of thousands exceeds the bound.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastquant import _native, reference

ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def product_rounding(path: str) -> float:
    return 2.0**-6 if "bf16" in path else 2.0**-16


def assert_int8_linear_close(y, x, qweight, scales, bias, group_size, path: str) -> None:
    weight = reference.int8_dequantize(qweight, scales, group_size).double()
    x64 = x.double()
    y64 = x64 @ weight.T
    if bias is not None:
        y64 = y64 + bias.double()
    y_ref = reference.int8_linear(x, qweight, scales, bias, group_size)
    scale = ((x64**2) @ (weight**2).T).sqrt()
    bound = 2 * (y_ref.double() - y64).abs() + product_rounding(path) * scale + ULP[x.dtype] * y64.abs()
    err = (y.double() - y64).abs()
    worst = (err - bound).argmax()
    assert y.dtype == x.dtype and y.shape == y64.shape
    assert bool((err <= bound).all()), (
        f"kernel {path}: error {err.flatten()[worst].item():.3g} exceeds bound "
        f"{bound.flatten()[worst].item():.3g} at flat index {worst.item()} (y64={y64.flatten()[worst].item():.4g})"
    )


def available_cpu_isas(with_vbmi: bool = False) -> list[str]:
    """The ISA levels this CPU can run, lowest first. "avx512_vbmi" only changes the kernels that expand int8
    values (sparse_linear at M = 1), so only their tests ask for it; elsewhere it runs the avx512 kernels."""
    if _native.native is None:
        return []
    order = ["portable", "avx2", "avx512", "avx512_vbmi"]
    best = _native.native.best_cpu_isa()
    available = order[: order.index(best) + 1]
    return available if with_vbmi else [isa for isa in available if isa != "avx512_vbmi"]


def random_weight(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Rows with different magnitudes (as in trained layers) so per-row scales differ."""
    row_scale = torch.rand(n, 1, generator=generator) * 2 + 0.05
    return torch.randn(n, k, generator=generator) * row_scale


def launched_kernels(fn: Callable[[], object]) -> list[str]:
    """Names of the CUDA kernels ``fn`` launches (demangled, template arguments included), from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]


def int4_kernel_path(device: torch.device, m: int, n: int, k: int, group_size: int, dtype: torch.dtype) -> str:
    return _native.int4_linear_kernel_path(device, m, n, k, group_size, dtype)


def fixed16_block_max(x: torch.Tensor) -> torch.Tensor:
    """max|x| of each element's 32-column block (float64, x's shape): the scale of the fixed16 kernels' rounding."""
    k = x.shape[-1]
    padded = torch.nn.functional.pad(x.double().abs(), (0, -k % 32))
    block_max = padded.unflatten(-1, (-1, 32)).amax(dim=-1)
    return block_max.repeat_interleave(32, dim=-1)[..., :k]


def assert_int4_linear_close(y, x, qweight, scales, offsets, bias, in_features, group_size, path: str) -> None:
    """The int8 rule (module docstring) with the dequantized int4 weight. Kernels that multiply in fp32 get
    c_path = 2^-16 on sqrt((x^2) @ (W^2)^T). cpu_avx2_fixed16 and cpu_avx512_vnni_fixed16 compute exactly with x
    rounded to 16-bit fixed point per 32-column block (error <= max|x of the block| / 65024, uniform): their term
    is 2^-13 (9 standard deviations, and above the worst case sum for K <= 32) times sqrt((xmax^2) @ (W^2)^T), xmax
    the block max.
    cpu_avx512_bf16 rounds x to bf16 and multiplies it by the codes minus 8 (the offsets multiply fp32 sums of x):
    the int8 rule's bf16 term, 2^-6, times sqrt((x^2) @ (Wc^2)^T) with Wc = s (q - 8), the part of W that meets
    the rounded x (W itself when symmetric)."""
    weight = reference.int4_dequantize(qweight, scales, offsets, in_features, group_size).double()
    x64 = x.double()
    y64 = x64 @ weight.T
    if bias is not None:
        y64 = y64 + bias.double()
    y_ref = reference.int4_linear(x, qweight, scales, offsets, bias, in_features, group_size)
    if "fixed16" in path:
        rounding = 2.0**-13 * ((fixed16_block_max(x) ** 2) @ (weight**2).T).sqrt()
    elif "bf16" in path:
        codes_part = reference.int4_dequantize(qweight, scales, None, in_features, group_size).double()
        rounding = 2.0**-6 * ((x64**2) @ (codes_part**2).T).sqrt()
    else:
        rounding = 2.0**-16 * ((x64**2) @ (weight**2).T).sqrt()
    bound = 2 * (y_ref.double() - y64).abs() + rounding + ULP[x.dtype] * y64.abs()
    err = (y.double() - y64).abs()
    worst = (err - bound).argmax()
    assert y.dtype == x.dtype and y.shape == y64.shape
    assert bool((err <= bound).all()), (
        f"kernel {path}: error {err.flatten()[worst].item():.3g} exceeds bound "
        f"{bound.flatten()[worst].item():.3g} at flat index {worst.item()} (y64={y64.flatten()[worst].item():.4g})"
    )
