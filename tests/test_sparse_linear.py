"""fastquant.sparse_linear (bitmap16 sparse weight) on the CPU: every ISA path vs the reference, the format
helpers, opcheck, compile, bad input and corrupt row offsets.

Tolerance rule (the int8_linear rule of tests/helpers.py, with W the unpacked weight times its scales):

    |y - y64| <= 2 * |y_ref - y64| + 2^-16 * sqrt((x^2) @ (W^2)^T) + ulp(dtype) * |y64|

y64 is the float64 evaluation, y_ref the fp32 reference kernel's output. Every sparse kernel multiplies in
fp32 (values and activations are converted to fp32 exactly), so only the fp32 product rounding constant
applies; losing or misplacing a single kept weight exceeds the bound. Two paths differ: the AVX-512
prefill path for int8 values (cpu_avx512_bf16_tiles, M > 16; for fp32 x only under torch's "medium" float32
matmul precision) rounds x to bf16 once per call as int8_linear's prefill path does: there y64, y_ref and the
bound are those of the rounded x. On AVX2, int8
values at M >= 8 (cpu_avx2_dense_int8) are expanded to dense int8 and run int8_linear's fp32 kernel, and
float values at M >= 32 (cpu_avx2_dense_float) to blocks of dense fp32 rows for torch's matmul: fp32 products
either way.
The M = 1 path for per-channel int8 values (cpu_avx512_vnni_fixed; cpu_avx2_fixed,
which also takes groups of a multiple of 64) rounds x to 32-bit fixed point (steps of about 2^-31 max|x|) and
sums exactly in integers, for x whose largest magnitude is at most 1024x the mean of the others: its error, at
most ~2^-32 max|x| sum|q| s, is far inside the same bound.
"""

from __future__ import annotations

import functools
import sys
import zlib

import pytest
import torch

import fastquant
from fastquant.kernels import extension, reference
from fastquant.kernels.ops import sparse_linear
from helpers import (
    ULP,
    assert_gradients_reach_activations,
    assert_within,
    available_cpu_isas,
    bf16_activations_allowed,
    call_kernel,
    fp16_cancelling_case,
    random_weight,
    replacing,
    signed_ones_weight,
)

VALUE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]
X_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GROUP_SIZES = [-1, 16, 32, 48, 64, 128, 256]  # 16 and 48: groups that end inside a 64-column step
SPARSITIES = [0.0, 0.5, 0.9, 1.0]
# (M, K, N): decode and prefill row counts, K not a multiple of 16 or of any group, N not a multiple of any
# row block, one square 4096 layer.
SHAPES = [(1, 17, 3), (3, 1000, 17), (17, 1025, 1000), (64, 4096, 257), (513, 1025, 100), (1, 4096, 4096)]
PORTABLE_SHAPES = SHAPES[:3]


def make_mask(n: int, k: int, sparsity: float, pattern: str, gen: torch.Generator) -> torch.Tensor:
    if pattern == "2:4":  # the 2 largest random scores of every 4 consecutive columns (a ragged tail keeps <= 2)
        k4 = -(-k // 4) * 4
        scores = torch.rand(n, k4 // 4, 4, generator=gen)
        scores[:, -1, k4 - k :] = -1.0 if k4 > k else scores[:, -1, k4 - k :]
        top = scores.topk(2, dim=2).indices
        mask = torch.zeros(n, k4 // 4, 4, dtype=torch.bool).scatter_(2, top, True)
        mask &= scores >= 0
        return mask.view(n, k4)[:, :k]
    return torch.rand(n, k, generator=gen) >= sparsity


def make_case(m, k, n, values_dtype, x_dtype, group_size, sparsity, pattern, with_bias, seed):
    """Inputs of one call; the dense weight is zero where pruned, and int8 codes are quantized after pruning."""
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(n, k, sparsity, pattern, gen)
    weight = random_weight(n, k, gen) * mask
    scales = None
    if values_dtype == torch.int8:
        weight, scales = reference.int8_quantize(weight, group_size)
    else:
        group_size = -1
        weight = weight.to(values_dtype)
    values, masks, row_offsets = reference.sparse_pack(weight, mask)
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    bias = torch.randn(n, generator=gen).to(x_dtype) if with_bias else None
    return (x, values, masks, row_offsets, scales, bias), group_size


BF16_PATH = "cpu_avx512_bf16_tiles"


def cpu_path(m, n, k, values_dtype, x_dtype, group_size: int = -1) -> str:
    return extension.sparse_linear_kernel_path(torch.device("cpu"), m, n, k, values_dtype, x_dtype, group_size)


def bf16_tiles_take(k: int, group_size: int) -> bool:
    """Group sizes int8_linear's bf16 tiles accept: per-channel, or groups that tile a 256-column chunk."""
    group = k if group_size == -1 or group_size >= k else group_size
    return group == k or (group % 2 == 0 and (256 % group == 0 or group % 256 == 0))


def expected_cpu_path(
    isa: str, m: int, k: int, values_dtype: torch.dtype, x_dtype: torch.dtype, group_size: int = -1
) -> str:
    int8 = values_dtype == torch.int8
    prefill = m > 16 and bf16_tiles_take(k, group_size) and bf16_activations_allowed(x_dtype)
    if isa in ("avx512", "avx512_vbmi") and int8 and prefill:
        return BF16_PATH
    if isa == "avx512_vbmi":  # the byte expand is for int8 values at M = 1; the rest is the avx512 kernel
        if int8 and m == 1:
            fixed_point = group_size == -1 and k <= 65536  # its int32 sums hold 255 * 128 * K
            return "cpu_avx512_vnni_fixed" if fixed_point else "cpu_avx512_vbmi_expand"
        return "cpu_avx512_expand"
    if isa == "avx2" and int8 and m >= 8:
        return "cpu_avx2_dense_int8"
    if isa == "avx2" and not int8 and m >= 32:
        return "cpu_avx2_dense_float"
    if isa == "avx2" and int8 and m == 1 and (group_size == -1 or group_size % 64 == 0):
        return "cpu_avx2_fixed"  # groups of whole 64-column steps
    return {"portable": "cpu_portable", "avx2": "cpu_avx2_permute", "avx512": "cpu_avx512_expand"}[isa]


def as_computed(args, group_size: int):
    """args with x as the kernel that runs for them sees it: rounded to bf16 on the bf16 tiles path."""
    x, values, masks, row_offsets, _, _ = args
    n = masks.shape[0]
    m = x.numel() // max(x.shape[-1], 1)
    if cpu_path(m, n, x.shape[-1], values.dtype, x.dtype, group_size) != BF16_PATH:
        return args
    return (x.bfloat16().to(x.dtype), *args[1:])


def expected_and_bound(args, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y64 (the float64 evaluation) and the tolerance bound of the module docstring for these inputs."""
    x, values, masks, row_offsets, scales, bias = args
    k = x.shape[-1]
    weight32 = reference.sparse_dequantize(values, masks, row_offsets, scales, k, group_size)
    weight = weight32.double()
    x64 = x.double()
    y64 = x64 @ weight.T
    if bias is not None:
        y64 = y64 + bias.double()
    y_ref = reference.sparse_linear(x, values, masks, row_offsets, scales, bias, k, group_size)
    scale = ((x64**2) @ (weight**2).T).sqrt()
    return y64, 2 * (y_ref.double() - y64).abs() + 2.0**-16 * scale + ULP[x.dtype] * y64.abs()


def assert_sparse_linear_close(y, args, group_size: int) -> None:
    assert_within(y, *expected_and_bound(as_computed(args, group_size), group_size), args[0].dtype)


def run_op(args, group_size: int) -> torch.Tensor:
    x, values, masks, row_offsets, scales, bias = args
    return sparse_linear(x, values, masks, row_offsets, scales, bias, in_features=x.shape[-1], group_size=group_size)


@functools.lru_cache(maxsize=2)
def cached_case(shape, values_dtype, x_dtype, sparsity, pattern, group_size, with_bias):
    """Inputs, y64 and bound of one case, shared by the ISAs (consecutive tests, see kernel_cases)."""
    m, k, n = shape
    seed = zlib.crc32(repr((shape, values_dtype, x_dtype, sparsity, pattern, group_size)).encode())
    args, g = make_case(m, k, n, values_dtype, x_dtype, group_size, sparsity, pattern, with_bias, seed)
    return args, g, *expected_and_bound(args, g)


def kernel_cases():
    """Shape x value dtype x ISA, x dtypes crossed on the smaller shapes; sparsity, pattern, group and bias
    rotate so that every value of each appears on every shape class without the full cross product. The ISA
    loop is innermost so that the ISAs share each case's inputs and float64 result."""
    i = 0
    isas = available_cpu_isas(with_vbmi=True)
    for shape in SHAPES:
        m, k, n = shape
        for vi, vdtype in enumerate(VALUE_DTYPES):
            if m * k * n > 10_000_000 and vdtype in (torch.bfloat16, torch.float16):
                continue  # the 4096 x 4096 layer: fp32 and int8 values (16-bit loads are covered above)
            x_dtypes = X_DTYPES if m * k * n <= 2_000_000 else [X_DTYPES[(vi + i) % 3]]
            for xdtype in x_dtypes:
                i += 1
                sparsity = SPARSITIES[i % len(SPARSITIES)]
                pattern = "2:4" if i % 5 == 0 else "random"
                group = GROUP_SIZES[i % len(GROUP_SIZES)] if vdtype == torch.int8 else -1
                for isa in isas:
                    if isa == "portable" and shape not in PORTABLE_SHAPES:
                        continue
                    same_as_avx512 = expected_cpu_path(isa, m, k, vdtype, xdtype, group) == expected_cpu_path(
                        "avx512", m, k, vdtype, xdtype, group
                    )
                    if isa == "avx512_vbmi" and same_as_avx512:
                        continue
                    tag = f"{isa}-{'x'.join(map(str, shape))}-{vdtype}-{xdtype}-s{sparsity}-{pattern}-g{group}"
                    yield pytest.param(isa, shape, vdtype, xdtype, sparsity, pattern, group, i % 2 == 0, id=tag)


@pytest.mark.parametrize(
    ("cpu_isa", "shape", "values_dtype", "x_dtype", "sparsity", "pattern", "group_size", "with_bias"),
    kernel_cases(),
    indirect=["cpu_isa"],
)
def test_matches_reference(cpu_isa, shape, values_dtype, x_dtype, sparsity, pattern, group_size, with_bias):
    m, k, n = shape
    args, g, y64, bound = cached_case(shape, values_dtype, x_dtype, sparsity, pattern, group_size, with_bias)
    path = cpu_path(m, n, k, values_dtype, x_dtype, g)
    assert path == expected_cpu_path(cpu_isa, m, k, values_dtype, x_dtype, g)
    if path == BF16_PATH:  # x rounded to bf16 by the kernel: the reference and bound of the rounded x
        y64, bound = expected_and_bound(as_computed(args, g), g)
    assert_within(run_op(args, g), y64, bound, x_dtype)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(with_vbmi=True), indirect=True)
@pytest.mark.parametrize("values_dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3])
def test_every_group_and_pattern(cpu_isa, values_dtype, m):
    """Every group size with every x dtype on a ragged shape, random and 2:4 masks."""
    k, n = 1000, 37
    groups = GROUP_SIZES if values_dtype == torch.int8 else [-1]
    for group in groups:
        for x_dtype in X_DTYPES:
            for pattern in ("random", "2:4"):
                seed = zlib.crc32(repr((cpu_isa, values_dtype, group, x_dtype, pattern, m)).encode())
                args, g = make_case(m, k, n, values_dtype, x_dtype, group, 0.7, pattern, seed % 2 == 0, seed)
                assert_sparse_linear_close(run_op(args, g), args, g)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(with_vbmi=True), indirect=True)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33, 128, 513])
def test_every_row_count(cpu_isa, m):
    """Row counts around every register tile and row block edge (M blocks, tails)."""
    k, n = (100, 20) if cpu_isa == "portable" else (576, 130)
    for vdtype, group in ((torch.float32, -1), (torch.int8, 64), (torch.int8, -1)):
        for rows in (n, 1, 2, 3, 5, 6, 7):  # and the row tails of the M = 1 kernels (pairs, fours)
            args, g = make_case(m, k, rows, vdtype, torch.float32, group, 0.5, "random", True, seed=m + rows)
            assert_sparse_linear_close(run_op(args, g), args, g)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float_values_in_many_row_blocks(cpu_isa, values_dtype):
    """At K = 32768 the AVX2 prefill path for float values (M >= 32) expands 32 weight rows per 4 MiB block,
    so 75 rows take three blocks, the last one partial: each block's outputs and bias must land in its own
    columns of y, and a corrupt row in the second block is refused by name."""
    k, n, m = 32768, 75, 33
    args, g = make_case(m, k, n, values_dtype, torch.bfloat16, -1, 0.7, "random", True, seed=11)
    assert_sparse_linear_close(run_op(args, g), args, g)
    row_offsets = args[3].clone()
    row_offsets[41] += 1
    with pytest.raises(RuntimeError, match="row 40 keeps .* weights in masks but row_offsets gives it"):
        run_op((*args[:3], row_offsets, *args[4:]), g)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
def test_all_zero_rows_and_dense_rows(cpu_isa):
    """Rows keeping nothing next to rows keeping everything: the value pointer of each row must restart
    at its own offset."""
    gen = torch.Generator().manual_seed(4)
    k, n = 1025, 40
    weight = random_weight(n, k, gen)
    weight[::3] = 0.0
    mask = weight != 0
    mask[1::3, 100:900] = False
    for vdtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
        if vdtype == torch.int8:
            codes, scales = reference.int8_quantize(weight * mask)
            values, masks, row_offsets = reference.sparse_pack(codes, mask)
        else:
            scales = None
            values, masks, row_offsets = reference.sparse_pack(weight.to(vdtype) * mask, mask)
        for m in (1, 5, 20):
            x = torch.randn(m, k, generator=gen)
            args = (x, values, masks, row_offsets, scales, None)
            y = run_op(args, -1)
            assert bool((y[:, ::3] == 0).all())
            assert_sparse_linear_close(y, args, -1)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(with_vbmi=True), indirect=True)
@pytest.mark.parametrize("m", [1, 3, 32])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_x_propagates(cpu_isa, m, bad):
    """A NaN or infinity in x gives the dense layer's result (the M = 1 fixed-point path hands such x to the
    fp32 kernel instead of rounding it): rows that keep its column get the reference's value, rows that pruned
    it NaN (the dense layer's inf * 0, tests/test_numerics.py), whether or not the kernel visits pruned
    weights; other rows of x are unaffected."""
    k, n = 300, 37
    for vdtype in (torch.int8, torch.float32):
        args, _ = make_case(m, k, n, vdtype, torch.float32, -1, 0.5, "random", True, seed=5)
        x = args[0].clone()
        x[0, 7] = bad
        case = (x, *args[1:])
        y = run_op(case, -1)
        y_dense = reference.sparse_linear(*case, k, -1)
        kept = reference.sparse_dequantize(*args[1:5], k, -1)[:, 7] != 0
        torch.testing.assert_close(y[0, kept], y_dense[0, kept], equal_nan=True, rtol=0, atol=0)
        assert bool(y[0, ~kept].isnan().all())
        if m > 1:
            assert_sparse_linear_close(y[1:], (x[1:], *args[1:]), -1)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(with_vbmi=True), indirect=True)
@pytest.mark.parametrize("outlier", [0.0, 30.0, 1000.0, 1e5, 1e30])
def test_x_outliers_and_zero_x(cpu_isa, outlier):
    """x with one element `outlier` times the others' mean magnitude (the fixed-point path takes x up to 1024x,
    the fp32 kernel the rest), at a pruned and at a kept column, and x = 0 (the output is then the bias)."""
    k, n = 1000, 64
    args, _ = make_case(1, k, n, torch.int8, torch.float32, -1, 0.5, "random", True, seed=int(outlier) % 1000 + 3)
    x, values, masks, row_offsets, scales, bias = args
    if outlier == 0.0:
        y = run_op((torch.zeros_like(x), *args[1:]), -1)
        torch.testing.assert_close(y, bias.expand_as(y), rtol=0, atol=0)
        return
    mask0 = reference.sparse_dequantize(values, masks, row_offsets, scales, k, -1)[0] != 0
    for column in (int(mask0.nonzero()[0]), int((~mask0).nonzero()[0])):
        x_out = x.clone()
        x_out[0, column] = outlier * x.abs().mean()
        case = (x_out, *args[1:])
        assert_sparse_linear_close(run_op(case, -1), case, -1)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(with_vbmi=True), indirect=True)
@pytest.mark.parametrize("group_size", [-1, 64, 4096])
def test_fixed_point_sums_at_their_largest(cpu_isa, group_size):
    """Dense 8192-column rows of codes +-127 times a constant x, the largest fixed-point magnitude in every
    column: the integer sums reach 8192 * 127 * 2^31 (AVX2 sums at most 2048 columns, and one group, in int32
    lanes at a time) and must not wrap. Row 2 alternates signs and cancels to exactly 0. Groups of 4096
    columns span two of AVX2's 2048-column sums."""
    k = 8192
    weight = signed_ones_weight(4, k)
    q, scales = reference.int8_quantize(weight, group_size)
    mask = q != 0
    x = torch.full((1, k), -3.0)
    args = (x, *reference.sparse_pack(q, mask), scales, None)
    assert cpu_path(1, 4, k, torch.int8, torch.float32, group_size) == expected_cpu_path(
        cpu_isa, 1, k, torch.int8, torch.float32, group_size
    )
    y = run_op(args, group_size)
    torch.testing.assert_close(y[0, :3], torch.tensor([-3.0 * k, 3.0 * k, 0.0]), rtol=1e-6, atol=0)
    assert_sparse_linear_close(y, args, group_size)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
def test_fp16_partial_sums_do_not_overflow(cpu_isa):
    """Partial sums reach 4e5, past fp16's 65504, and cancel to a small result: fp32 accumulation."""
    x, weight = fp16_cancelling_case()
    weight[:, 1::2] = 0.0
    args = (x, *reference.sparse_pack(weight.half()), None, None)
    y = run_op(args, -1)
    assert torch.isfinite(y).all()
    assert_sparse_linear_close(y, args, -1)


@pytest.mark.parametrize("dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 16, 17, 1025])
def test_pack_unpack_round_trip(dtype, k):
    gen = torch.Generator().manual_seed(k)
    n = 9
    mask = torch.rand(n, k, generator=gen) > 0.6
    mask[0] = False
    mask[1] = True
    if dtype == torch.int8:
        weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8) * mask
    else:
        weight = (torch.randn(n, k, generator=gen) * mask).to(dtype)
    weight[1, 0] = 0  # a kept weight that is zero stays kept with an explicit mask
    values, masks, row_offsets = reference.sparse_pack(weight, mask)
    assert values.dtype == dtype and masks.dtype == torch.int16 and row_offsets.dtype == torch.int64
    assert masks.shape == (n, -(-k // 16)) and row_offsets.shape == (n + 1,)
    nnz = int(mask.sum())
    assert int(row_offsets[0]) == 0 and int(row_offsets[-1]) == nnz and values.numel() == nnz + 64
    assert bool((values[nnz:] == 0).all())
    assert torch.equal(reference.sparse_mask_bits(masks, k), mask)
    assert torch.equal(reference.sparse_unpack(values, masks, row_offsets, k), weight)
    default = reference.sparse_pack(weight)  # default mask: the nonzero weights
    assert torch.equal(reference.sparse_unpack(*default, k), weight)
    assert int(default[2][-1]) == int((weight != 0).sum())


def test_pack_bit_layout():
    """Bit j of word c is column 16c + j, LSB first; bit 15 makes the int16 word negative."""
    weight = torch.zeros(2, 40)
    weight[0, [0, 15, 16, 39]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weight[1, 5] = 5.0
    values, masks, row_offsets = reference.sparse_pack(weight)
    assert masks.tolist() == [[1 - 2**16 + 2**15, 1, 1 << 7], [1 << 5, 0, 0]]
    assert values[:5].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert row_offsets.tolist() == [0, 4, 5]


@pytest.mark.parametrize(
    ("message", "make"),
    [
        ("weight must be 2-D", lambda w: (w[0], None)),
        ("weight must be float32, bfloat16, float16 or int8", lambda w: (w.double(), None)),
        ("mask must be a bool tensor of the weight's shape", lambda w: (w, (w != 0)[:, :3])),
        ("mask must be a bool tensor of the weight's shape", lambda w: (w, (w != 0).int())),
    ],
)
def test_pack_bad_input(message, make):
    with pytest.raises(ValueError, match=message):
        reference.sparse_pack(*make(torch.randn(4, 20)))


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(with_vbmi=True), indirect=True)
@pytest.mark.parametrize(("values_dtype", "group_size"), [(torch.float32, -1), (torch.int8, -1), (torch.int8, 64)])
@pytest.mark.parametrize("m", [1, 5])
def test_opcheck(cpu_isa, values_dtype, group_size, m):
    args, g = make_case(m, 300, 40, values_dtype, torch.bfloat16, group_size, 0.6, "random", True, seed=7)
    op = torch.ops.fastquant.sparse_linear.default
    torch.library.opcheck(op, (*args, 300, g))
    x, values, masks, row_offsets, scales, _ = args
    torch.library.opcheck(op, (x.float(), values, masks, row_offsets, scales, None, 300, g))


def test_reference_kernel_opcheck():
    """The pure-PyTorch fallback is a registered kernel too (it runs on devices without a native one)."""
    args, g = make_case(3, 100, 20, torch.int8, torch.float32, 32, 0.5, "random", True, seed=3)
    y = torch.ops.fastquant.sparse_linear.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd), *args, 100, g
    )
    expected = reference.sparse_linear(*args, 100, g)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_torch_compile_fullgraph():
    args, g = make_case(4, 1025, 300, torch.int8, torch.bfloat16, 128, 0.7, "random", True, seed=11)
    _, values, masks, row_offsets, scales, bias = args

    def f(x):
        y = fastquant.ops.sparse_linear(x, values, masks, row_offsets, scales, bias, in_features=1025, group_size=g)
        return torch.nn.functional.gelu(y) * 2

    compiled = torch.compile(f, fullgraph=True)
    x = args[0]
    torch.testing.assert_close(compiled(x), f(x))
    x2 = torch.randn(9, 1025).bfloat16()
    torch.testing.assert_close(compiled(x2), f(x2))


def test_non_contiguous_and_batched_input():
    args, g = make_case(6, 200, 50, torch.float32, torch.float32, -1, 0.5, "random", True, seed=5)
    _, values, masks, row_offsets, scales, bias = args

    def op(x):
        return sparse_linear(x, values, masks, row_offsets, scales, bias, in_features=200)

    x3 = torch.randn(200, 3, 4).permute(1, 2, 0)  # (3, 4, 200) with K not the innermost stride
    assert not x3.is_contiguous()
    y = op(x3)
    assert y.shape == (3, 4, 50)
    torch.testing.assert_close(y, op(x3.contiguous()), rtol=0, atol=0)
    x_sliced = torch.randn(6, 400)[:, ::2]
    torch.testing.assert_close(op(x_sliced), op(x_sliced.contiguous()), rtol=0, atol=0)
    x1 = torch.randn(200)  # 1-D x: one row, output (N,)
    assert op(x1).shape == (50,)
    assert_sparse_linear_close(op(x1), (x1, *args[1:]), g)


def test_empty_batch_and_empty_layer():
    args, g = make_case(1, 64, 32, torch.float32, torch.float32, -1, 0.5, "random", True, seed=2)
    _, values, masks, row_offsets, scales, bias = args
    assert sparse_linear(torch.empty(0, 64), values, masks, row_offsets, None, bias, in_features=64).shape == (0, 32)
    assert sparse_linear(torch.empty(2, 0, 64), values, masks, row_offsets, None, None, in_features=64).shape == (
        2,
        0,
        32,
    )
    # K = 0: y is the bias
    empty = reference.sparse_pack(torch.zeros(32, 0))
    y = sparse_linear(torch.empty(3, 0), *empty, None, bias, in_features=0)
    torch.testing.assert_close(y, bias.expand(3, 32), rtol=0, atol=0)


def test_autograd_to_activations():
    args, g = make_case(4, 96, 24, torch.int8, torch.float32, 32, 0.5, "random", True, seed=9)
    x, values, masks, row_offsets, scales, bias = args
    weight = reference.sparse_dequantize(values, masks, row_offsets, scales, 96, 32)

    def run(x, b):
        return sparse_linear(x, values, masks, row_offsets, scales, b, in_features=96, group_size=32)

    assert_gradients_reach_activations(run, x, bias, weight)


def python_autograd_frames(fn) -> list[str]:
    """Names of the functions of torch.library's Python autograd kernel that run during fn()."""
    seen = []

    def record(frame, event, arg):
        path = frame.f_code.co_filename
        if event == "call" and "_library" in path and "autograd" in path:
            seen.append(frame.f_code.co_name)

    sys.setprofile(record)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def test_every_grad_mode_computes_the_same():
    """Grad mode, no_grad and inference_mode give the same result, and only grad mode with a requires-grad x
    records a graph. The autograd kernel is C++ (csrc/frozen_weight_autograd.cpp): none of torch.library's
    Python autograd runs in any mode, which under no_grad (HF generate) saves 4-6 us per call."""
    args, g = make_case(1, 96, 24, torch.int8, torch.float32, -1, 0.5, "random", True, seed=10)
    x = args[0].clone().requires_grad_(True)
    y_grad = sparse_linear(x, *args[1:], in_features=96, group_size=g)
    assert y_grad.grad_fn is not None
    assert python_autograd_frames(lambda: torch.ops.fastquant.sparse_linear(x, *args[1:], 96, g)) == []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y = sparse_linear(x, *args[1:], in_features=96, group_size=g)
            assert y.grad_fn is None
            assert python_autograd_frames(lambda: torch.ops.fastquant.sparse_linear(x, *args[1:], 96, g)) == []
        torch.testing.assert_close(y, y_grad.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(with_vbmi=True), indirect=True)
def test_more_in_features_than_the_fixed_point_path_takes(cpu_isa):
    """Per-channel int8 at M = 1 with K > 65536, where the fixed-point sums could overflow int32: the byte
    kernel runs instead (3 rows: a pair and a single row)."""
    k = 65536 + 40
    args, g = make_case(1, k, 3, torch.int8, torch.float32, -1, 0.5, "random", True, seed=11)
    assert cpu_path(1, 3, k, torch.int8, torch.float32, g) == expected_cpu_path(
        cpu_isa, 1, k, torch.int8, torch.float32, g
    )
    assert_sparse_linear_close(run_op(args, g), args, g)


# The argument list of a 3 x 64 -> 32 int8 call with some arguments replaced.
_bad = replacing(("x", "values", "masks", "row_offsets", "scales", "bias", "k", "g"))


BAD_INPUTS = [
    ("x must be float32, bfloat16 or float16", _bad(x=lambda a: a["x"].to(torch.int32))),
    ("x must be float32, bfloat16 or float16", _bad(x=lambda a: a["x"].double())),
    ("values must be a 1-D float32, bfloat16, float16 or int8 tensor", _bad(values=lambda a: a["values"].double())),
    ("values must be a 1-D float32, bfloat16, float16 or int8 tensor", _bad(values=lambda a: a["values"][None])),
    ("masks must be a 2-D int16 tensor", _bad(masks=lambda a: a["masks"].int())),
    ("masks must be a 2-D int16 tensor", _bad(masks=lambda a: a["masks"][0])),
    (
        r"x has 63 input features \(shape [(\[]3, 63[)\]]\) but in_features is 64",
        _bad(x=lambda a: a["x"][:, :63]),
    ),
    (r"masks has 3 chunks per row but in_features 64 needs ceil\(64 / 16\) = 4", _bad(masks=lambda a: a["m3"])),
    (r"row_offsets must be an int64 tensor of shape \(N \+ 1,\) = \(33,\)", _bad(row_offsets=lambda a: a["ro"][:-1])),
    (r"row_offsets must be an int64 tensor", _bad(row_offsets=lambda a: a["ro"].int())),
    ("values must end with 64 elements of padding", _bad(values=lambda a: a["values"][:10])),
    ("group_size must be -1 .* or a positive multiple of 16, got 24", _bad(g=lambda a: 24)),
    ("group_size must be -1 .* or a positive multiple of 16, got 0", _bad(g=lambda a: 0)),
    ("int8 values need float32 scales, got None", _bad(scales=lambda a: None)),
    ("scales must be float32", _bad(scales=lambda a: a["scales"].half())),
    (r"per-channel scales must have shape \(N,\) = \(32,\)", _bad(scales=lambda a: a["scales"][:31])),
    (r"group-wise scales .* must have shape \(32, 2\)", _bad(g=lambda a: 32)),
    (r"scales must be None for (torch.float32|Float) values", _bad(values=lambda a: a["values"].float())),
    (
        r"bias dtype (torch.float16|Half) must match x dtype (torch.float32|Float)",
        _bad(bias=lambda a: a["bias"].half()),
    ),
    (r"bias must have shape \(32,\)", _bad(bias=lambda a: a["bias"][:5])),
]


def bad_input_base(device: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(32, 64, generator=gen) > 0.5
    mask[0, 63] = True  # so that in_features = 60 with these masks keeps a column past K
    qweight, scales = reference.int8_quantize(random_weight(32, 64, gen) * mask)
    values, masks, row_offsets = reference.sparse_pack(qweight, mask)
    x = torch.randn(3, 64, generator=gen)
    bias = torch.randn(32, generator=gen)
    base = {"x": x, "values": values, "masks": masks, "row_offsets": row_offsets, "scales": scales, "bias": bias}
    base = {key: t.to(device) for key, t in base.items()}
    base.update(k=64, g=-1, m3=base["masks"][:, :3], ro=base["row_offsets"])
    return base


@pytest.mark.parametrize(("message", "make_args"), BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_input_is_named(message, make_args, device):
    """The native kernel and the fake kernel (what torch.compile traces) reject the same input alike."""
    args = make_args(bad_input_base(device))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastquant.sparse_linear(*args)


def _corrupt_offsets(fn):
    def make(a):
        ro = a["row_offsets"].clone()
        fn(ro)
        return ro

    return make


CORRUPT = [
    ("row_offsets\\[0\\] must be 0, got 1", _bad(row_offsets=_corrupt_offsets(lambda ro: ro.add_(1)))),
    (
        "row_offsets must not decrease: row 4 goes from",
        _bad(row_offsets=_corrupt_offsets(lambda ro: ro[5].fill_(int(ro[4]) - 1))),
    ),
    (  # an offset far before values, or far past it: refused before any read (each thread checks its rows)
        "row_offsets must not decrease: row 3 goes from",
        _bad(row_offsets=_corrupt_offsets(lambda ro: ro[4].fill_(-(10**12)))),
    ),
    (
        "row_offsets must not decrease: row 5 goes from",
        _bad(row_offsets=_corrupt_offsets(lambda ro: ro[5].fill_(10**12))),
    ),
    (
        "row 4 keeps .* weights in masks but row_offsets gives it",
        _bad(row_offsets=_corrupt_offsets(lambda ro: ro[5].add_(1))),
    ),
    (  # near the end of values: the M = 1 kernel checks such rows before reading them, others after
        "row 30 keeps .* weights in masks but row_offsets gives it",
        _bad(row_offsets=_corrupt_offsets(lambda ro: ro[31].add_(1))),
    ),
    (
        r"row_offsets\[N\] = \d+ kept weights need values of at least \d+ elements \(64 of padding\)",
        _bad(values=lambda a: a["values"][:-1]),
    ),
    ("masks of row 0 keep columns past in_features \\(60\\)", _bad(x=lambda a: a["x"][:, :60], k=lambda a: 60)),
]


@pytest.mark.parametrize(("message", "make_args"), CORRUPT, ids=[m for m, _ in CORRUPT])
@pytest.mark.parametrize("kernel", ["native", "reference"])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("cpu_isa", available_cpu_isas(with_vbmi=True), indirect=True)
def test_corrupt_offsets_are_rejected(message, make_args, kernel, m, cpu_isa):
    """Offsets or masks that disagree would make a kernel read outside values: they are refused before
    (M = 1, 3 and 17 take different kernels and checks on each ISA)."""
    base = bad_input_base("cpu")
    base["x"] = torch.randn(m, 64, generator=torch.Generator().manual_seed(m))
    # bad_input_base keeps column 63 of row 0 (bit 15 of its last word, a negative int16).
    assert int(base["masks"][0, 3]) < 0
    args = make_args(base)
    with pytest.raises(RuntimeError, match=message):
        call_kernel(torch.ops.fastquant.sparse_linear, kernel, args)


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 32])
@pytest.mark.parametrize("cpu_isa", available_cpu_isas(with_vbmi=True), indirect=True)
def test_corrupt_offsets_of_float_values_are_rejected(values_dtype, m, cpu_isa):
    """Float values, row 4's offset difference one more than its masks keep (row 5's one less): refused on
    every path, the dense-block prefill path (M = 32 on AVX2) included."""
    args, _ = make_case(m, 64, 32, values_dtype, torch.float32, -1, 0.5, "random", False, seed=5)
    row_offsets = args[3].clone()
    row_offsets[5] += 1
    with pytest.raises(RuntimeError, match="row 4 keeps .* weights in masks but row_offsets gives it"):
        run_op((*args[:3], row_offsets, *args[4:]), -1)


def test_mixed_devices_rejected():
    args, g = make_case(3, 64, 32, torch.float32, torch.float32, -1, 0.5, "random", False, seed=1)
    x, values, masks, row_offsets, _, _ = args
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.fastquant.sparse_linear(x, values.to("meta"), masks, row_offsets, None, None, 64, -1)
