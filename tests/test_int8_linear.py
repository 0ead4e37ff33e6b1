"""fastquant.int8_linear on the CPU: every ISA path vs the reference, opcheck, compile, bad input."""

from __future__ import annotations

import zlib

import pytest
import torch

import fastquant
from fastquant.kernels import extension, reference
from helpers import (
    assert_gradients_reach_activations,
    assert_int8_linear_close,
    available_cpu_isas,
    fp16_cancelling_case,
    isa_shape_cases,
    random_weight,
    signed_ones_weight,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GROUP_SIZES = [-1, 32, 64, 128, 256]
# (M, K, N): decode and prefill row counts, K not a multiple of any group size (ragged last group),
# N not a multiple of any vector width, and one square 4096 layer.
SHAPES = [(1, 17, 3), (3, 1000, 17), (17, 1025, 1000), (64, 4096, 257), (513, 1025, 100), (1, 4096, 4096)]
# The scalar kernel is the non-x86 fallback: it gets the small cases, the vector kernels all of them.
PORTABLE_SHAPES = SHAPES[:3]


def make_case(m, k, n, dtype, group_size, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    qweight, scales = reference.int8_quantize(random_weight(n, k, gen), group_size)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    return x, qweight, scales, bias


def cpu_path(m, n, k, group_size, dtype) -> str:
    return extension.int8_linear_kernel_path(torch.device("cpu"), m, n, k, group_size, dtype)


@pytest.mark.parametrize(("cpu_isa", "shape"), isa_shape_cases(SHAPES, PORTABLE_SHAPES), indirect=["cpu_isa"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_matches_reference(cpu_isa, shape, dtype, group_size):
    m, k, n = shape
    seed = zlib.crc32(repr((shape, group_size, dtype, cpu_isa)).encode())
    x, qweight, scales, bias = make_case(m, k, n, dtype, group_size, with_bias=seed % 2 == 0, seed=seed)
    path = cpu_path(m, n, k, group_size, dtype)
    assert path.startswith("cpu_") and cpu_isa in path
    y = fastquant.int8_linear(x, qweight, scales, bias, group_size)
    assert_int8_linear_close(y, x, qweight, scales, bias, group_size, path)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 8, 16, 17, 33, 128, 512])
def test_every_row_count(cpu_isa, m):
    """Row counts around every decode/prefill switch point and tile edge."""
    k, n = (256, 48) if cpu_isa == "portable" else (576, 1536)
    for dtype in DTYPES:
        x, qweight, scales, bias = make_case(m, k, n, dtype, 64, with_bias=True, seed=m)
        y = fastquant.int8_linear(x, qweight, scales, bias, 64)
        assert_int8_linear_close(y, x, qweight, scales, bias, 64, cpu_path(m, n, k, 64, dtype))


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
def test_fp16_partial_sums_do_not_overflow(cpu_isa):
    """Partial sums reach 4e5, past fp16's 65504, and cancel to a small result: fp32 accumulation."""
    x, weight = fp16_cancelling_case()
    k = x.shape[1]
    qweight, scales = reference.int8_quantize(weight, -1)
    y = fastquant.int8_linear(x, qweight, scales, None, -1)
    assert torch.isfinite(y).all()
    assert_int8_linear_close(y, x, qweight, scales, None, -1, cpu_path(2, 4, k, -1, torch.float16))


def m1_path(cpu_isa: str, k: int, group_size: int) -> str:
    """The kernel int8_linear runs at M = 1 on this ISA level (for x that fixed point takes)."""
    group = k if group_size == -1 else min(group_size, k)
    if cpu_isa == "avx512" and 2048 < k <= 65536 and (group == k or group % 64 == 0):
        return "cpu_avx512_vnni_fixed"
    return f"cpu_{cpu_isa}_fp32" if cpu_isa != "portable" else "cpu_portable"


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("group_size", [-1, 32, 64, 4096])
def test_fixed_point_sums_at_their_largest(cpu_isa, group_size):
    """M = 1 with K = 65536 (the largest K of cpu_avx512_vnni_fixed) of codes +-127 times a constant x, the
    largest fixed-point magnitude (X = 2^31 - 1: bytes 255, 255, 255, 127) in every column: each byte plane's
    int32 sum reaches 255 * 127 * 65536 and must not wrap. Row 2 alternates signs and cancels to exactly 0;
    row 3 has zeros. Groups of 4096 flush 16 times per row, groups of 32 take the fp32 kernel.
    A wrapped sum would be off by 2^32 steps, far outside the bound."""
    k = 65536
    weight = signed_ones_weight(5, k)
    qweight, scales = reference.int8_quantize(weight, group_size)
    x = torch.full((1, k), 3.0)
    assert cpu_path(1, 5, k, group_size, torch.float32) == m1_path(cpu_isa, k, group_size)
    y = fastquant.int8_linear(x, qweight, scales, None, group_size)
    expected = torch.tensor([3.0 * k, -3.0 * k, 0.0])
    if "fixed" in m1_path(cpu_isa, k, group_size):
        torch.testing.assert_close(y[0, :3], expected, rtol=1e-6, atol=0)
        assert_int8_linear_close(y, x, qweight, scales, None, group_size, "cpu_avx512_vnni_fixed")
    else:  # fp32 sums of 65536 equal terms drift by up to ~1e-3 (biased rounding of each addition)
        torch.testing.assert_close(y[0, :3], expected, rtol=2e-3, atol=1.0)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("special", [30.0, 1000.0, 1e5, 1e30, float("inf"), float("nan"), 0.0])
def test_m1_outliers_and_non_finite_x(cpu_isa, group_size, special):
    """x at M = 1 with one element `special` times the others' mean magnitude: fixed point takes x up to 1024x,
    the fp32 kernel the rest, and NaN/inf propagate as in the reference; x = 0 gives the bias exactly."""
    k, n = 3000, 67  # K > 2048: the fixed-point kernel's range
    seed = zlib.crc32(repr(special).encode())
    x, qweight, scales, bias = make_case(1, k, n, torch.float32, group_size, with_bias=True, seed=seed)
    if special == 0.0:
        y = fastquant.int8_linear(torch.zeros_like(x), qweight, scales, bias, group_size)
        torch.testing.assert_close(y, bias.expand_as(y), rtol=0, atol=0)
        return
    x[0, 123] = special * x.abs().mean()
    y = fastquant.int8_linear(x, qweight, scales, bias, group_size)
    if torch.isfinite(x).all() and special < 1e30:
        assert_int8_linear_close(y, x, qweight, scales, bias, group_size, m1_path(cpu_isa, k, group_size))
    else:  # +-inf or NaN in every output, as the reference gives (an inf times codes of both signs)
        y_ref = reference.int8_linear(x, qweight, scales, bias, group_size)
        torch.testing.assert_close(y, y_ref, equal_nan=True, rtol=1e-5, atol=0)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
def test_m1_more_in_features_than_fixed_point_takes(cpu_isa):
    """K > 65536, where a plane's int32 sums could overflow: the fp32 kernel runs instead."""
    k = 65536 + 64
    x, qweight, scales, bias = make_case(1, k, 5, torch.bfloat16, -1, with_bias=True, seed=13)
    path = cpu_path(1, 5, k, -1, torch.bfloat16)
    assert path == m1_path(cpu_isa, k, -1) and "fixed" not in path
    assert_int8_linear_close(fastquant.int8_linear(x, qweight, scales, bias, -1), x, qweight, scales, bias, -1, path)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("group_size", [-1, 128])
def test_opcheck(cpu_isa, group_size):
    x, qweight, scales, bias = make_case(5, 300, 40, torch.bfloat16, group_size, with_bias=True, seed=7)
    torch.library.opcheck(torch.ops.fastquant.int8_linear.default, (x, qweight, scales, bias, group_size))
    torch.library.opcheck(torch.ops.fastquant.int8_linear.default, (x.float(), qweight, scales, None, group_size))


def test_reference_kernel_opcheck():
    """The pure-PyTorch fallback is a registered kernel too (it runs on devices without a native one)."""
    x, qweight, scales, bias = make_case(3, 100, 20, torch.float32, 32, with_bias=True, seed=3)
    y = torch.ops.fastquant.int8_linear.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd), x, qweight, scales, bias, 32
    )
    torch.testing.assert_close(y, reference.int8_linear(x, qweight, scales, bias, 32), rtol=0, atol=0)


def test_torch_compile_fullgraph():
    x, qweight, scales, bias = make_case(4, 1025, 300, torch.bfloat16, 128, with_bias=True, seed=11)

    def f(x):
        return torch.nn.functional.gelu(fastquant.int8_linear(x, qweight, scales, bias, 128)) * 2

    compiled = torch.compile(f, fullgraph=True)
    # Inductor fuses gelu and the product in fp32 without rounding in between: bf16 tolerance, not equality.
    torch.testing.assert_close(compiled(x), f(x))
    x2 = torch.randn(9, 1025).bfloat16()  # a new batch size retraces or runs dynamic: both must agree
    torch.testing.assert_close(compiled(x2), f(x2))


def test_non_contiguous_and_batched_input():
    x, qweight, scales, bias = make_case(6, 200, 50, torch.float32, -1, with_bias=True, seed=5)
    x3 = torch.randn(200, 3, 4).permute(1, 2, 0)  # (3, 4, 200) with K not the innermost stride
    assert not x3.is_contiguous()
    y = fastquant.int8_linear(x3, qweight, scales, bias, -1)
    assert y.shape == (3, 4, 50)
    expected = fastquant.int8_linear(x3.contiguous(), qweight, scales, bias, -1)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    x_sliced = torch.randn(6, 400)[:, ::2]
    torch.testing.assert_close(
        fastquant.int8_linear(x_sliced, qweight, scales, bias, -1),
        fastquant.int8_linear(x_sliced.contiguous(), qweight, scales, bias, -1),
        rtol=0,
        atol=0,
    )


def test_empty_batch():
    _, qweight, scales, bias = make_case(1, 64, 32, torch.float32, -1, with_bias=True, seed=2)
    y = fastquant.int8_linear(torch.empty(0, 64), qweight, scales, bias, -1)
    assert y.shape == (0, 32)
    y = fastquant.int8_linear(torch.empty(2, 0, 64), qweight, scales, bias, -1)
    assert y.shape == (2, 0, 32)


def test_autograd_to_activations():
    """Gradients reach x and bias (the int8 weight is frozen): d(sum y^2)/dx = 2y @ W, d/dbias = sum of 2y."""
    x, qweight, scales, bias = make_case(4, 96, 24, torch.float32, 32, with_bias=True, seed=9)
    weight = reference.int8_dequantize(qweight, scales, 32)
    assert_gradients_reach_activations(lambda x, b: fastquant.int8_linear(x, qweight, scales, b, 32), x, bias, weight)


def bad_inputs(x_dtype: str) -> list:
    """(message, make_args(x, qweight, scales, bias)) of every refused 3 x 64 -> 32 call; ``x_dtype`` is how the
    messages name the dtype of the test's x (a pattern)."""
    return [
        ("x must be float32, bfloat16 or float16", lambda x, q, s, b: (x.to(torch.int32), q, s, None, -1)),
        ("x must be float32, bfloat16 or float16", lambda x, q, s, b: (x.double(), q, s, None, -1)),
        ("qweight must be a 2-D int8 tensor", lambda x, q, s, b: (x, q.float(), s, None, -1)),
        ("qweight must be a 2-D int8 tensor", lambda x, q, s, b: (x, q[0], s, None, -1)),
        (
            r"x has 63 input features \(shape [(\[]3, 63[)\]]\) but qweight is \(N, K\) = \(32, 64\)",
            lambda x, q, s, b: (x[:, :63], q, s, None, -1),
        ),
        ("scales must be float32", lambda x, q, s, b: (x, q, s.half(), None, -1)),
        (
            r"per-channel scales must have shape \(N,\) = \(32,\), got [(\[]31,?[)\]]",
            lambda x, q, s, b: (x, q, s[:31], None, -1),
        ),
        (r"group-wise scales .* must have shape \(32, 2\)", lambda x, q, s, b: (x, q, s, None, 32)),
        ("group_size must be -1", lambda x, q, s, b: (x, q, s, None, 0)),
        (
            rf"bias dtype (torch.float16|Half) must match x dtype {x_dtype}",
            lambda x, q, s, b: (x, q, s, b.half(), -1),
        ),
        (r"bias must have shape \(32,\)", lambda x, q, s, b: (x, q, s, b[:5], -1)),
    ]


BAD_INPUTS = bad_inputs("(torch.float32|Float)")


@pytest.mark.parametrize(("message", "make_args"), BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_input_is_named(message, make_args, device):
    """The native kernel and the fake kernel (what torch.compile traces) reject the same input alike."""
    x, qweight, scales, bias = make_case(3, 64, 32, torch.float32, -1, with_bias=True, seed=1)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in make_args(x, qweight, scales, bias)]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastquant.int8_linear(*args)


def test_mixed_devices_rejected():
    x, qweight, scales, _ = make_case(3, 64, 32, torch.float32, -1, with_bias=False, seed=1)
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.fastquant.int8_linear(x, qweight.to("meta"), scales, None, -1)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_quantize_error_within_half_step(group_size):
    gen = torch.Generator().manual_seed(group_size + 1000)
    weight = random_weight(33, 1025, gen)
    weight[3] = 0.0  # an all-zero row keeps an exact zero and a finite scale
    qweight, scales = reference.int8_quantize(weight, group_size)
    assert qweight.dtype == torch.int8 and scales.dtype == torch.float32
    assert int(qweight.abs().max()) == 127 and int(qweight.min()) >= -127
    step = reference.expand_group_scales(scales, 1025, group_size)
    dequantized = reference.int8_dequantize(qweight, scales, group_size)
    # Round-to-nearest: at most half a step, plus the fp32 rounding of the weight itself at a tie.
    assert bool(((dequantized - weight).abs() <= step / 2 + 2**-22 * weight.abs()).all())
    assert bool((dequantized[3] == 0).all()) and bool(torch.isfinite(scales).all())


# ---------------------------------------------------------------- int8_activations (x rounded to int8 per 32 columns)


def expected_int8x_path(cpu_isa: str, m: int, k: int, group_size: int) -> str | None:
    """cpu_avx2_int8x for up to 8 rows with per-channel scales or groups of a multiple of 32 columns, on every
    ISA with AVX2; None where another kernel runs on the glue's x~."""
    group = k if group_size == -1 else min(group_size, k)
    if cpu_isa != "portable" and m <= 8 and (group == k or group % 32 == 0):
        return "cpu_avx2_int8x"
    return None


@pytest.mark.parametrize(("cpu_isa", "shape"), isa_shape_cases(SHAPES, PORTABLE_SHAPES), indirect=["cpu_isa"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# 96: groups that end mid 64-column block; 100: groups that are no multiple of a block (x~ on the fp32 kernel).
@pytest.mark.parametrize("group_size", [-1, 32, 96, 100, 128])
def test_int8_activations_match_reference(cpu_isa, shape, dtype, group_size):
    m, k, n = shape
    seed = zlib.crc32(repr((shape, group_size, dtype, cpu_isa, "x8")).encode())
    x, qweight, scales, bias = make_case(m, k, n, dtype, group_size, with_bias=seed % 2 == 0, seed=seed)
    path = extension.int8_linear_kernel_path(torch.device("cpu"), m, n, k, group_size, dtype, int8_activations=True)
    expected = expected_int8x_path(cpu_isa, m, k, group_size)
    assert path == expected if expected else (cpu_isa in path and path != "cpu_avx2_int8x")
    y = fastquant.int8_linear(x, qweight, scales, bias, group_size, int8_activations=True)
    assert_int8_linear_close(y, x, qweight, scales, bias, group_size, path, int8_activations=True)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 2, 8, 9, 17])
def test_int8_activations_round_x_as_the_reference(cpu_isa, m):
    """With an identity weight (code 1 on the diagonal, scale 1) each output is one product x~ * 1, exact in
    fp32: the kernel's x~ is the reference's bit for bit, ties, tiny blocks and the ragged last block
    included."""
    k = 100
    qweight = torch.eye(k, dtype=torch.int8)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 10
    x[0, :3] = torch.tensor([127.0, 2.5, -3.5])
    x[0, 3:32] = torch.linspace(-1, 1, 29)  # m = 127: x * 127 / m = x, ties at 2.5 and -3.5
    x[-1, 32:64] = 2.0**-110
    for group_size, scales in ((-1, torch.ones(k)), (32, torch.ones(k, 4))):
        y = fastquant.int8_linear(x, qweight, scales, None, group_size, int8_activations=True)
        assert torch.equal(y, reference.int8_activation_round(x))
        assert y[0, 1].item() == 2.0 and y[0, 2].item() == -4.0


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
def test_int8_activations_extreme_codes(cpu_isa):
    """Codes -128 (a loaded weight may hold them; quantization stops at -127) and 127 against X = +-127 in
    every column: each pair of products sums to +-2 * 128 * 127, at the edge of vpmaddubsw's int16 range, and
    the result is exact."""
    k = 1024
    qweight = torch.full((4, k), -128, dtype=torch.int8)
    qweight[1] = 127
    qweight[2, ::2] = 127  # alternating signs: the sum cancels to exactly 0
    qweight[3, 1::2] = 0
    x = torch.ones(1, k)
    x[0, ::3] = -1.0
    y = fastquant.int8_linear(x, qweight, torch.ones(4), None, -1, int8_activations=True)
    expected = x.double() @ qweight.double().T  # x~ = x here (m = 1, X = +-127)
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("special", [float("inf"), float("nan")])
def test_int8_activations_leave_non_finite_x_as_it_is(cpu_isa, m, special):
    """x with NaN or inf is not rounded (a NaN step would spoil its whole block): NaN and inf come out where the
    float product puts them, as in the reference."""
    k, n = 200, 33
    x, qweight, scales, bias = make_case(m, k, n, torch.float32, 32, with_bias=True, seed=4)
    x[0, 7] = special
    y = fastquant.int8_linear(x, qweight, scales, bias, 32, int8_activations=True)
    y_ref = reference.int8_linear(x, qweight, scales, bias, 32, True)
    unrounded = reference.int8_linear(x, qweight, scales, bias, 32)
    torch.testing.assert_close(y_ref, unrounded, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(y.isinf(), y_ref.isinf())
    torch.testing.assert_close(y, y_ref, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
def test_int8_activations_infinite_scale_recomputed_on_x_tilde(cpu_isa):
    """An infinite scale makes its column inf/NaN; the call is then computed again by the reference formula, on
    x~ as the kernel was, so the finite columns still match the reference with int8_activations."""
    x, qweight, scales, bias = make_case(2, 96, 9, torch.float32, -1, with_bias=True, seed=6)
    scales[4] = float("inf")
    y = fastquant.int8_linear(x, qweight, scales, bias, -1, int8_activations=True)
    y_ref = reference.int8_linear(x, qweight, scales, bias, -1, True)
    assert not bool(torch.isfinite(y[:, 4]).any())
    torch.testing.assert_close(y, y_ref, equal_nan=True, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 17])
def test_int8_activations_opcheck(cpu_isa, m):
    x, qweight, scales, bias = make_case(m, 300, 40, torch.bfloat16, 64, with_bias=True, seed=9)
    op = torch.ops.fastquant.int8_linear.default
    torch.library.opcheck(op, (x, qweight, scales, bias, 64, True))
    torch.library.opcheck(op, (x.float(), qweight, scales, None, 64, True))


def test_int8_activations_compile_fullgraph():
    x, qweight, scales, bias = make_case(1, 1025, 300, torch.float32, -1, with_bias=True, seed=12)

    def f(x):
        return torch.relu(fastquant.int8_linear(x, qweight, scales, bias, -1, int8_activations=True))

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=1e-6, atol=1e-5)
    x2 = torch.randn(20, 1025)
    torch.testing.assert_close(compiled(x2), f(x2), rtol=1e-6, atol=1e-5)


def test_int8_activations_gradient_passes_straight_through():
    """The rounding of x is not differentiated: grad x = grad y @ W, as without it."""
    x, qweight, scales, bias = make_case(4, 96, 24, torch.float32, 32, with_bias=True, seed=10)
    weight = reference.int8_dequantize(qweight, scales, 32)
    assert_gradients_reach_activations(
        lambda x, b: fastquant.int8_linear(x, qweight, scales, b, 32, int8_activations=True), x, bias, weight
    )
