"""fastquant.int4_linear: the int4 format and reference (pack, quantize, dequantize), every CPU kernel at every
ISA level vs the reference, opcheck, torch.compile, bad input."""

from __future__ import annotations

import zlib

import pytest
import torch

import fastquant
from fastquant.kernels import reference
from helpers import (
    assert_int4_linear_close,
    available_cpu_isas,
    int4_kernel_path,
    isa_shape_cases,
    random_weight,
    shape_table,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_case(m, k, n, dtype, group_size, symmetric, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    qweight, scales, offsets = reference.int4_quantize(random_weight(n, k, gen), group_size, symmetric)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    return x, qweight, scales, offsets, bias


# ---------------------------------------------------------------- the format and the reference


@pytest.mark.parametrize("k", [1, 32, 63, 64, 65, 96, 1025])
def test_pack_unpack_round_trip(k):
    gen = torch.Generator().manual_seed(k)
    codes = torch.randint(0, 16, (17, k), generator=gen, dtype=torch.uint8)
    qweight = reference.int4_pack(codes)
    assert qweight.dtype == torch.uint8 and tuple(qweight.shape) == (17, -(-k // 64) * 32)
    assert torch.equal(reference.int4_unpack(qweight, k), codes)
    # Padding codes past K are 0: unpacking the whole last block shows them.
    padded = reference.int4_unpack(qweight, qweight.shape[1] * 2)
    assert bool((padded[:, k:] == 0).all())


def test_pack_layout():
    """Byte j of block b: code(64b + j) in the low nibble, code(64b + 32 + j) in the high nibble."""
    k = 128
    codes = (torch.arange(k) * 7 % 16).to(torch.uint8)[None]
    qweight = reference.int4_pack(codes)[0]
    for b in range(2):
        for j in range(32):
            byte = int(qweight[32 * b + j])
            assert byte & 0xF == int(codes[0, 64 * b + j])
            assert byte >> 4 == int(codes[0, 64 * b + 32 + j])


def test_symmetric_grid_exact_values():
    """Q4_0: d = m / -8 for m the signed value of largest magnitude; m maps to code 0, q = round(w / d) + 8."""
    group = torch.zeros(32)
    group[:6] = torch.tensor([-4.0, 3.5, 1.0, -0.74, 0.26, 4.0])  # -4 comes first among |w| = 4
    qweight, scales, offsets = reference.int4_quantize(group[None], 32, symmetric=True)
    assert offsets is None and scales.dtype == torch.float16 and tuple(scales.shape) == (1, 1)
    assert float(scales) == 0.5
    codes = reference.int4_unpack(qweight, 32)[0]
    # -4/0.5 = -8 -> 0; 3.5 -> 15; 1 -> 10; -0.74 -> round(-1.48) + 8 = 7; 0.26 -> round(0.52) + 8 = 9;
    # 4 -> round(8) + 8 = 16 clamped to 15; zeros -> 8.
    assert codes[:6].tolist() == [0, 15, 10, 7, 9, 15]
    assert bool((codes[6:] == 8).all())
    positive = reference.int4_quantize(-group[None], 32, symmetric=True)
    assert float(positive[1]) == -0.5  # m = +4: a negative step, so +4 is code 0 again
    assert reference.int4_unpack(positive[0], 32)[0, :3].tolist() == [0, 15, 10]


def test_asymmetric_grid_exact_values():
    """Q4_1: d = (max - min) / 15, offset = min, q = round((w - min) / d)."""
    group = torch.linspace(-1.0, 14.0, 32)
    group[5] = 2.3
    group[6] = 2.6
    qweight, scales, offsets = reference.int4_quantize(group[None], 32, symmetric=False)
    assert float(scales) == 1.0 and float(offsets) == -1.0
    codes = reference.int4_unpack(qweight, 32)[0]
    assert int(codes[0]) == 0 and int(codes[31]) == 15
    assert int(codes[5]) == 3 and int(codes[6]) == 4  # 3.3 -> 3, 3.6 -> 4


def test_codes_use_the_stored_fp16_scale():
    """A step that fp16 rounds: codes are the nearest points of the stored grid, so dequantize(quantize(w))
    is within half a stored step of w (what the kernels compute is exactly the stored grid)."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(64, 1000, generator=gen) / 3
    for symmetric in (True, False):
        qweight, scales, offsets = reference.int4_quantize(weight, 64, symmetric)
        dequantized = reference.int4_dequantize(qweight, scales, offsets, 1000, 64)
        step = reference.expand_group_scales(scales.float().abs(), 1000, 64)
        inside = torch.ones_like(weight, dtype=torch.bool)  # asymmetric: every w lies in [min, max] of its group
        if symmetric:  # w/d beyond 7.5 (past +7d, the far side of the grid from m) is clamped
            inside = (weight / reference.expand_group_scales(scales.float(), 1000, 64)) <= 7.5
        err = (dequantized - weight).abs()
        assert bool((err[inside] <= step[inside] / 2 * (1 + 2**-10) + 1e-6).all())
        assert bool((err <= step * 8).all())


def test_zero_and_constant_groups():
    weight = torch.zeros(3, 96)
    weight[1] = 0.75  # constant: asymmetric gives step 0 and offset 0.75
    weight[2, :32] = 1e-9  # below fp16's range: the step rounds to 0
    for symmetric in (True, False):
        qweight, scales, offsets = reference.int4_quantize(weight, 32, symmetric)
        dequantized = reference.int4_dequantize(qweight, scales, offsets, 96, 32)
        assert bool(torch.isfinite(dequantized).all())
        assert bool((dequantized[0] == 0).all()) and bool((dequantized[2] == 0).all())
        if not symmetric:
            assert bool((dequantized[1] == 0.75).all())
        else:
            assert torch.allclose(dequantized[1], weight[1], rtol=0.08, atol=0)


@pytest.mark.parametrize(("k", "group_size"), [(32, 32), (96, 64), (1025, 32), (1025, 128), (100, 256)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_is_the_format(k, group_size, symmetric):
    """int4_dequantize spelled out element by element from the format's definition."""
    gen = torch.Generator().manual_seed(k + group_size)
    qweight, scales, offsets = reference.int4_quantize(random_weight(5, k, gen), group_size, symmetric)
    codes = reference.int4_unpack(qweight, k).float()
    group = torch.arange(k) // group_size
    s = scales.float()[:, group]
    expected = s * (codes - 8) if symmetric else s * codes + offsets.float()[:, group]
    assert torch.equal(reference.int4_dequantize(qweight, scales, offsets, k, group_size), expected)


@pytest.mark.parametrize("n", [1, 17, 1025])
@pytest.mark.parametrize(("k", "group_size"), [(32, 32), (96, 64), (1025, 32), (1025, 128)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_reference_linear(n, k, group_size, symmetric):
    """The reference itself against float64: fp32 accumulation error only (the same rule as the kernels')."""
    seed = zlib.crc32(repr((n, k, group_size, symmetric)).encode())
    x, qweight, scales, offsets, bias = make_case(3, k, n, torch.float32, group_size, symmetric, True, seed)
    y = reference.int4_linear(x, qweight, scales, offsets, bias, k, group_size)
    w = reference.int4_dequantize(qweight, scales, offsets, k, group_size).double()
    expected = x.double() @ w.T + bias.double()
    scale = ((x.double() ** 2) @ (w**2).T).sqrt()
    assert y.shape == (3, n)
    assert bool(((y.double() - expected).abs() <= 2**-18 * k**0.5 * scale + 2**-23 * expected.abs()).all())


# ---------------------------------------------------------------- the op (native kernels where built)


# (M, K, N): decode (M <= 8 takes cpu_avx2_fixed16; 2 <= M <= 16 cpu_avx512_vnni_fixed16 on AVX-512, in tiles of
# 4 rows of x and passes of 4 output columns) and prefill rows around the 6-row micro-kernel, K of one group, of
# a partial 64-column block and not a multiple of any group (ragged last group), N of 1, 17 (not a multiple of
# the 16-row tile, the 8-column grain or the 4-column pass) and 1025; K = 576 (SmolLM2's, 18 groups of 32:
# cpu_avx2_fixed16's last 8-group load is 2 valid and 6 masked).
SHAPES = shape_table(
    """
    1x32x1 1x576x17 1x1025x1025 3x96x17 3x32x1025 8x1025x17 9x96x17 9x1025x1025 9x1536x17
    16x1025x17 16x4000x1 17x1025x17 64x96x1 64x1025x1025 512x1025x17 1x4096x17
    """
)
# The scalar kernel is the non-x86 fallback: it gets the small cases, the vector kernels all of them.
PORTABLE_SHAPES = [(1, 32, 1), (3, 96, 17), (17, 1025, 17)]


def cpu_path(m, n, k, group_size, dtype=torch.float32) -> str:
    return int4_kernel_path(torch.device("cpu"), m, n, k, group_size, dtype)


def expected_path(cpu_isa: str, m: int, k: int, group_size: int, dtype: torch.dtype = torch.float32) -> str:
    """The kernel choice, spelled out: AVX-512 (VNNI) levels decode M = 2..16 with cpu_avx512_vnni_fixed16 and
    M = 1 with cpu_avx2_fixed16, and prefill with cpu_avx512_bf16 where int8_linear's
    bf16 kernel takes the group size (32, 64, 128, a multiple of 256, or one group over K) and x may be rounded
    to bf16 (fp32 x only under torch's "medium" float32 matmul precision); AVX2 decodes M <= 8 with
    cpu_avx2_fixed16; other M on both runs the AVX2 tiled kernel."""
    if cpu_isa == "portable":
        return "cpu_portable"
    if cpu_isa.startswith("avx512") and m > 16:
        bf16_groups = group_size >= k or 256 % group_size == 0 or group_size % 256 == 0
        bf16_x = dtype != torch.float32 or torch.get_float32_matmul_precision() == "medium"
        return "cpu_avx512_bf16" if bf16_groups and bf16_x else "cpu_avx2_tiled_fp32"
    if cpu_isa.startswith("avx512") and m >= 2:
        return "cpu_avx512_vnni_fixed16"
    return "cpu_avx2_fixed16" if m <= 8 else "cpu_avx2_tiled_fp32"


@pytest.mark.parametrize(("cpu_isa", "shape"), isa_shape_cases(SHAPES, PORTABLE_SHAPES), indirect=["cpu_isa"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_matches_reference(cpu_isa, shape, dtype, group_size, symmetric):
    m, k, n = shape
    seed = zlib.crc32(repr((shape, group_size, dtype, symmetric, cpu_isa)).encode())
    x, qweight, scales, offsets, bias = make_case(m, k, n, dtype, group_size, symmetric, seed % 2 == 0, seed)
    path = cpu_path(m, n, k, group_size, dtype)
    assert path == expected_path(cpu_isa, m, k, group_size, dtype)
    y = fastquant.int4_linear(x, qweight, scales, offsets, bias, in_features=k, group_size=group_size)
    assert_int4_linear_close(y, x, qweight, scales, offsets, bias, k, group_size, path)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_fp32_prefill_follows_torch_precision(cpu_isa, precision):
    """fp32 x is rounded to bf16 at prefill only where torch's float32 matmul precision allows it ("medium")."""
    m, k, n = 40, 256, 24
    x, qweight, scales, offsets, bias = make_case(m, k, n, torch.float32, 32, True, True, 11)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        path = cpu_path(m, n, k, 32)
        assert path == expected_path(cpu_isa, m, k, 32)
        y = fastquant.int4_linear(x, qweight, scales, offsets, bias, in_features=k, group_size=32)
    finally:
        torch.set_float32_matmul_precision(before)
    assert_int4_linear_close(y, x, qweight, scales, offsets, bias, k, 32, path)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 15, 16, 17])
def test_every_row_count(cpu_isa, m):
    """Row counts around the decode/prefill switches (8 on AVX2, 16 on AVX-512), the 4-row tiles of
    cpu_avx512_vnni_fixed16 and the micro-kernel's 6-row edges; groups of 96 (a multiple of 32 but not of 64:
    groups start in the middle of a 64-column block); N = 67, passes of 4 columns and 3 left over."""
    k, n = (200, 20) if cpu_isa == "portable" else (1650, 67)
    for dtype in DTYPES:
        for symmetric in (True, False):
            x, qweight, scales, offsets, bias = make_case(m, k, n, dtype, 96, symmetric, True, seed=m)
            y = fastquant.int4_linear(x, qweight, scales, offsets, bias, in_features=k, group_size=96)
            assert_int4_linear_close(y, x, qweight, scales, offsets, bias, k, 96, cpu_path(m, n, k, 96, dtype))


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 3])
def test_row_with_nan_scale_stays_in_its_row(cpu_isa, m):
    """A NaN scale makes its own output column NaN, as in the reference, and no other: the decode kernel
    loads a row's last groups 8 at a time, reading the next row's scales into lanes it then masks."""
    k, n = 576, 9
    x, qweight, scales, offsets, bias = make_case(m, k, n, torch.float32, 32, True, False, seed=5)
    scales[4, 0] = float("nan")
    y = fastquant.int4_linear(x, qweight, scales, in_features=k, group_size=32)
    assert bool(y[:, 4].isnan().all())
    others = [c for c in range(n) if c != 4]
    assert bool(y[:, others].isfinite().all())
    assert_int4_linear_close(y[:, others], x, qweight[others], scales[others], None, None, k, 32, cpu_path(m, n, k, 32))


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("group_size", [32, 256, 4096])
@pytest.mark.parametrize("m", [1, 4])
def test_fixed_point_sums_at_their_largest(cpu_isa, group_size, m):
    """Constant x (every element at the largest fixed-point magnitude, X = 32512) against weights on the grid's
    extremes: each group starts with -1 (m = -1, d = 1/8: code 0) and continues with +7/8 (code 15), so every
    vpmaddubsw pair and int32 lane is at its largest. Row 1 is negated, row 2 alternates +-7/8 and row 3 has
    zeros (code 8); rows of x alternate +3 and -3 (X = -32512). Every weight is exact, so the result is exact
    up to fp32 rounding."""
    k = 4096
    weight = torch.full((4, k), 0.875)
    weight[2, 1::2] = -0.875
    weight[3, ::3] = 0.0
    weight[:, ::group_size] = -1.0
    weight[1] = -weight[1]
    qweight, scales, offsets = reference.int4_quantize(weight, group_size)
    assert torch.equal(reference.int4_dequantize(qweight, scales, offsets, k, group_size), weight)
    assert int(reference.int4_unpack(qweight, k)[0, 1:group_size].min()) == 15
    x = torch.full((m, k), 3.0)
    x[1::2] = -3.0
    y = fastquant.int4_linear(x, qweight, scales, offsets, None, in_features=k, group_size=group_size)
    torch.testing.assert_close(y.double(), x.double() @ weight.double().T, rtol=1e-6, atol=0)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 3, 16, 17])
@pytest.mark.parametrize("special", [30.0, 1e5, 1e30, float("inf"), float("-inf"), float("nan"), 0.0])
@pytest.mark.parametrize("precision", ["highest", "medium"])  # "medium": M = 17 on the AVX-512 bf16 prefill path
def test_outliers_and_non_finite_x(cpu_isa, m, special, precision):
    """One element of x `special` times the others' mean magnitude: the fixed-point kernel rounds each 32-column
    block on its own scale (an outlier costs only its block), NaN and +-inf take the fp32 kernel and come out
    where the reference puts them; x = 0 gives the bias exactly."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        _check_outlier(m, special)
    finally:
        torch.set_float32_matmul_precision(before)


def _check_outlier(m, special):
    k, n = 1000, 67
    seed = zlib.crc32(repr((special, m)).encode())
    x, qweight, scales, offsets, bias = make_case(m, k, n, torch.float32, 32, True, True, seed=seed)

    def run(x):
        return fastquant.int4_linear(x, qweight, scales, offsets, bias, in_features=k, group_size=32)

    if special == 0.0:
        torch.testing.assert_close(run(torch.zeros_like(x)), bias.expand(m, n), rtol=0, atol=0)
        return
    x[0, 123] = special * x.abs().mean()
    y = run(x)
    y_ref = reference.int4_linear(x, qweight, scales, offsets, bias, k, 32)
    if torch.isfinite(y_ref).all():
        assert_int4_linear_close(y, x, qweight, scales, offsets, bias, k, 32, cpu_path(m, n, k, 32))
    else:  # non-finite where the reference is, the other rows as close as ever
        assert torch.equal(y[0].isnan(), y_ref[0].isnan()) and torch.equal(y[0].isinf(), y_ref[0].isinf())
        torch.testing.assert_close(y[0], y_ref[0], equal_nan=True, rtol=1e-5, atol=0)
        if m > 1:
            assert_int4_linear_close(y[1:], x[1:], qweight, scales, offsets, bias, k, 32, cpu_path(m, n, k, 32))


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
def test_fp16_partial_sums_do_not_overflow(cpu_isa):
    """Partial sums reach 3e5, past fp16's 65504, and cancel to a small result: fp32 accumulation."""
    k = 512
    x = torch.full((2, k), 100.0, dtype=torch.float16)
    weight = torch.cat([torch.full((4, k // 2), 6.0), torch.full((4, k // 2), -6.0)], dim=1)
    weight[:, 0] += 0.75
    qweight, scales, offsets = reference.int4_quantize(weight, 32, symmetric=False)
    y = fastquant.int4_linear(x, qweight, scales, offsets, None, in_features=k, group_size=32)
    assert torch.isfinite(y).all()
    assert_int4_linear_close(y, x, qweight, scales, offsets, None, k, 32, cpu_path(2, 4, k, 32, torch.float16))


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 5, 17])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_opcheck(cpu_isa, m, symmetric):
    x, qweight, scales, offsets, bias = make_case(m, 300, 40, torch.bfloat16, 64, symmetric, True, seed=7)
    op = torch.ops.fastquant.int4_linear.default
    torch.library.opcheck(op, (x, qweight, scales, offsets, bias, 300, 64))
    torch.library.opcheck(op, (x.float(), qweight, scales, offsets, None, 300, 64))


def test_reference_kernel_opcheck():
    """The pure-PyTorch fallback is a registered kernel too (it runs on devices without a native one)."""
    x, qweight, scales, offsets, bias = make_case(3, 100, 20, torch.float32, 32, False, True, seed=3)
    y = torch.ops.fastquant.int4_linear.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd),
        x,
        qweight,
        scales,
        offsets,
        bias,
        100,
        32,
    )
    torch.testing.assert_close(y, reference.int4_linear(x, qweight, scales, offsets, bias, 100, 32), rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_torch_compile_fullgraph(symmetric):
    x, qweight, scales, offsets, bias = make_case(4, 1025, 300, torch.bfloat16, 128, symmetric, True, seed=11)

    def f(x):
        y = fastquant.int4_linear(x, qweight, scales, offsets, bias, in_features=1025, group_size=128)
        return torch.nn.functional.gelu(y) * 2

    compiled = torch.compile(f, fullgraph=True)
    # Inductor fuses gelu and the product in fp32 without rounding in between: bf16 tolerance, not equality.
    torch.testing.assert_close(compiled(x), f(x))
    # New batch sizes (decode and prefill kernels) retrace or run dynamic: both must agree.
    for rows in (9, 20):
        x2 = torch.randn(rows, 1025).bfloat16()
        torch.testing.assert_close(compiled(x2), f(x2))


def test_reference_compiles_fullgraph():
    """The reference has data-independent shapes: inductor compiles it whole (the fallback under compile)."""
    x, qweight, scales, offsets, bias = make_case(2, 200, 30, torch.float32, 64, False, True, seed=4)
    compiled = torch.compile(reference.int4_linear, fullgraph=True)
    torch.testing.assert_close(
        compiled(x, qweight, scales, offsets, bias, 200, 64),
        reference.int4_linear(x, qweight, scales, offsets, bias, 200, 64),
    )


@pytest.mark.parametrize("rows", [1, 6])
def test_non_contiguous_and_batched_input(rows):
    x, qweight, scales, offsets, bias = make_case(6, 200, 50, torch.float32, 32, True, True, seed=5)
    x3 = torch.randn(200, rows, 4).permute(1, 2, 0)  # (rows, 4, 200) with K not the innermost stride
    assert not x3.is_contiguous()

    def run(x):
        return fastquant.int4_linear(x, qweight, scales, offsets, bias, in_features=200, group_size=32)

    y = run(x3)
    assert y.shape == (rows, 4, 50)
    torch.testing.assert_close(y, run(x3.contiguous()), rtol=0, atol=0)
    x_sliced = torch.randn(rows, 400)[:, ::2]
    torch.testing.assert_close(run(x_sliced), run(x_sliced.contiguous()), rtol=0, atol=0)


def test_empty_batch_and_empty_k():
    _, qweight, scales, offsets, bias = make_case(1, 64, 32, torch.float32, 32, True, True, seed=2)
    y = fastquant.int4_linear(torch.empty(0, 64), qweight, scales, offsets, bias, in_features=64, group_size=32)
    assert y.shape == (0, 32)
    y = fastquant.int4_linear(torch.empty(2, 0, 64), qweight, scales, offsets, bias, in_features=64, group_size=32)
    assert y.shape == (2, 0, 32)
    # K = 0: no weights, y is the bias.
    y = fastquant.int4_linear(
        torch.empty(3, 0),
        torch.empty(32, 0, dtype=torch.uint8),
        torch.empty(32, 0, dtype=torch.float16),
        None,
        bias,
        in_features=0,
        group_size=32,
    )
    torch.testing.assert_close(y, bias.expand(3, 32), rtol=0, atol=0)


def test_autograd_to_activations():
    """Gradients reach x and bias (the int4 weight is frozen): d(sum y^2)/dx = 2y @ W, d/dbias = sum of 2y."""
    x, qweight, scales, offsets, bias = make_case(4, 96, 24, torch.float32, 32, False, True, seed=9)
    x.requires_grad_(True)
    bias.requires_grad_(True)
    y = fastquant.int4_linear(x, qweight, scales, offsets, bias, in_features=96, group_size=32)
    y.square().sum().backward()
    grad_y = 2 * y.detach()
    weight = reference.int4_dequantize(qweight, scales, offsets, 96, 32)
    torch.testing.assert_close(x.grad, grad_y @ weight)
    torch.testing.assert_close(bias.grad, grad_y.sum(0))


# (message, args from the valid (x, qweight, scales, offsets, bias) of a (3, 96) x (32, 96) problem, group 32)
BAD_INPUTS = [
    ("x must be float32, bfloat16 or float16", lambda x, q, s, o, b: (x.double(), q, s, o, None, 96, 32)),
    ("x must be float32, bfloat16 or float16", lambda x, q, s, o, b: (x.to(torch.int32), q, s, o, None, 96, 32)),
    ("qweight must be a 2-D uint8 tensor", lambda x, q, s, o, b: (x, q.to(torch.int8), s, o, None, 96, 32)),
    ("qweight must be a 2-D uint8 tensor", lambda x, q, s, o, b: (x, q[0], s, o, None, 96, 32)),
    (
        r"qweight has 32 bytes per row but in_features 96 needs ceil\(96 / 64\) \* 32 = 64",
        lambda x, q, s, o, b: (x, q[:, :32], s, o, None, 96, 32),
    ),
    (
        r"x has 95 input features \(shape [(\[]3, 95[)\]]\) but in_features is 96",
        lambda x, q, s, o, b: (x[:, :95], q, s, o, None, 96, 32),
    ),
    ("in_features must be >= 0", lambda x, q, s, o, b: (x, q, s, o, None, -1, 32)),
    ("group_size must be a positive multiple of 32, got 48", lambda x, q, s, o, b: (x, q, s, o, None, 96, 48)),
    ("group_size must be a positive multiple of 32, got 0", lambda x, q, s, o, b: (x, q, s, o, None, 96, 0)),
    ("group_size must be a positive multiple of 32, got -1", lambda x, q, s, o, b: (x, q, s, o, None, 96, -1)),
    ("scales must be float16", lambda x, q, s, o, b: (x, q, s.float(), o, None, 96, 32)),
    (
        r"scales for N = 32, in_features 96 and group_size 32 must have shape \(32, 3\), got [(\[]32, 2[)\]]",
        lambda x, q, s, o, b: (x, q, s[:, :2], o, None, 96, 32),
    ),
    (r"scales .* must have shape \(32, 2\)", lambda x, q, s, o, b: (x, q, s, o, None, 96, 64)),
    ("offsets must be float16", lambda x, q, s, o, b: (x, q, s, o.bfloat16(), None, 96, 32)),
    (r"offsets .* must have shape \(32, 3\)", lambda x, q, s, o, b: (x, q, s, o[:31], None, 96, 32)),
    (
        r"bias dtype (torch.float16|Half) must match x dtype (torch.float32|Float)",
        lambda x, q, s, o, b: (x, q, s, o, b.half(), 96, 32),
    ),
    (r"bias must have shape \(32,\)", lambda x, q, s, o, b: (x, q, s, o, b[:5], 96, 32)),
]


@pytest.mark.parametrize(("message", "make_args"), BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_input_is_named(message, make_args, device):
    """The native kernel and the fake kernel (what torch.compile traces) reject the same input alike."""
    x, qweight, scales, offsets, bias = make_case(3, 96, 32, torch.float32, 32, False, True, seed=1)
    args = make_args(x, qweight, scales, offsets, bias)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastquant.int4_linear(*args)


def test_mixed_devices_rejected():
    x, qweight, scales, _, _ = make_case(3, 64, 32, torch.float32, 32, True, False, seed=1)
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.fastquant.int4_linear(x, qweight.to("meta"), scales, None, None, 64, 32)


def test_quantize_rejects_bad_group_size():
    with pytest.raises(ValueError, match="multiple of 32"):
        reference.int4_quantize(torch.randn(4, 64), 48)


def test_info_reports_the_int4_kernels():
    from fastquant.app.info import info_lines

    lines = [line for line in info_lines() if line.startswith("int4_linear cpu")]
    assert [line.split(": ")[1] for line in lines] == [cpu_path(m, 4096, 4096, 32) for m in (1, 16, 512)]
    (line,) = [line for line in info_lines() if line.startswith("int4_linear (int8 activations) cpu")]
    assert line.split(": ")[1] == int4_kernel_path(torch.device("cpu"), 1, 4096, 4096, 32, torch.float32, True)


# ---------------------------------------------------------------- int8_activations (x rounded to int8 per 32 columns)


def expected_int8x_path(cpu_isa: str, m: int, k: int, group_size: int, dtype: torch.dtype) -> str:
    """cpu_avx2_int8x takes the rows cpu_avx2_fixed16 would; every other path runs on the glue's x~."""
    path = expected_path(cpu_isa, m, k, group_size, dtype)
    return "cpu_avx2_int8x" if path == "cpu_avx2_fixed16" else path


@pytest.mark.parametrize("k", [1, 17, 32, 33, 1025])
def test_int8_activation_round_is_llama_cpp_q8_0(k):
    """Per 32-column block: X = round(x * 127 / m) an integer in [-127, 127] with the block's largest magnitude
    at +-127, x~ = X * m / 127, |x~ - x| <= m / 254; the shape and leading dimensions are kept."""
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(k)) * torch.logspace(-3, 3, 3).view(1, 3, 1)
    rounded = reference.int8_activation_round(x)
    assert rounded.shape == x.shape and rounded.dtype == torch.float32
    padded = torch.nn.functional.pad(x, (0, -k % 32)).unflatten(-1, (-1, 32))
    m = padded.abs().amax(-1, keepdim=True)
    codes = torch.nn.functional.pad(rounded, (0, -k % 32)).unflatten(-1, (-1, 32)) / (m / 127)
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert float(codes.abs().max()) <= 127 + 1e-4
    torch.testing.assert_close(codes.abs().amax(-1), torch.full(m.shape[:-1], 127.0), rtol=0, atol=1e-4)
    err = (rounded - x).abs()
    # Half a step, plus the fp32 roundings of x * (127 / m) and X * (m / 127) (a few ulps of m).
    assert bool((err <= (m.squeeze(-1) / 254).repeat_interleave(32, -1)[..., :k] * (1 + 2**-16)).all())


def test_int8_activation_round_ties_and_tiny_blocks():
    """Ties round half to even (as the kernels' conversion); a block below 2^-100 becomes 0, others keep their
    own scale."""
    x = torch.zeros(1, 96)
    x[0, :4] = torch.tensor([127.0, 2.5, 3.5, -0.5])  # m = 127: x * 127 / m = x
    x[0, 32:64] = 2.0**-110  # a tiny block
    x[0, 64] = -1.0
    rounded = reference.int8_activation_round(x)
    assert rounded[0, :4].tolist() == [127.0, 2.0, 4.0, -0.0]
    assert bool((rounded[0, 32:64] == 0).all())
    assert rounded[0, 64].item() == -1.0


@pytest.mark.parametrize(("cpu_isa", "shape"), isa_shape_cases(SHAPES, PORTABLE_SHAPES), indirect=["cpu_isa"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# 96: groups that start in the high half of a 64-column block (cpu_avx2_int8x's odd-block edges).
@pytest.mark.parametrize("group_size", [32, 96, 128])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int8_activations_match_reference(cpu_isa, shape, dtype, group_size, symmetric):
    m, k, n = shape
    seed = zlib.crc32(repr((shape, group_size, dtype, symmetric, cpu_isa, "x8")).encode())
    x, qweight, scales, offsets, bias = make_case(m, k, n, dtype, group_size, symmetric, seed % 2 == 0, seed)
    path = int4_kernel_path(torch.device("cpu"), m, n, k, group_size, dtype, True)
    assert path == expected_int8x_path(cpu_isa, m, k, group_size, dtype)
    y = fastquant.int4_linear(
        x, qweight, scales, offsets, bias, in_features=k, group_size=group_size, int8_activations=True
    )
    assert_int4_linear_close(y, x, qweight, scales, offsets, bias, k, group_size, path, int8_activations=True)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 2, 8, 9, 17])
def test_int8_activations_round_x_as_the_reference(cpu_isa, m):
    """With an identity weight (asymmetric, scale 1, offset 0, code 1 on the diagonal and 0 elsewhere: no
    zero-point term) each output is one product x~ * 1, exact in fp32: the kernel's x~ is the reference's bit
    for bit, ties, tiny blocks and the ragged last block included."""
    k = 100
    codes = torch.eye(k, dtype=torch.uint8)
    scales = torch.ones(k, -(-k // 32), dtype=torch.float16)
    offsets = torch.zeros_like(scales)
    qweight = reference.int4_pack(codes)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 10
    x[0, :3] = torch.tensor([127.0, 2.5, -3.5])
    x[0, 3:32] = torch.linspace(-1, 1, 29)  # m = 127: x * 127 / m = x, ties at 2.5 and -3.5
    x[-1, 32:64] = 2.0**-110
    y = fastquant.int4_linear(x, qweight, scales, offsets, None, in_features=k, group_size=32, int8_activations=True)
    assert torch.equal(y, reference.int8_activation_round(x))
    assert y[0, 1].item() == 2.0 and y[0, 2].item() == -4.0


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("special", [float("inf"), float("nan")])
def test_int8_activations_leave_non_finite_x_as_it_is(cpu_isa, m, special):
    """x with NaN or inf is not rounded (a NaN step would spoil its whole block): NaN and inf come out where the
    float product puts them, as in the reference."""
    k, n = 200, 33
    x, qweight, scales, offsets, bias = make_case(m, k, n, torch.float32, 32, True, True, seed=4)
    x[0, 7] = special
    y = fastquant.int4_linear(x, qweight, scales, offsets, bias, in_features=k, group_size=32, int8_activations=True)
    y_ref = reference.int4_linear(x, qweight, scales, offsets, bias, k, 32, True)
    unrounded = reference.int4_linear(x, qweight, scales, offsets, bias, k, 32)
    torch.testing.assert_close(y_ref, unrounded, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(y.isinf(), y_ref.isinf())
    torch.testing.assert_close(y, y_ref, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 17])
def test_int8_activations_opcheck(cpu_isa, m):
    x, qweight, scales, offsets, bias = make_case(m, 300, 40, torch.bfloat16, 64, False, True, seed=9)
    op = torch.ops.fastquant.int4_linear.default
    torch.library.opcheck(op, (x, qweight, scales, offsets, bias, 300, 64, True))
    torch.library.opcheck(op, (x.float(), qweight, scales, None, None, 300, 64, True))


def test_int8_activations_compile_fullgraph():
    x, qweight, scales, offsets, bias = make_case(1, 1025, 300, torch.float32, 32, True, True, seed=12)

    def f(x):
        y = fastquant.int4_linear(x, qweight, scales, offsets, bias, in_features=1025, int8_activations=True)
        return torch.relu(y)

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=1e-6, atol=1e-5)
    x2 = torch.randn(20, 1025)
    torch.testing.assert_close(compiled(x2), f(x2), rtol=1e-6, atol=1e-5)
