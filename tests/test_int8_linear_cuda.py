"""fastquant.int8_linear on CUDA: every dispatch path vs a float64 reference, opcheck, torch.compile,
CUDA-graph capture, bad input, odd layouts.

Tolerance rule (CUDA kernels): with y64 the float64 evaluation of the reference formula, y_torch what PyTorch
itself gives at the activation dtype by dequantizing and calling F.linear (``F.linear(x, W.to(dtype), bias)``,
cuBLAS), u the unit roundoff of the dtype (2^-24, 2^-8, 2^-11 for fp32, bf16, fp16) and W the dequantized
weight, every output element must satisfy

    |y - y64| <= 2 * |y_torch - y64| + 2^-12 * sqrt((x^2) @ (W^2)^T) + 4 * u * |y64|

The first term allows what PyTorch loses at this precision (the group-wise GEMV rounds q * s to x's dtype
exactly as PyTorch's dequantize does); the second is the fp32 accumulation of the kernels (tensor cores may
truncate instead of rounding each addition); the last covers the final rounding of both outputs. Losing or
duplicating one 16-wide k segment of the weight (the kernels' unit of work) moves y by about
sqrt(16 / K) * sqrt((x^2) @ (W^2)^T), at least 2^-4 of that scale for K <= 4100: far outside the bound.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from test_int8_linear import bad_inputs

import fastquant
from fastquant.kernels import extension, reference
from helpers import (
    CUDA_KERNEL_MARKS,
    assert_compiled_matches_eager,
    assert_cuda_rule,
    assert_gradients_reach_activations,
    cuda_graph_of,
    fp16_cancelling_case,
    launched_kernels,
    path_cases,
    shape_params,
)

pytestmark = CUDA_KERNEL_MARKS

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
GROUP_SIZES = [-1, 32, 64, 128, 256]
# (M, K, N): every decode/prefill row count of the issue, K and N among 17, 1000, 1025, 4096, 4100 (K % 16
# != 0 takes the unaligned GEMV variants or, above M = 64, dequantize + cuBLAS; K = 1025 gives a ragged last
# group for every group size). M = 128 and 255 with K = 4096 take the fused GEMM.
SHAPES = shape_params(
    """
    1x4096x4096 1x17x1000 2x1025x17 3x4100x1025 7x1000x4100 16x4096x1000 17x1025x4096 33x4096x17
    64x4100x1000 128x4096x4100 255x4096x1025 300x1000x1025 513x4096x4100 2048x1025x4096
    """
)


def cuda_path(m, n, k, group_size, dtype) -> str:
    return extension.int8_linear_kernel_path(torch.device("cuda"), m, n, k, group_size, dtype)


def make_case(m, k, n, dtype, group_size, with_bias, seed, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    row_scale = torch.rand(n, 1, generator=gen, device=device) * 2 + 0.05  # rows of different magnitudes
    weight = torch.randn(n, k, generator=gen, device=device) * row_scale
    qweight, scales = reference.int8_quantize(weight, group_size)
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    bias = torch.randn(n, generator=gen, device=device).to(dtype) if with_bias else None
    return x, qweight, scales, bias


def assert_close_to_reference(y, x, qweight, scales, bias, group_size, path=""):
    weight = reference.int8_dequantize(qweight, scales, group_size)
    assert_cuda_rule(y, x, weight, bias, F.linear(x, weight.to(x.dtype), bias), f"kernel {path}: ")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_matches_reference(shape, dtype, group_size):
    m, k, n = shape
    seed = zlib.crc32(repr((shape, group_size, dtype)).encode())
    x, qweight, scales, bias = make_case(m, k, n, dtype, group_size, with_bias=seed % 2 == 0, seed=seed)
    path = cuda_path(m, n, k, group_size, dtype)
    assert path.startswith("cuda_")
    y = fastquant.int8_linear(x, qweight, scales, bias, group_size)
    assert_close_to_reference(y, x, qweight, scales, bias, group_size, path)


# One case per entry of the dispatch table (csrc/cuda/int8_linear_dispatch.h): (expected path, M, K, N,
# dtype, group size). The comment says why the shape lands there.
PATH_CASES = [
    ("cuda_gemv_mma_m8", 1, 4096, 1536, torch.bfloat16, -1),  # decode, one n=8 tile
    ("cuda_gemv_mma_m8", 8, 576, 1536, torch.float16, 128),  # M = 8: last row of the n=8 tile
    ("cuda_gemv_mma_m8", 1, 8192, 64, torch.bfloat16, 128),  # N/16 = 4 blocks < SMs: split-K + finalize
    ("cuda_gemv_mma_m8", 3, 8192, 48, torch.float16, -1),  # split-K, per-channel scales, fp16
    ("cuda_gemv_mma_m16", 16, 4096, 512, torch.bfloat16, 32),  # two n=8 tiles
    ("cuda_gemv_mma_m16", 9, 2048, 1000, torch.float16, 256),  # second tile has one live row
    ("cuda_gemv_mma_m32", 32, 2048, 1024, torch.float16, -1),  # four n=8 tiles
    ("cuda_gemv_mma_m64", 64, 1024, 2048, torch.bfloat16, 64),  # eight n=8 tiles
    ("cuda_gemv_mma_m64", 40, 2048, 100, torch.bfloat16, -1),  # eight tiles, N not a multiple of 16, split-K
    ("cuda_gemv_mma_m8_unaligned", 5, 1000, 300, torch.bfloat16, -1),  # K % 16 == 8: byte-wise loads
    ("cuda_gemv_mma_m16_unaligned", 12, 1025, 64, torch.float16, 32),  # K % 16 == 1, ragged group
    ("cuda_gemv_mma_m32_unaligned", 30, 4100, 33, torch.bfloat16, 128),
    ("cuda_gemv_mma_m64_unaligned", 50, 17, 70, torch.float16, -1),
    ("cuda_gemm_mma", 65, 512, 256, torch.bfloat16, -1),  # M > 64: fused GEMM, 64-row blocks, 2 K splits
    ("cuda_gemm_mma", 200, 1040, 300, torch.float16, 32),  # K % 64 != 0: zero-filled last k-tile, 4 splits
    ("cuda_gemm_mma", 128, 4096, 1024, torch.bfloat16, -1),  # 16 blocks: 8 K splits + finalize
    ("cuda_gemm_mma", 512, 256, 8192, torch.bfloat16, 128),  # >= SMs blocks of 128 rows: 128-row blocks
    ("cuda_gemm_mma", 300, 320, 4100, torch.float16, -1),  # N % 128 != 0, M % 64 != 0, 165 blocks: no split
    ("cuda_dequant_cublas", 600, 512, 256, torch.bfloat16, -1),  # M > 512
    ("cuda_dequant_cublas", 300, 1000, 200, torch.float16, 64),  # M > 64, K % 16 != 0: unaligned dequantize
    ("cuda_dequant_cublas", 4, 300, 40, torch.float32, -1),  # fp32 activations always
    ("cuda_dequant_cublas", 4, 256, 40, torch.bfloat16, 24),  # group size not a multiple of 16
]


@path_cases(("path", "m", "k", "n", "dtype", "group_size"), PATH_CASES)
def test_every_dispatch_path(path, m, k, n, dtype, group_size):
    assert cuda_path(m, n, k, group_size, dtype) == path
    for with_bias in (False, True):
        x, qweight, scales, bias = make_case(m, k, n, dtype, group_size, with_bias, seed=m * 7919 + k + n)
        y = fastquant.int8_linear(x, qweight, scales, bias, group_size)
        assert_close_to_reference(y, x, qweight, scales, bias, group_size, path)


def test_all_table_paths_are_covered():
    names = {"cuda_dequant_cublas", "cuda_gemm_mma"} | {
        f"cuda_gemv_mma_m{m}{suffix}" for m in (8, 16, 32, 64) for suffix in ("", "_unaligned")
    }
    assert {case[0] for case in PATH_CASES} == names


def test_caps_switch_paths():
    """set_cuda_gemv_max_m / set_cuda_gemm_max_m (the benchmark's switches) move shapes between paths."""
    native = extension.native
    assert native.cuda_gemv_max_m() == 64
    default_gemm = native.cuda_gemm_max_m()
    try:
        native.set_cuda_gemv_max_m(8)
        native.set_cuda_gemm_max_m(0)
        assert cuda_path(8, 256, 1024, 128, torch.bfloat16) == "cuda_gemv_mma_m8"
        assert cuda_path(16, 256, 1024, 128, torch.bfloat16) == "cuda_dequant_cublas"
        x, qweight, scales, bias = make_case(16, 1024, 256, torch.bfloat16, 128, with_bias=True, seed=21)
        y = fastquant.int8_linear(x, qweight, scales, bias, 128)
        assert_close_to_reference(y, x, qweight, scales, bias, 128, "cuda_dequant_cublas (capped)")
        native.set_cuda_gemv_max_m(0)
        native.set_cuda_gemm_max_m(4096)  # the fused GEMM at M = 1 and M = 2048 (128-row blocks)
        for m in (1, 2048):
            assert cuda_path(m, 4096, 4096, -1, torch.float16) == "cuda_gemm_mma"
            x, qweight, scales, bias = make_case(m, 4096, 4096, torch.float16, -1, with_bias=True, seed=m)
            y = fastquant.int8_linear(x, qweight, scales, bias, -1)
            assert_close_to_reference(y, x, qweight, scales, bias, -1, "cuda_gemm_mma (forced)")
    finally:
        native.set_cuda_gemv_max_m(64)
        native.set_cuda_gemm_max_m(default_gemm)
    assert cuda_path(16, 256, 1024, 128, torch.bfloat16) == "cuda_gemv_mma_m16"


@pytest.mark.parametrize("m", [4, 100], ids=["gemv", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_misaligned_pointers(dtype, m):
    """K % 16 == 0 but x or qweight start 1 element into their storage. A misaligned x keeps the weight's
    16-byte loads (GEMV: element loads of x only; GEMM: x copied to an aligned buffer); a misaligned weight takes
    the GEMV's element-load variant or, above M = 64, dequantize + cuBLAS. The launched kernel says which."""
    k, n = 512, 96
    x, qweight, scales, bias = make_case(m, k, n, dtype, 64, with_bias=True, seed=4)
    x_off = torch.empty(m * k + 1, dtype=dtype, device="cuda")[1:].view(m, k)
    x_off.copy_(x)
    w_off = torch.empty(n * k + 1, dtype=torch.int8, device="cuda")[1:].view(n, k)
    w_off.copy_(qweight)
    assert x_off.data_ptr() % 16 != 0 and w_off.data_ptr() % 16 != 0
    expected = fastquant.int8_linear(x, qweight, scales, bias, 64)
    # (x, weight, what the launched kernels' names must show: the GEMV's <..., kWVector, kXVector> flags or the
    # kernel; a kernel that must not run)
    cases = [
        (x_off, qweight, ", true, true, false>" if m <= 64 else "int8_gemm_mma_kernel", "dequant"),
        (x, w_off, ", true, false, false>" if m <= 64 else "dequant", "int8_gemm_mma_kernel"),
        (x_off, w_off, ", true, false, false>" if m <= 64 else "dequant", "int8_gemm_mma_kernel"),
    ]
    for xx, ww, must, must_not in cases:
        y = fastquant.int8_linear(xx, ww, scales, bias, 64)
        assert_close_to_reference(y, x, qweight, scales, bias, 64, "misaligned pointers")
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
        kernels = launched_kernels(lambda xx=xx, ww=ww: fastquant.int8_linear(xx, ww, scales, bias, 64))
        assert any(must in name for name in kernels), kernels
        assert not any(must_not in name for name in kernels), kernels


@pytest.mark.parametrize(("m", "k", "n", "group_size"), [(1, 8192, 64, -1), (3, 14336, 48, 128), (40, 4096, 200, -1)])
def test_split_k_is_deterministic_when_asked(m, k, n, group_size):
    """Small N: the GEMV splits K. Under torch.use_deterministic_algorithms the splits are summed in a fixed
    order (no atomics): every run gives the same bits, and the numbers are those of the default (atomic) sum up
    to fp32 rounding."""
    native = extension.native
    n_tiles = native.cuda_dispatch.int8_gemv_n_tiles(m)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert native.cuda_dispatch.int8_gemv_splits(n, k, sms, n_tiles) > 1
    x, qweight, scales, bias = make_case(m, k, n, torch.bfloat16, group_size, with_bias=True, seed=m + n)
    y_atomic = fastquant.int8_linear(x, qweight, scales, bias, group_size)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = [fastquant.int8_linear(x, qweight, scales, bias, group_size) for _ in range(20)]
        kernels = launched_kernels(lambda: fastquant.int8_linear(x, qweight, scales, bias, group_size))
    finally:
        torch.use_deterministic_algorithms(was)
    for y in runs[1:]:
        torch.testing.assert_close(y, runs[0], rtol=0, atol=0)
    assert_close_to_reference(runs[0], x, qweight, scales, bias, group_size, "GEMV, ordered split-K sum")
    assert_close_to_reference(y_atomic, x, qweight, scales, bias, group_size, "GEMV, atomic split-K sum")
    assert any("splitk_finalize_kernel" in name for name in kernels), kernels


@pytest.mark.parametrize("m", [1, 16, 100])
def test_fp16_partial_sums_do_not_overflow(m):
    """Partial sums reach 4e5, past fp16's 65504, and cancel to a small result: fp32 accumulation."""
    x, weight = fp16_cancelling_case(m, 32, device="cuda")
    k = x.shape[1]
    qweight, scales = reference.int8_quantize(weight, -1)
    y = fastquant.int8_linear(x, qweight, scales, None, -1)
    assert torch.isfinite(y).all()
    assert_close_to_reference(y, x, qweight, scales, None, -1, cuda_path(m, 32, k, -1, torch.float16))


@pytest.mark.parametrize("m", [3, 100])
@pytest.mark.parametrize("group_size", [-1, 128])
def test_opcheck(m, group_size):
    x, qweight, scales, bias = make_case(m, 320, 48, torch.bfloat16, group_size, with_bias=True, seed=7)
    op = torch.ops.fastquant.int8_linear.default
    torch.library.opcheck(op, (x, qweight, scales, bias, group_size))
    torch.library.opcheck(op, (x.half(), qweight, scales, None, group_size))
    torch.library.opcheck(op, (x.float(), qweight, scales, None, group_size))


def test_torch_compile_fullgraph_module():
    torch.manual_seed(11)
    linear = torch.nn.Linear(1024, 512, bias=True, device="cuda", dtype=torch.bfloat16)
    layer = fastquant.Int8Linear.from_linear(linear, group_size=128)

    def f(x):
        return F.gelu(layer(x)) * 2

    assert_compiled_matches_eager(f, 1024)  # GEMV and cuBLAS paths


@pytest.mark.parametrize(
    ("m", "k", "n", "group_size"),
    [(1, 4096, 1024, -1), (2, 8192, 64, 128), (100, 512, 256, 32), (600, 512, 256, -1)],
    ids=["gemv", "gemv-split-k", "gemm", "dequant-cublas"],
)
def test_cuda_graph_capture_and_replay(m, k, n, group_size):
    x, qweight, scales, bias = make_case(m, k, n, torch.bfloat16, group_size, with_bias=True, seed=13)
    graph, static_x, static_y = cuda_graph_of(
        lambda xs: fastquant.int8_linear(xs, qweight, scales, bias, group_size), x
    )
    for seed in (1, 2):
        new_x = torch.randn(m, k, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda")
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        expected = fastquant.int8_linear(static_x, qweight, scales, bias, group_size)
        # Split-K sums in fp32 atomics (any order): equal up to the last bit of the output, not bit-exact.
        torch.testing.assert_close(static_y, expected, rtol=2**-7, atol=1e-3)
        assert_close_to_reference(static_y, static_x, qweight, scales, bias, group_size, "graph replay")


def test_non_contiguous_and_batched_input():
    _, qweight, scales, bias = make_case(1, 256, 50, torch.bfloat16, 64, with_bias=True, seed=5)
    x3 = torch.randn(256, 3, 4, device="cuda").bfloat16().permute(1, 2, 0)  # (3, 4, 256), K not innermost
    assert not x3.is_contiguous()
    y = fastquant.int8_linear(x3, qweight, scales, bias, 64)
    assert y.shape == (3, 4, 50)
    torch.testing.assert_close(y, fastquant.int8_linear(x3.contiguous(), qweight, scales, bias, 64), rtol=0, atol=0)
    x_sliced = torch.randn(6, 512, device="cuda").bfloat16()[:, ::2]
    torch.testing.assert_close(
        fastquant.int8_linear(x_sliced, qweight, scales, bias, 64),
        fastquant.int8_linear(x_sliced.contiguous(), qweight, scales, bias, 64),
        rtol=0,
        atol=0,
    )
    # A non-contiguous weight and scales are made contiguous by the glue.
    q_t = qweight.t().contiguous().t()
    assert not q_t.is_contiguous()
    x = torch.randn(2, 256, device="cuda").bfloat16()
    torch.testing.assert_close(
        fastquant.int8_linear(x, q_t, scales, bias, 64), fastquant.int8_linear(x, qweight, scales, bias, 64)
    )


def test_empty_batch_and_empty_k():
    _, qweight, scales, bias = make_case(1, 64, 32, torch.float16, -1, with_bias=True, seed=2)
    assert fastquant.int8_linear(torch.empty(0, 64, device="cuda").half(), qweight, scales, bias, -1).shape == (0, 32)
    y = fastquant.int8_linear(torch.empty(2, 0, 64, device="cuda").half(), qweight, scales, bias, -1)
    assert y.shape == (2, 0, 32)
    q0 = torch.empty(32, 0, dtype=torch.int8, device="cuda")
    y = fastquant.int8_linear(torch.empty(3, 0, device="cuda").half(), q0, scales, bias, -1)
    torch.testing.assert_close(y, bias.expand(3, 32))


def test_autograd_to_activations():
    x, qweight, scales, bias = make_case(4, 96, 24, torch.float32, 32, with_bias=True, seed=9)
    weight = reference.int8_dequantize(qweight, scales, 32)
    assert_gradients_reach_activations(lambda x, b: fastquant.int8_linear(x, qweight, scales, b, 32), x, bias, weight)


BAD_INPUTS = bad_inputs("(torch.bfloat16|BFloat16)")


@pytest.mark.parametrize(("message", "make_args"), BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
def test_bad_input_is_named(message, make_args):
    x, qweight, scales, bias = make_case(3, 64, 32, torch.bfloat16, -1, with_bias=True, seed=1)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastquant.int8_linear(*make_args(x, qweight, scales, bias))


@pytest.mark.parametrize("on_cpu", ["x", "qweight", "scales", "bias"])
def test_mixed_devices_rejected(on_cpu):
    args = dict(
        zip(("x", "qweight", "scales", "bias"), make_case(3, 64, 32, torch.bfloat16, -1, True, seed=1), strict=True)
    )
    args[on_cpu] = args[on_cpu].cpu()
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.fastquant.int8_linear(args["x"], args["qweight"], args["scales"], args["bias"], -1)


def test_patched_model_on_cuda_reports_cuda_kernels():
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    model = model.to("cuda", torch.bfloat16).eval()
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        fastquant.patch(model)
        got = model(x)
    assert all(row.kernel.startswith("cuda_") for row in fastquant.report(model).layers)
    # int8 weights change the result by the quantization error only: a few percent of the output scale.
    assert (got.float() - expected.float()).norm() <= 0.05 * expected.float().norm()
