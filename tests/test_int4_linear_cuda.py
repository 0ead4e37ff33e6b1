"""fastquant.int4_linear on CUDA: every dispatch path vs a float64 reference, symmetric and asymmetric, opcheck,
torch.compile, CUDA-graph capture, bad input, odd layouts.

Tolerance rule (as for the int8 CUDA kernels): with y64 the float64 evaluation of the reference formula
(fastquant.kernels.reference.int4_dequantize, then x @ W.T + bias), y_torch what PyTorch itself gives at the activation
dtype by dequantizing and calling F.linear (``F.linear(x, W.to(dtype), bias)``, cuBLAS), u the unit roundoff of
the dtype (2^-24, 2^-8, 2^-11 for fp32, bf16, fp16) and W the dequantized weight, every output element must
satisfy

    |y - y64| <= 2 * |y_torch - y64| + 2^-12 * sqrt((x^2) @ (W^2)^T) + 4 * u * |y64|

The first term allows what PyTorch loses at this precision (the cuBLAS path rounds W to x's dtype exactly as
that expression does; the GEMV multiplies exact codes and applies the scales in fp32, so it loses less); the
second is the fp32 accumulation (tensor cores may truncate instead of rounding each addition); the last covers
the final rounding of both outputs. Losing or duplicating one 32-wide half block of the weight (the GEMV's unit
of scale) moves y by about sqrt(32 / K) * sqrt((x^2) @ (W^2)^T), at least 2^-4 of that scale for K <= 8192: far
outside the bound. Inputs are fresh random numbers (never zeros); outputs are compared element by element, so
an element the kernel never wrote (torch.empty) fails too.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import helpers
from fastquant.kernels import extension, reference
from helpers import assert_cuda_rule, cuda_graph_of, launched_kernels, path_cases, shape_params

pytestmark = helpers.CUDA_KERNEL_MARKS

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
GROUP_SIZES = [32, 128, 96]  # 96: not a power of two (the kernels divide instead of shifting); 64 in PATH_CASES
# (M, K, N): decode and prefill row counts; K among 17, 100, 1000, 1025, 4096, 4100 (K % 64 != 0: a partial last
# block; K % 32 <= 16: a last half block past K; K % 8 != 0: element loads of x, or dequantize + cuBLAS instead
# of the GEMM), N among 1, 17, 1000, 1025, 4096.
SHAPES = shape_params(
    """
    1x4096x4096 1x17x1000 1x100x1 2x1025x17 3x4100x1025 7x1000x4096 16x4096x1000 17x1025x4096
    33x4096x17 64x4100x1000 65x1000x1025 300x4096x1025 600x1025x300
    """
)


def cuda_path(m: int, n: int, k: int, group_size: int, dtype: torch.dtype, x_aligned: bool = True) -> str:
    native = extension.native
    return native.cuda_dispatch.int4_path(
        m,
        n,
        k,
        group_size,
        str(dtype).removeprefix("torch."),
        x_aligned,
        native.int4_cuda_gemv_max_m(),
        native.int4_cuda_gemm_max_m(),
    )


def make_case(m, k, n, dtype, group_size, symmetric, with_bias, seed, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    row_scale = torch.rand(n, 1, generator=gen, device=device) * 2 + 0.05  # rows of different magnitudes
    # A shift per row: asymmetric groups get offsets far from zero, so a lost offset term shows.
    shift = (torch.rand(n, 1, generator=gen, device=device) - 0.5) * 2
    weight = torch.randn(n, k, generator=gen, device=device) * row_scale + (0 if symmetric else shift)
    qweight, scales, offsets = reference.int4_quantize(weight, group_size, symmetric)
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    bias = torch.randn(n, generator=gen, device=device).to(dtype) if with_bias else None
    return x, qweight, scales, offsets, bias


def int4_linear(x, qweight, scales, offsets, bias, in_features, group_size):
    return torch.ops.fastquant.int4_linear(x, qweight, scales, offsets, bias, in_features, group_size)


def assert_close_to_reference(y, x, qweight, scales, offsets, bias, group_size, path=""):
    k = x.shape[-1]
    weight = reference.int4_dequantize(qweight, scales, offsets, k, group_size)
    assert_cuda_rule(y, x, weight, bias, F.linear(x, weight.to(x.dtype), bias), f"kernel {path}: ")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_matches_reference(shape, dtype, group_size, symmetric):
    m, k, n = shape
    seed = zlib.crc32(repr((shape, group_size, dtype, symmetric)).encode())
    x, qweight, scales, offsets, bias = make_case(m, k, n, dtype, group_size, symmetric, seed % 2 == 0, seed)
    path = cuda_path(m, n, k, group_size, dtype)
    assert path.startswith("cuda_int4_")
    y = int4_linear(x, qweight, scales, offsets, bias, k, group_size)
    assert_close_to_reference(y, x, qweight, scales, offsets, bias, group_size, path)


# One case per entry of the dispatch table (csrc/cuda/int4_linear_dispatch.h): (expected path, M, K, N, dtype,
# group size). The comment says why the shape lands there.
PATH_CASES = [
    ("cuda_int4_gemv_mma_m8", 1, 4096, 1536, torch.bfloat16, 32),  # decode, one n=8 tile
    ("cuda_int4_gemv_mma_m8", 8, 576, 1536, torch.float16, 128),  # M = 8: last row of the n=8 tile
    ("cuda_int4_gemv_mma_m8", 1, 8192, 64, torch.bfloat16, 64),  # N / 16 = 4 blocks < SMs: split-K + finalize
    ("cuda_int4_gemv_mma_m16", 16, 4096, 512, torch.bfloat16, 32),  # two n=8 tiles
    ("cuda_int4_gemv_mma_m16", 9, 2048, 1000, torch.float16, 256),  # second tile has one live row
    ("cuda_int4_gemv_mma_m32", 32, 2048, 1024, torch.float16, 64),  # four n=8 tiles
    ("cuda_int4_gemv_mma_m64", 64, 1024, 2048, torch.bfloat16, 128),  # eight n=8 tiles
    ("cuda_int4_gemv_mma_m64", 40, 2048, 100, torch.bfloat16, 32),  # N % 16 != 0, split-K
    ("cuda_int4_gemv_mma_m8", 5, 1000, 300, torch.bfloat16, 32),  # K % 8 == 0 (vector x), K % 64 != 0
    ("cuda_int4_gemv_mma_m8_x_unaligned", 3, 1001, 70, torch.float16, 64),  # K % 8 == 1: element loads of x
    ("cuda_int4_gemv_mma_m16_x_unaligned", 12, 1025, 64, torch.float16, 32),  # K % 64 == 1, ragged group
    ("cuda_int4_gemv_mma_m32_x_unaligned", 30, 4100, 33, torch.bfloat16, 128),
    ("cuda_int4_gemv_mma_m64_x_unaligned", 50, 17, 70, torch.float16, 32),
    ("cuda_int4_gemm_mma", 65, 512, 256, torch.bfloat16, 32),  # M > 64: fused GEMM, 64-row blocks, 2 K splits
    ("cuda_int4_gemm_mma", 200, 1000, 300, torch.float16, 64),  # K % 64 != 0: zero-filled x past K, 4 splits
    ("cuda_int4_gemm_mma", 128, 4096, 1024, torch.bfloat16, 128),  # 16 blocks: 8 K splits + finalize
    ("cuda_int4_gemm_mma", 512, 256, 8192, torch.bfloat16, 32),  # >= SMs blocks of 128 rows: 128-row blocks
    ("cuda_int4_gemm_mma", 300, 320, 4100, torch.float16, 96),  # N % 128 != 0, M % 64 != 0, no split
    ("cuda_int4_dequant_cublas", 600, 512, 256, torch.bfloat16, 32),  # M > 512
    ("cuda_int4_dequant_cublas", 100, 1001, 200, torch.float16, 96),  # K % 8 != 0: element stores
    ("cuda_int4_dequant_cublas", 4, 300, 40, torch.float32, 32),  # fp32 activations always
]


@path_cases(("path", "m", "k", "n", "dtype", "group_size"), PATH_CASES)
def test_every_dispatch_path(path, m, k, n, dtype, group_size):
    assert cuda_path(m, n, k, group_size, dtype) == path
    # What fastquant.info and the report print for a CUDA device is the same choice.
    assert extension.int4_linear_kernel_path(torch.device("cuda"), m, n, k, group_size, dtype) == path
    for symmetric in (True, False):
        for with_bias in (False, True):
            seed = m * 7919 + k + n + 2 * symmetric + with_bias
            x, qweight, scales, offsets, bias = make_case(m, k, n, dtype, group_size, symmetric, with_bias, seed)
            y = int4_linear(x, qweight, scales, offsets, bias, k, group_size)
            assert_close_to_reference(y, x, qweight, scales, offsets, bias, group_size, path)


def test_all_table_paths_are_covered():
    names = {"cuda_int4_dequant_cublas", "cuda_int4_gemm_mma"} | {
        f"cuda_int4_gemv_mma_m{m}{suffix}" for m in (8, 16, 32, 64) for suffix in ("", "_x_unaligned")
    }
    assert {case[0] for case in PATH_CASES} == names


def test_launched_kernels_match_the_reported_path():
    """The name the path query reports is the kernel that runs: the GEMV at M <= 64, the fused GEMM up to 512,
    the dequantize kernel (and cuBLAS) above and for fp32."""
    for m, dtype, must, must_not in (
        (4, torch.bfloat16, "int4_gemv_mma_kernel", "int4_dequant_kernel"),
        (100, torch.bfloat16, "int4_gemm_mma_kernel", "int4_dequant_kernel"),
        (600, torch.bfloat16, "int4_dequant_kernel", "int4_gemm_mma_kernel"),
        (4, torch.float32, "int4_dequant_kernel", "int4_gemv_mma_kernel"),
    ):
        args = make_case(m, 512, 96, dtype, 32, False, True, seed=m)
        kernels = launched_kernels(lambda args=args: int4_linear(*args, 512, 32))
        assert any(must in name for name in kernels), kernels
        assert not any(must_not in name for name in kernels), kernels


def test_caps_switch_paths():
    """set_int4_cuda_gemv_max_m / set_int4_cuda_gemm_max_m (the benchmark's switches) move shapes between paths."""
    native = extension.native
    d = native.cuda_dispatch
    assert native.int4_cuda_gemv_max_m() == d.DEFAULT_INT4_GEMV_MAX_M == 64
    assert native.int4_cuda_gemm_max_m() == d.DEFAULT_INT4_GEMM_MAX_M
    try:
        native.set_int4_cuda_gemv_max_m(8)
        native.set_int4_cuda_gemm_max_m(0)
        assert cuda_path(8, 256, 1024, 128, torch.bfloat16) == "cuda_int4_gemv_mma_m8"
        assert cuda_path(16, 256, 1024, 128, torch.bfloat16) == "cuda_int4_dequant_cublas"
        x, qweight, scales, offsets, bias = make_case(16, 1024, 256, torch.bfloat16, 128, False, True, seed=21)
        y = int4_linear(x, qweight, scales, offsets, bias, 1024, 128)
        assert_close_to_reference(y, x, qweight, scales, offsets, bias, 128, "cuda_int4_dequant_cublas (capped)")
        native.set_int4_cuda_gemv_max_m(0)
        native.set_int4_cuda_gemm_max_m(4096)  # the fused GEMM at M = 1 and M = 2048 (128-row blocks)
        for m in (1, 2048):
            assert cuda_path(m, 4096, 4096, 32, torch.float16) == "cuda_int4_gemm_mma"
            x, qweight, scales, offsets, bias = make_case(m, 4096, 4096, torch.float16, 32, m == 1, True, seed=m)
            y = int4_linear(x, qweight, scales, offsets, bias, 4096, 32)
            assert_close_to_reference(y, x, qweight, scales, offsets, bias, 32, "cuda_int4_gemm_mma (forced)")
    finally:
        native.set_int4_cuda_gemv_max_m(d.DEFAULT_INT4_GEMV_MAX_M)
        native.set_int4_cuda_gemm_max_m(d.DEFAULT_INT4_GEMM_MAX_M)
    assert cuda_path(16, 256, 1024, 128, torch.bfloat16) == "cuda_int4_gemv_mma_m16"


@pytest.mark.parametrize("m", [4, 100], ids=["gemv", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_misaligned_pointers(dtype, m):
    """x or qweight start 1 element into their storage. The GEMV loads a misaligned x element by element; the
    GEMM copies it to an aligned buffer; a misaligned qweight is copied by the glue. The numbers are the same
    bits as with aligned inputs, and the launched kernel says which variant ran."""
    k, n = 512, 96
    x, qweight, scales, offsets, bias = make_case(m, k, n, dtype, 64, False, True, seed=4)
    x_off = torch.empty(m * k + 1, dtype=dtype, device="cuda")[1:].view(m, k)
    x_off.copy_(x)
    w_off = torch.empty(qweight.numel() + 1, dtype=torch.uint8, device="cuda")[1:].view_as(qweight)
    w_off.copy_(qweight)
    assert x_off.data_ptr() % 16 != 0 and w_off.data_ptr() % 16 != 0
    assert cuda_path(m, n, k, 64, dtype, x_aligned=False) == (
        "cuda_int4_gemv_mma_m8_x_unaligned" if m <= 64 else "cuda_int4_gemm_mma_x_copied"
    )
    expected = int4_linear(x, qweight, scales, offsets, bias, k, 64)
    assert_close_to_reference(expected, x, qweight, scales, offsets, bias, 64, "aligned")
    # The GEMV: int4_gemv_mma_kernel<T, NT = 1, kAsym = true, kXVector>
    cases = [(x_off, qweight, ", 1, true, false>"), (x, w_off, ", 1, true, true>"), (x_off, w_off, ", 1, true, false>")]
    for xx, ww, variant in cases:
        y = int4_linear(xx, ww, scales, offsets, bias, k, 64)
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
        kernels = launched_kernels(lambda xx=xx, ww=ww: int4_linear(xx, ww, scales, offsets, bias, k, 64))
        if m <= 64:
            assert any("int4_gemv_mma_kernel" in name and variant in name for name in kernels), kernels
        else:
            assert any("int4_gemm_mma_kernel" in name for name in kernels), kernels
            assert not any("int4_dequant_kernel" in name for name in kernels), kernels


@pytest.mark.parametrize("k", [100, 72, 1000])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_never_reads_x_past_k(k, symmetric):
    """x is a view that ends at K inside a buffer of NaN: a kernel that read x past K (the padding codes of the
    last block, symmetric ones standing for -8) would return NaN."""
    n = 40
    _, qweight, scales, offsets, bias = make_case(1, k, n, torch.bfloat16, 32, symmetric, True, seed=k)
    buf = torch.full((k + 64,), float("nan"), dtype=torch.bfloat16, device="cuda")
    buf[:k] = torch.randn(k, device="cuda").bfloat16()
    x = buf[:k]
    y = int4_linear(x, qweight, scales, offsets, bias, k, 32)
    assert torch.isfinite(y).all()
    assert_close_to_reference(y, x, qweight, scales, offsets, bias, 32, "x inside a NaN buffer")


def test_nonzero_padding_codes_do_not_contribute():
    """The format says codes past K are 0, but a kernel must not depend on it (x past K is never read, so the
    padding meets zeros): flipping every padding nibble changes nothing."""
    m, k, n = 3, 100, 50  # block 1 holds k 64..99: bytes 4..31 have padding in the high nibble or both
    x, qweight, scales, offsets, bias = make_case(m, k, n, torch.float16, 32, True, True, seed=8)
    expected = int4_linear(x, qweight, scales, offsets, bias, k, 32)
    codes = torch.zeros(n, 128, dtype=torch.uint8, device="cuda")
    codes[:, :k] = reference.int4_unpack(qweight, k)
    codes[:, k:] = 15
    dirty = reference.int4_pack(codes)
    torch.testing.assert_close(int4_linear(x, dirty, scales, offsets, bias, k, 32), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("m", "k", "n", "group_size"), [(1, 8192, 64, 32), (3, 14336, 48, 128), (40, 4096, 200, 64)])
def test_split_k_is_deterministic_when_asked(m, k, n, group_size):
    """Small N: the GEMV splits K. Under torch.use_deterministic_algorithms the splits are summed in a fixed
    order (no atomics): every run gives the same bits."""
    native = extension.native
    n_tiles = native.cuda_dispatch.int4_gemv_n_tiles(m)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert native.cuda_dispatch.int4_gemv_splits(n, k, sms, n_tiles) > 1
    x, qweight, scales, offsets, bias = make_case(m, k, n, torch.bfloat16, group_size, False, True, seed=m + n)
    y_atomic = int4_linear(x, qweight, scales, offsets, bias, k, group_size)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = [int4_linear(x, qweight, scales, offsets, bias, k, group_size) for _ in range(20)]
        kernels = launched_kernels(lambda: int4_linear(x, qweight, scales, offsets, bias, k, group_size))
    finally:
        torch.use_deterministic_algorithms(was)
    for y in runs[1:]:
        torch.testing.assert_close(y, runs[0], rtol=0, atol=0)
    assert_close_to_reference(runs[0], x, qweight, scales, offsets, bias, group_size, "GEMV, ordered split-K sum")
    assert_close_to_reference(y_atomic, x, qweight, scales, offsets, bias, group_size, "GEMV, atomic split-K sum")
    assert any("splitk_finalize_kernel" in name for name in kernels), kernels


@pytest.mark.parametrize("m", [1, 16, 100])
def test_fp16_partial_sums_do_not_overflow(m):
    """Partial sums reach 4e5, past fp16's 65504, and cancel to a small result: fp32 accumulation."""
    x, weight = helpers.fp16_cancelling_case(m, 32, device="cuda")
    k = x.shape[1]
    qweight, scales, offsets = reference.int4_quantize(weight, 32, True)
    y = int4_linear(x, qweight, scales, offsets, None, k, 32)
    assert torch.isfinite(y).all()
    assert_close_to_reference(y, x, qweight, scales, offsets, None, 32, cuda_path(m, 32, k, 32, torch.float16))


@pytest.mark.parametrize("m", [3, 100])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_opcheck(m, symmetric):
    x, qweight, scales, offsets, bias = make_case(m, 320, 48, torch.bfloat16, 64, symmetric, True, seed=7)
    op = torch.ops.fastquant.int4_linear.default
    torch.library.opcheck(op, (x, qweight, scales, offsets, bias, 320, 64))
    torch.library.opcheck(op, (x.half(), qweight, scales, offsets, None, 320, 64))
    torch.library.opcheck(op, (x.float(), qweight, scales, offsets, None, 320, 64))


def test_torch_compile_fullgraph():
    x0, qweight, scales, offsets, bias = make_case(1, 1024, 512, torch.bfloat16, 32, False, True, seed=11)

    def f(x):
        return F.gelu(int4_linear(x, qweight, scales, offsets, bias, 1024, 32)) * 2

    helpers.assert_compiled_matches_eager(f, 1024)  # GEMV and cuBLAS paths


@pytest.mark.parametrize(
    ("m", "k", "n", "symmetric"),
    [
        (1, 4096, 1024, True),
        (2, 8192, 64, False),
        (100, 512, 256, True),
        (128, 4096, 512, False),
        (600, 512, 256, True),
    ],
    ids=["gemv", "gemv-split-k", "gemm", "gemm-split-k", "dequant-cublas"],
)
def test_cuda_graph_capture_and_replay(m, k, n, symmetric):
    x, qweight, scales, offsets, bias = make_case(m, k, n, torch.bfloat16, 32, symmetric, True, seed=13)
    graph, static_x, static_y = cuda_graph_of(lambda xs: int4_linear(xs, qweight, scales, offsets, bias, k, 32), x)
    for seed in (1, 2):
        new_x = torch.randn(m, k, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda")
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        expected = int4_linear(static_x, qweight, scales, offsets, bias, k, 32)
        # Split-K sums in fp32 atomics (any order): equal up to the last bit of the output, not bit-exact.
        torch.testing.assert_close(static_y, expected, rtol=2**-7, atol=1e-3)
        assert_close_to_reference(static_y, static_x, qweight, scales, offsets, bias, 32, "graph replay")


def test_non_contiguous_and_batched_input():
    _, qweight, scales, offsets, bias = make_case(1, 256, 50, torch.bfloat16, 64, False, True, seed=5)
    x3 = torch.randn(256, 3, 4, device="cuda").bfloat16().permute(1, 2, 0)  # (3, 4, 256), K not innermost
    assert not x3.is_contiguous()
    y = int4_linear(x3, qweight, scales, offsets, bias, 256, 64)
    assert y.shape == (3, 4, 50)
    expected = int4_linear(x3.contiguous(), qweight, scales, offsets, bias, 256, 64)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert_close_to_reference(y.view(12, 50), x3.reshape(12, 256), qweight, scales, offsets, bias, 64, "batched")
    # Non-contiguous scales and offsets are made contiguous by the glue.
    s_t, o_t = scales.t().contiguous().t(), offsets.t().contiguous().t()
    assert not s_t.is_contiguous()
    torch.testing.assert_close(int4_linear(x3, qweight, s_t, o_t, bias, 256, 64), expected, rtol=0, atol=0)


def test_empty_batch_and_empty_k():
    _, qweight, scales, offsets, bias = make_case(1, 64, 32, torch.float16, 32, True, True, seed=2)
    assert int4_linear(torch.empty(0, 64, device="cuda").half(), qweight, scales, offsets, bias, 64, 32).shape == (
        0,
        32,
    )
    y = int4_linear(torch.empty(2, 0, 64, device="cuda").half(), qweight, scales, offsets, bias, 64, 32)
    assert y.shape == (2, 0, 32)
    q0 = torch.empty(32, 0, dtype=torch.uint8, device="cuda")
    s0 = torch.empty(32, 0, dtype=torch.float16, device="cuda")
    y = int4_linear(torch.empty(3, 0, device="cuda").half(), q0, s0, None, bias, 0, 32)
    torch.testing.assert_close(y, bias.expand(3, 32))


@pytest.mark.parametrize("m", [2, 100])
def test_group_wider_than_k(m):
    """A group size past 32 bits on K = 1000 is one group per row, like group size 1024: the glue narrows it for
    the kernels without changing y."""
    x, qweight, scales, offsets, bias = make_case(m, 1000, 64, torch.bfloat16, 1024, False, True, seed=3)
    assert scales.shape == (64, 1)
    expected = int4_linear(x, qweight, scales, offsets, bias, 1000, 1024)
    assert_close_to_reference(expected, x, qweight, scales, offsets, bias, 1024, "one group")
    y = int4_linear(x, qweight, scales, offsets, bias, 1000, 1 << 40)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_one_dimensional_x():
    x, qweight, scales, offsets, bias = make_case(1, 200, 40, torch.bfloat16, 64, True, True, seed=6)
    y = int4_linear(x[0], qweight, scales, offsets, bias, 200, 64)
    assert y.shape == (40,)
    torch.testing.assert_close(y, int4_linear(x, qweight, scales, offsets, bias, 200, 64)[0], rtol=0, atol=0)


def test_autograd_to_activations():
    x, qweight, scales, offsets, bias = make_case(4, 96, 24, torch.float32, 32, False, True, seed=9)
    weight = reference.int4_dequantize(qweight, scales, offsets, 96, 32)
    helpers.assert_gradients_reach_activations(
        lambda x, b: int4_linear(x, qweight, scales, offsets, b, 96, 32), x, bias, weight
    )


BAD_INPUTS = [
    ("x must be float32, bfloat16 or float16", lambda x, q, s, o, b: (x.double(), q, s, o, None, 64, 32)),
    ("qweight must be a 2-D uint8 tensor", lambda x, q, s, o, b: (x, q.view(torch.int8), s, o, None, 64, 32)),
    ("group_size must be a positive multiple of 32", lambda x, q, s, o, b: (x, q, s, o, None, 64, 48)),
    ("scales must be float16", lambda x, q, s, o, b: (x, q, s.float(), o, None, 64, 32)),
    ("offsets must be float16", lambda x, q, s, o, b: (x, q, s, o.float(), None, 64, 32)),
    ("bias must have shape", lambda x, q, s, o, b: (x, q, s, o, b[:5], 64, 32)),
    ("input features", lambda x, q, s, o, b: (x[:, :63], q, s, o, None, 64, 32)),
]


@pytest.mark.parametrize(("message", "make_args"), BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
def test_bad_input_is_named(message, make_args):
    x, qweight, scales, offsets, bias = make_case(3, 64, 32, torch.bfloat16, 32, False, True, seed=1)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastquant.int4_linear(*make_args(x, qweight, scales, offsets, bias))


@pytest.mark.parametrize("on_cpu", ["x", "qweight", "scales", "offsets", "bias"])
def test_mixed_devices_rejected(on_cpu):
    names = ("x", "qweight", "scales", "offsets", "bias")
    args = dict(zip(names, make_case(3, 64, 32, torch.bfloat16, 32, False, True, seed=1), strict=True))
    args[on_cpu] = args[on_cpu].cpu()
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.fastquant.int4_linear(*(args[name] for name in names), 64, 32)


@pytest.mark.parametrize("shape", [(1, 4096, 1000), (3, 1025, 17), (300, 4096, 1025)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_activations(shape, dtype):
    """int8_activations on CUDA: the kernels run on x~ (reference.int8_activation_round, computed on the GPU by
    torch ops) stored in x's dtype, so the rule above holds with that x; NaN in x is left as it is."""
    m, k, n = shape
    x, qweight, scales, offsets, bias = make_case(m, k, n, dtype, 32, True, True, seed=m + k)
    y = torch.ops.fastquant.int4_linear(x, qweight, scales, offsets, bias, k, 32, True)
    x_rounded = reference.int8_activation_round(x).to(dtype)
    assert_close_to_reference(y, x_rounded, qweight, scales, offsets, bias, 32, "int8_activations")
    x[0, 5] = float("nan")
    y = torch.ops.fastquant.int4_linear(x, qweight, scales, offsets, bias, k, 32, True)
    assert bool(y[0].isnan().all()) and bool(y[1:].isfinite().all())
