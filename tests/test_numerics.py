"""The numerical contract of the CPU kernels (README, "Numerical contract"), on every layout and ISA level.

fp32 activations follow torch.get_float32_matmul_precision(): "highest" (torch's default) and "high" keep fp32
products on every path; "medium" lets the AVX-512 prefill paths (cpu_avx512_bf16 for dense int8,
cpu_avx512_bf16_tiles for bitmap16 int8 values; M > 16) round x to bf16 once per call. bf16 activations take
those paths whatever the setting (the rounding is exact). Tolerance rule: tests/helpers.py's int8 rule, whose
product term is 2^-16 * sqrt((x^2) @ (W^2)^T) on fp32 paths (a bf16 rounding of x, ~2^-9 per product, exceeds
it by far, so an fp32 path that rounded would fail) and 2^-6 times the same on bf16 paths.

Non-finite values: every layout gives what the dense reference y = x @ W.T + b gives in IEEE fp32, W the
dequantized weight (q * s, with q = 0 where pruned): an infinity in x times a pruned weight is NaN, as in the
dense layer the kernel choice may put in the sparse layer's place; an infinite scale makes q * s infinite, or
NaN where q = 0. Compared with torch.testing.assert_close(equal_nan=True), finite outputs within
rtol = atol = 2e-3 (the fixed-point paths round x; this test is about where NaN and infinities land).
"""

from __future__ import annotations

import pytest
import torch

from fastquant.kernels import extension, ops, reference
from helpers import assert_int8_linear_close, available_cpu_isas, random_weight

PRECISIONS = ["highest", "high", "medium"]
# Layouts of an int8 weight: dense, bitmap16 and csr16 (the same kept codes and scales).
INT8_LAYOUTS = ["dense", "bitmap16", "csr16"]
BF16_PATHS = {"dense": "cpu_avx512_bf16", "bitmap16": "cpu_avx512_bf16_tiles"}


def pruned_int8(n: int, k: int, group_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes of a half-pruned weight (zero where pruned), their scales and the keep-mask."""
    gen = torch.Generator().manual_seed(seed)
    weight = random_weight(n, k, gen)
    mask = torch.rand(n, k, generator=gen) >= 0.5
    qweight, scales = reference.int8_quantize(weight * mask, group_size)
    return qweight, scales, mask


def run_layout(layout: str, x, qweight, scales, mask, bias, group_size: int) -> torch.Tensor:
    """The op of ``layout`` on the int8 weight ``qweight`` (pruned where ``mask`` is False)."""
    k = qweight.shape[1]
    if layout == "dense":
        return ops.int8_linear(x, qweight, scales, bias, group_size)
    values, masks, row_offsets = reference.sparse_pack(qweight, mask)
    if layout == "bitmap16":
        return ops.sparse_linear(x, values, masks, row_offsets, scales, bias, in_features=k, group_size=group_size)
    indices = reference.sparse_column_indices(masks, k, values.numel())
    return ops.sparse_csr_linear(x, values, indices, row_offsets, scales, bias, in_features=k, group_size=group_size)


def kernel_path(layout: str, m: int, n: int, k: int, group_size: int, dtype: torch.dtype) -> str:
    cpu = torch.device("cpu")
    if layout == "dense":
        return extension.int8_linear_kernel_path(cpu, m, n, k, group_size, dtype)
    if layout == "bitmap16":
        return extension.sparse_linear_kernel_path(cpu, m, n, k, torch.int8, dtype, group_size)
    return extension.sparse_csr_linear_kernel_path(cpu)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("fp32_precision", PRECISIONS, indirect=True)
@pytest.mark.parametrize("layout", INT8_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [16, 17, 64])
def test_fp32_precision_picks_the_path(cpu_isa, fp32_precision, layout, dtype, m):
    """Each setting takes the path the contract names, and its result is within that path's bound."""
    k, n, group_size = 1024, 80, 128
    qweight, scales, mask = pruned_int8(n, k, group_size, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(dtype)
    path = kernel_path(layout, m, n, k, group_size, dtype)
    rounds = dtype == torch.bfloat16 or fp32_precision == "medium"
    if cpu_isa == "avx512" and layout in BF16_PATHS and m > 16 and rounds:
        assert path == BF16_PATHS[layout]
    else:
        assert "bf16" not in path
    y = run_layout(layout, x, qweight, scales, mask, bias, group_size)
    assert_int8_linear_close(y, x, qweight, scales, bias, group_size, path)


@pytest.mark.parametrize("fp32_precision", ["medium"], indirect=True)
@pytest.mark.parametrize(("m", "k", "n"), [(17, 1025, 100), (33, 31, 17), (40, 2, 9), (513, 77, 40)])
def test_fp32_x_rounds_to_bf16_as_torch_does(fp32_precision, m, k, n):
    """Under "medium" the bf16 prefill path rounds fp32 x itself (one pass: convert, pair, transpose); its
    rounding is torch's (to nearest even): x and x rounded to bf16 by torch give bit-identical outputs, and
    bf16 x (laid out by ATen ops) the same result rounded once to bf16. Odd K (a pair with a zero partner),
    K below one 32-column block, M not a multiple of 16."""
    if extension.int8_linear_kernel_path(torch.device("cpu"), m, n, k, -1, torch.float32) != "cpu_avx512_bf16":
        pytest.skip("no AVX-512 BF16 on this CPU")
    gen = torch.Generator().manual_seed(m * k)
    qweight, scales = reference.int8_quantize(random_weight(n, k, gen), -1)
    x = torch.randn(m, k, generator=gen) * 3
    bias = torch.randn(n, generator=gen).bfloat16().float()
    y = ops.int8_linear(x, qweight, scales, bias, -1)
    assert torch.equal(y, ops.int8_linear(x.bfloat16().float(), qweight, scales, bias, -1))
    assert torch.equal(y.bfloat16(), ops.int8_linear(x.bfloat16(), qweight, scales, bias.bfloat16(), -1))
    assert not torch.equal(x.bfloat16().float(), x)  # the rounding is there to be matched
    assert_int8_linear_close(y, x, qweight, scales, bias, -1, "cpu_avx512_bf16")


def test_fp32_precision_is_read_per_call():
    """The same layer, called twice under different settings, takes each setting's path: no cached choice."""
    if extension.native is None or extension.native.best_cpu_isa() not in ("avx512", "avx512_vbmi"):
        pytest.skip("the bf16 prefill paths need AVX-512")
    k, n, m = 512, 64, 32
    qweight, scales, _ = pruned_int8(n, k, -1, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4))
    before = torch.get_float32_matmul_precision()
    try:
        outputs = {}
        for precision in ("medium", "highest"):
            torch.set_float32_matmul_precision(precision)
            path = kernel_path("dense", m, n, k, -1, torch.float32)
            outputs[precision] = ops.int8_linear(x, qweight, scales, None, -1)
            assert_int8_linear_close(outputs[precision], x, qweight, scales, None, -1, path)
    finally:
        torch.set_float32_matmul_precision(before)
    assert not torch.equal(outputs["medium"], outputs["highest"])  # bf16-rounded x differs from fp32 x


@pytest.mark.parametrize("fp32_precision", ["highest", "medium"], indirect=True)
@pytest.mark.parametrize("layout", ["dense", "bitmap16"])
def test_fake_kernels_and_compile_agree_under_each_precision(fp32_precision, layout):
    """The path changes neither the output's dtype nor its shape, so the fake kernels need no precision: opcheck
    passes under each setting, and a compiled call (which runs the op, reading the setting at run time) gives
    the eager result bit for bit."""
    k, n, m, group_size = 256, 48, 32, -1
    qweight, scales, mask = pruned_int8(n, k, group_size, seed=5)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(6))
    eager = run_layout(layout, x, qweight, scales, mask, None, group_size)
    compiled = torch.compile(run_layout, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(layout, x, qweight, scales, mask, None, group_size), eager, rtol=0, atol=0)
    if layout == "dense":
        torch.library.opcheck(torch.ops.fastquant.int8_linear.default, (x, qweight, scales, None, group_size))
    else:
        values, masks, row_offsets = reference.sparse_pack(qweight, mask)
        args = (x, values, masks, row_offsets, scales, None, k, group_size)
        torch.library.opcheck(torch.ops.fastquant.sparse_linear.default, args)


# Layouts of one pruned weight: int8 codes dense, bitmap16 and csr16; float values bitmap16 and csr16; int4.
LAYOUTS = ["int8", "bitmap16-int8", "csr16-int8", "bitmap16-fp32", "csr16-fp32", "int4"]
SPECIALS = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def non_finite_case(layout: str, m: int, grouped: bool, special: str) -> tuple:
    """(op output, reference output) of ``layout`` with ``special`` in x[0, 7] or in one scale of row 2."""
    n, k = 37, 320
    gen = torch.Generator().manual_seed(7)
    weight = random_weight(n, k, gen)
    mask = torch.rand(n, k, generator=gen) >= 0.5
    mask[::5, 7] = False  # column 7 pruned in some rows, kept in others
    mask[1::5, 7] = True
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    if special in SPECIALS:
        x[0, 7] = SPECIALS[special]
    if layout == "int4":
        group_size = 64 if grouped else 32
        qweight, scales, _ = reference.int4_quantize(weight * mask, group_size)
        if special == "inf-scale":
            scales[2, 1] = float("inf")
        y = ops.int4_linear(x, qweight, scales, None, bias, in_features=k, group_size=group_size)
        return y, reference.int4_linear(x, qweight, scales, None, bias, k, group_size)
    if layout.endswith("fp32"):
        dense = weight * mask
        values, masks, row_offsets = reference.sparse_pack(dense, mask)
        scales, group_size, expected = None, -1, reference.int8_linear(x, dense, torch.ones(n), bias, -1)
    else:
        group_size = 64 if grouped else -1
        qweight, scales = reference.int8_quantize(weight * mask, group_size)
        if special == "inf-scale":
            scales[(2, 1) if grouped else 2] = float("inf")
        values, masks, row_offsets = reference.sparse_pack(qweight, mask)
        expected = reference.int8_linear(x, qweight, scales, bias, group_size)  # the dense layer of the same codes
        if layout == "int8":
            return ops.int8_linear(x, qweight, scales, bias, group_size), expected
    if layout.startswith("bitmap16"):
        y = ops.sparse_linear(x, values, masks, row_offsets, scales, bias, in_features=k, group_size=group_size)
    else:
        indices = reference.sparse_column_indices(masks, k, values.numel())
        y = ops.sparse_csr_linear(x, values, indices, row_offsets, scales, bias, in_features=k, group_size=group_size)
    return y, expected


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(with_vbmi=True), indirect=True)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("special", [*SPECIALS, "inf-scale"])
@pytest.mark.parametrize("m", [1, 8, 33])
@pytest.mark.parametrize("grouped", [False, True], ids=["channel", "group"])
def test_non_finite_values_give_the_dense_result(cpu_isa, layout, special, m, grouped):
    if special == "inf-scale" and layout.endswith("fp32"):
        pytest.skip("float values have no scales")
    y, expected = non_finite_case(layout, m, grouped, special)
    assert not bool(expected.isfinite().all())
    torch.testing.assert_close(y, expected, equal_nan=True, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("values_dtype", [torch.int8, torch.float32], ids=str)
def test_non_finite_values_past_the_first_scan_slice(values_dtype):
    """csr16 visits kept weights only, so the dense result of a non-finite x comes from the glue's check, which
    scans x and y in slices of 65,536 elements on torch's threads. The only non-finite element of x (257 x 320) is a
    NaN in the second slice, in a column pruned in every row: y stays finite, only the x scan can see it."""
    n, k, m = 37, 320, 257
    gen = torch.Generator().manual_seed(11)
    weight = random_weight(n, k, gen)
    mask = torch.rand(n, k, generator=gen) >= 0.5
    mask[:, 7] = False
    x = torch.randn(m, k, generator=gen)
    x[m - 1, 7] = float("nan")
    if values_dtype == torch.int8:
        codes, scales = reference.int8_quantize(weight * mask, -1)
        values, masks, row_offsets = reference.sparse_pack(codes, mask)
        expected = reference.int8_linear(x, codes, scales, None, -1)
    else:
        values, masks, row_offsets = reference.sparse_pack(weight * mask, mask)
        scales, expected = None, reference.int8_linear(x, weight * mask, torch.ones(n), None, -1)
    indices = reference.sparse_column_indices(masks, k, values.numel())
    y = ops.sparse_csr_linear(x, values, indices, row_offsets, scales, None, in_features=k, group_size=-1)
    assert bool(expected[m - 1].isnan().all()) and bool(expected[: m - 1].isfinite().all())
    torch.testing.assert_close(y, expected, equal_nan=True, rtol=2e-3, atol=2e-3)
