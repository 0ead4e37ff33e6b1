"""fastquant.sparse_linear (bitmap16 weight) on CUDA: every dispatch path vs a float64 reference, sparsity
levels (all-zero rows, 2:4), every value / activation dtype, int8 scales, the run-time path caps, opcheck,
torch.compile, CUDA-graph capture, bad input. The csr16 op, fastquant.sparse_csr_linear, is tested at the end of
the file (test_csr_*) with its own tolerance rule, on operands built from these bitmap16 cases.

Tolerance rule (CUDA kernels; the int8_linear CUDA rule): with y64 the float64 evaluation of
``reference.sparse_linear``'s formula (W the unpacked weight, times its scales for int8 values), y_torch what
PyTorch gives at the activation dtype by unpacking and calling ``F.linear(x, W.to(x.dtype), bias)`` (cuBLAS),
u the unit roundoff of x's dtype (2^-24, 2^-8, 2^-11 for fp32, bf16, fp16), every output element must satisfy

    |y - y64| <= 2 * |y_torch - y64| + 2^-12 * sqrt((x^2) @ (W^2)^T) + 4 * u * |y64|

The first term allows what PyTorch loses at this precision (the densify + cuBLAS path rounds int8 q * s to x's
dtype exactly as that expression does); the second is fp32 accumulation in any order; the last the final
rounding of both outputs. Dropping, duplicating or misplacing one kept weight moves y by about
|w| * |x| ~ sqrt(1 / kept) * sqrt((x^2) @ (W^2)^T), at least 2^-6 of that scale for the <= 4096 kept weights
per row here: far outside the bound.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

import fastquant  # noqa: F401 - registers the fastquant ops
from fastquant.kernels import extension, reference
from helpers import (
    CUDA_KERNEL_MARKS,
    assert_compiled_matches_eager,
    assert_cuda_rule,
    cuda_graph_of,
    fp16_cancelling_case,
    launched_kernels,
    path_cases,
    shape_params,
)

pytestmark = CUDA_KERNEL_MARKS

VALUE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]
X_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, K, N): M over the GEMV tiles (1, 3, 16); above 16 the tensor-core path for bf16/fp16 x (17, 33, 64, 65,
# 256, 300: x tiles of 32, 64 and 128 rows, partly filled) and the tiled GEMV (M <= 64) or densify + cuBLAS for
# fp32 x; K not a multiple of 16 (17, 1000 = 62.5 chunks, 1025), nor of the 64-column mma k-tile (1000, 1040),
# nor of 8 (17, 1025: x rows not 16-byte aligned, element loads), a multiple of the 512-column warp step (4096);
# N = 1 and 3 (blocks with idle warps), 1000, 257 (not a multiple of the 8, 16 or 128 rows of a block).
SHAPES = shape_params(
    """
    1x4096x1000 1x17x3 1x1025x1 3x1000x1000 3x4096x3 16x1025x1000 16x17x1 17x4096x3
    17x1000x1000 33x1000x130 64x1025x3 65x1040x257 256x1000x1000 256x17x3 300x1025x129
    """
)


def cuda_path(m: int, n: int, k: int, values_dtype: torch.dtype, x_dtype: torch.dtype, group_size: int = -1) -> str:
    return extension.sparse_linear_kernel_path(torch.device("cuda"), m, n, k, values_dtype, x_dtype, group_size)


def make_mask(n: int, k: int, sparsity: float | str, gen: torch.Generator) -> torch.Tensor:
    if sparsity == "2:4":  # the 2 largest random scores of every 4 consecutive columns
        k4 = -(-k // 4) * 4
        scores = torch.rand(n, k4 // 4, 4, generator=gen, device="cuda")
        top = scores.topk(2, dim=2).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, top, True)
        return mask.reshape(n, k4)[:, :k].contiguous()
    return torch.rand(n, k, generator=gen, device="cuda") >= sparsity


def make_case(m, k, n, values_dtype, x_dtype, sparsity=0.5, group_size=-1, with_bias=True, seed=0, zero_rows=True):
    """Packed weight (values, masks, row_offsets, scales), x, bias and the dense fp32 weight they stand for."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    row_scale = torch.rand(n, 1, generator=gen, device="cuda") * 2 + 0.05  # rows of different magnitudes
    weight = torch.randn(n, k, generator=gen, device="cuda") * row_scale
    mask = make_mask(n, k, sparsity, gen)
    if zero_rows and n >= 3:
        mask[1] = False  # an all-zero row between kept rows
    scales = None
    if values_dtype == torch.int8:
        qweight, scales = reference.int8_quantize(weight * mask, group_size)
        values, masks, row_offsets = reference.sparse_pack(qweight, mask)
    else:
        values, masks, row_offsets = reference.sparse_pack((weight * mask).to(values_dtype), mask)
    x = torch.randn(m, k, generator=gen, device="cuda").to(x_dtype)
    bias = torch.randn(n, generator=gen, device="cuda").to(x_dtype) if with_bias else None
    dense = reference.sparse_dequantize(values, masks, row_offsets, scales, k, group_size)
    return (x, values, masks, row_offsets, scales, bias, k, group_size), dense


def run(args):
    return torch.ops.fastquant.sparse_linear(*args)


def assert_close_to_reference(y, args, dense, path=""):
    x, bias = args[0], args[5]
    assert_cuda_rule(y, x, dense, bias, F.linear(x, dense.to(x.dtype), bias), f"kernel {path}: ")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("values_dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
def test_matches_reference(shape, values_dtype, x_dtype):
    m, k, n = shape
    seed = zlib.crc32(repr((shape, values_dtype, x_dtype)).encode())
    group_size = [-1, 32, 64, 128, 256][seed % 5] if values_dtype == torch.int8 else -1
    args, dense = make_case(m, k, n, values_dtype, x_dtype, 0.5, group_size, with_bias=seed % 2 == 0, seed=seed)
    path = cuda_path(m, n, k, values_dtype, x_dtype, group_size)
    assert path.startswith("cuda_sparse_")
    assert_close_to_reference(run(args), args, dense, path)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9, 1.0, "2:4"], ids=str)
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("values_dtype", [torch.bfloat16, torch.int8], ids=str)
def test_sparsity_levels(sparsity, m, values_dtype):
    """Dense, typical, very sparse and empty rows (1.0: every row all-zero, y = bias), and 2:4 masks."""
    k, n = 2100, 300  # 4 full warp steps + a ragged one; 300 rows = 37.5 blocks of 8
    group_size = 128 if values_dtype == torch.int8 else -1
    args, dense = make_case(m, k, n, values_dtype, torch.bfloat16, sparsity, group_size, seed=m + 1)
    y = run(args)
    assert_close_to_reference(y, args, dense, cuda_path(m, n, k, values_dtype, torch.bfloat16, group_size))
    if sparsity == 1.0:
        torch.testing.assert_close(y, args[5].expand(m, n), rtol=0, atol=0)


@pytest.mark.parametrize("group_size", [-1, 32, 64, 128, 256, 48])
@pytest.mark.parametrize("m", [1, 7, 40, 300])
def test_int8_scales(group_size, m):
    """Per-channel and per-group scales; group 48 (a multiple of 16, not a power of two) is densified for M <= 16
    (the GEMV finds groups by shifting) and taken by the tensor-core path above."""
    k, n = 1040, 130  # K % group != 0 for every group size: a ragged last group
    args, dense = make_case(m, k, n, torch.int8, torch.float16, 0.6, group_size, seed=group_size + 1000 * m)
    path = cuda_path(m, n, k, torch.int8, torch.float16, group_size)
    if m > 16:
        assert path == "cuda_sparse_mma"  # counts chunks per group: any multiple of 16
    elif group_size == 48:
        assert path == "cuda_sparse_densify_cublas"
    assert_close_to_reference(run(args), args, dense, path)


# One case per path of csrc/cuda/sparse_linear_dispatch.h: (expected path, M, K, N, values dtype, x dtype).
# Split-K of the mma path depends on the SM count (sparse_mma_splits): on an A100/H100 the N <= 1000 cases
# split K (2..8 splits), 4096 x 400 does not.
PATH_CASES = [
    ("cuda_sparse_gemv_m1", 1, 4096, 512, torch.bfloat16, torch.bfloat16),
    ("cuda_sparse_gemv_m2", 2, 14336, 64, torch.float16, torch.float16),  # x slabs of 8192 columns: 2 slabs
    ("cuda_sparse_gemv_m4", 4, 8192, 96, torch.float32, torch.bfloat16),  # x slabs of 4096 columns
    ("cuda_sparse_gemv_m8", 5, 4100, 200, torch.int8, torch.bfloat16),  # 16-warp blocks, 2048-column slabs: 3
    ("cuda_sparse_gemv_m16", 16, 3000, 77, torch.bfloat16, torch.float32),  # 1024-column slabs, last partial
    ("cuda_sparse_gemv_tiled", 33, 1025, 100, torch.float16, torch.float32),  # fp32 x: 3 launches, last of 1 row
    ("cuda_sparse_gemv_tiled", 64, 512, 64, torch.int8, torch.float32),
    ("cuda_sparse_mma", 17, 1000, 100, torch.bfloat16, torch.bfloat16),  # 32-row x tile, 15 rows of padding
    ("cuda_sparse_mma", 33, 1025, 100, torch.float16, torch.float16),  # K % 8 != 0: x by element loads
    ("cuda_sparse_mma", 64, 4096, 300, torch.int8, torch.bfloat16),  # 3 row blocks: 8 splits of K
    ("cuda_sparse_mma", 65, 1000, 1000, torch.float32, torch.bfloat16),  # fp32 values rounded to bf16
    ("cuda_sparse_mma", 300, 2000, 257, torch.bfloat16, torch.float16),  # bf16 values rounded to fp16
    ("cuda_sparse_mma", 400, 512, 4096, torch.float16, torch.float16),  # 128 blocks: no split
    ("cuda_sparse_densify_cublas", 600, 1000, 100, torch.bfloat16, torch.bfloat16),
    ("cuda_sparse_densify_cublas", 600, 1025, 70, torch.float32, torch.float16),  # mixed: fp32 GEMM
    ("cuda_sparse_densify_cublas", 520, 640, 48, torch.int8, torch.bfloat16),
    ("cuda_sparse_densify_cublas", 100, 640, 48, torch.bfloat16, torch.float32),  # fp32 x above the GEMV cap
]


@path_cases(("path", "m", "k", "n", "values_dtype", "x_dtype"), PATH_CASES, dtype_in_id=True)
def test_every_dispatch_path(path, m, k, n, values_dtype, x_dtype):
    assert cuda_path(m, n, k, values_dtype, x_dtype) == path
    assert extension.sparse_linear_kernel_path(torch.device("cuda"), m, n, k, values_dtype, x_dtype) == path
    for with_bias in (False, True):
        args, dense = make_case(m, k, n, values_dtype, x_dtype, 0.5, -1, with_bias, seed=m * 7919 + k + n)
        assert_close_to_reference(run(args), args, dense, path)


def test_all_paths_are_covered():
    names = {"cuda_sparse_gemv_tiled", "cuda_sparse_densify_cublas", "cuda_sparse_mma"} | {
        f"cuda_sparse_gemv_m{m}" for m in (1, 2, 4, 8, 16)
    }
    assert {case[0] for case in PATH_CASES} == names


@pytest.mark.parametrize("values_dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("m", [17, 33, 64, 65, 256, 300])
def test_mma_path_against_forced_densify(m, values_dtype):
    """The tensor-core path and, forced with set_sparse_cuda_mma_max_m(0) (the benchmark's switch), the tiled
    GEMV or densify + cuBLAS at the same M, all against the float64 reference: an all-zero row, K not a multiple
    of the 64-column k-tile, N not a multiple of the 128-row block."""
    native = extension.native
    k, n = 1000, 260
    group_size = 64 if values_dtype == torch.int8 else -1
    x_dtype = torch.float16 if m % 2 else torch.bfloat16
    args, dense = make_case(m, k, n, values_dtype, x_dtype, 0.6, group_size, seed=31 * m + 7)
    assert bool((dense[1] == 0).all())
    assert cuda_path(m, n, k, values_dtype, x_dtype, group_size) == "cuda_sparse_mma"
    y_mma = run(args)
    assert_close_to_reference(y_mma, args, dense, "cuda_sparse_mma")
    default = native.sparse_cuda_mma_max_m()
    try:
        native.set_sparse_cuda_mma_max_m(0)
        path = cuda_path(m, n, k, values_dtype, x_dtype, group_size)
        assert path == ("cuda_sparse_gemv_tiled" if m <= 64 else "cuda_sparse_densify_cublas")
        assert_close_to_reference(run(args), args, dense, path)
    finally:
        native.set_sparse_cuda_mma_max_m(default)
    torch.testing.assert_close(run(args), y_mma, rtol=0, atol=0)  # split-K sums in a fixed order


def test_path_caps_move_shapes():
    """set_sparse_cuda_mma_max_m / set_sparse_cuda_gemv_max_m (the benchmark's switches) move shapes between
    the tensor-core path, the tiled GEMV and densify + cuBLAS; fp32 x never takes the tensor-core path."""
    native = extension.native
    bf16 = torch.bfloat16
    mma_default, gemv_default = native.sparse_cuda_mma_max_m(), native.sparse_cuda_gemv_max_m()
    assert cuda_path(16, 4096, 4096, bf16, bf16) == "cuda_sparse_gemv_m16"
    assert cuda_path(17, 4096, 4096, bf16, bf16) == "cuda_sparse_mma"
    assert cuda_path(mma_default, 4096, 4096, bf16, bf16) == "cuda_sparse_mma"
    assert cuda_path(mma_default + 1, 4096, 4096, bf16, bf16) == "cuda_sparse_densify_cublas"
    assert cuda_path(256, 4096, 4096, torch.int8, torch.float32) == "cuda_sparse_densify_cublas"
    try:
        native.set_sparse_cuda_mma_max_m(0)
        assert cuda_path(17, 4096, 4096, bf16, bf16) == "cuda_sparse_gemv_tiled"
        native.set_sparse_cuda_gemv_max_m(0)
        assert cuda_path(1, 4096, 4096, bf16, bf16) == "cuda_sparse_densify_cublas"
        assert cuda_path(17, 4096, 4096, bf16, bf16) == "cuda_sparse_densify_cublas"
        native.set_sparse_cuda_mma_max_m(4096)
        assert cuda_path(17, 4096, 4096, bf16, bf16) == "cuda_sparse_mma"
        assert cuda_path(4096, 4096, 4096, bf16, bf16) == "cuda_sparse_mma"
        assert cuda_path(1, 4096, 4096, bf16, bf16) == "cuda_sparse_densify_cublas"  # M <= 16: never mma
    finally:
        native.set_sparse_cuda_mma_max_m(mma_default)
        native.set_sparse_cuda_gemv_max_m(gemv_default)
    assert native.sparse_cuda_mma_max_m() == mma_default and native.sparse_cuda_gemv_max_m() == gemv_default


@pytest.mark.parametrize(
    ("values_dtype", "smem", "block_m", "fallback"),
    [
        (torch.bfloat16, 101_376, 64, None),  # sm_86 / sm_89: 128 rows need 102,400 B, 64 fit
        (torch.int8, 60 * 1024, 32, None),
        (torch.float16, 16 * 1024, 0, "cuda_sparse_densify_cublas"),  # no block fits: the next path
    ],
)
def test_mma_block_sized_from_shared_memory(values_dtype, smem, block_m, fallback):
    """set_sparse_cuda_smem_limit gives the path choice a smaller GPU's shared memory per block: the mma kernel
    runs smaller blocks (named in the launched kernel) or hands the problem to the next path, and the numbers
    stay right."""
    native = extension.native
    m, k, n = 200, 1000, 300
    x_dtype = torch.float16 if values_dtype == torch.float16 else torch.bfloat16
    group_size = 64 if values_dtype == torch.int8 else -1
    args, dense = make_case(m, k, n, values_dtype, x_dtype, 0.5, group_size, seed=block_m + 11)
    values_name = str(values_dtype).removeprefix("torch.")
    assert native.cuda_dispatch.sparse_mma_block_m(m, values_name, smem) == block_m
    try:
        native.set_sparse_cuda_smem_limit(smem)
        path = cuda_path(m, n, k, values_dtype, x_dtype, group_size)
        assert path == (fallback or "cuda_sparse_mma")
        kernels = launched_kernels(lambda: run(args))
        y = run(args)
    finally:
        native.set_sparse_cuda_smem_limit(0)
    assert_close_to_reference(y, args, dense, path)
    mma = [name for name in kernels if "sparse_mma_kernel" in name]
    if fallback is None:
        assert mma and all(f", {block_m}, " in name for name in mma), kernels
    else:
        assert not mma, kernels


def test_misaligned_values_view():
    """values starting 1 element into their storage (no 16-byte loads from it): the glue copies it."""
    args, dense = make_case(3, 1000, 50, torch.bfloat16, torch.bfloat16, 0.5, seed=3)
    values = args[1]
    shifted = torch.empty(values.numel() + 1, dtype=values.dtype, device="cuda")[1:]
    shifted.copy_(values)
    assert shifted.data_ptr() % 16 != 0
    moved = (args[0], shifted, *args[2:])
    torch.testing.assert_close(run(moved), run(args), rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 16, 100])
def test_fp16_partial_sums_do_not_overflow(m):
    """Partial sums reach 4e5, past fp16's 65504, and cancel to a small result: fp32 accumulation."""
    x, weight = fp16_cancelling_case(m, 32, device="cuda")
    k = x.shape[1]
    weight = weight.half()
    weight[:, 1::2] = 0  # half of the weight pruned
    values, masks, row_offsets = reference.sparse_pack(weight)
    args = (x, values, masks, row_offsets, None, None, k, -1)
    y = run(args)
    assert torch.isfinite(y).all()
    assert_close_to_reference(y, args, weight.float(), "fp16 overflow")


@pytest.mark.parametrize("m", [3, 100])
@pytest.mark.parametrize("values_dtype", [torch.bfloat16, torch.int8], ids=str)
def test_opcheck(m, values_dtype):
    args, _ = make_case(m, 320, 48, values_dtype, torch.bfloat16, 0.5, 64, seed=7)
    op = torch.ops.fastquant.sparse_linear.default
    torch.library.opcheck(op, args)
    torch.library.opcheck(op, (args[0].half(), *args[1:5], None, *args[6:]))
    torch.library.opcheck(op, (args[0].float(), *args[1:5], None, *args[6:]))


def test_torch_compile_fullgraph():
    args, _ = make_case(1, 1024, 512, torch.bfloat16, torch.bfloat16, 0.7, seed=11)
    _, values, masks, row_offsets, scales, bias, k, g = args

    def f(x):
        y = torch.ops.fastquant.sparse_linear(x, values, masks, row_offsets, scales, bias, k, g)
        return F.gelu(y) * 2

    assert_compiled_matches_eager(f, k, rows=(1, 4, 100, 600))  # GEMV, tensor-core path, densify + cuBLAS


@pytest.mark.parametrize("m", [1, 40, 300, 600], ids=["gemv", "mma-split-k", "mma", "densify-cublas"])
def test_cuda_graph_capture_and_replay(m):
    args, dense = make_case(m, 2048, 256, torch.bfloat16, torch.bfloat16, 0.5, seed=13)
    graph, static_x, static_y = cuda_graph_of(lambda xs: run((xs, *args[1:])), args[0])
    graph_args = (static_x, *args[1:])
    for seed in (1, 2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        static_x.copy_(torch.randn(m, 2048, generator=gen, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        expected = run(graph_args)
        torch.testing.assert_close(static_y, expected, rtol=0, atol=0)  # no atomics: deterministic
        assert_close_to_reference(static_y, graph_args, dense, "graph replay")


def assert_non_contiguous_and_batched(run_layout, args) -> None:
    """``args``, a bf16 layer of 256 inputs and 50 outputs in either layout, run by ``run_layout`` on a 3-D x
    whose K is not innermost (as its contiguous copy) and on batches with no rows."""
    rest = args[1:]
    x3 = torch.randn(256, 3, 4, device="cuda").bfloat16().permute(1, 2, 0)  # (3, 4, 256), K not innermost
    assert not x3.is_contiguous()
    y = run_layout((x3, *rest))
    assert y.shape == (3, 4, 50)
    torch.testing.assert_close(y, run_layout((x3.contiguous(), *rest)), rtol=0, atol=0)
    assert run_layout((torch.empty(0, 256, device="cuda").bfloat16(), *rest)).shape == (0, 50)
    assert run_layout((torch.empty(2, 0, 256, device="cuda").bfloat16(), *rest)).shape == (2, 0, 50)


def test_non_contiguous_batched_and_empty():
    args, dense = make_case(1, 256, 50, torch.bfloat16, torch.bfloat16, 0.5, seed=5)
    assert_non_contiguous_and_batched(run, args)
    # in_features = 0: y = bias.
    bias = args[5]
    empty_masks = torch.empty(50, 0, dtype=torch.int16, device="cuda")
    values = torch.zeros(64, dtype=torch.bfloat16, device="cuda")
    offsets = torch.zeros(51, dtype=torch.int64, device="cuda")
    y = run((torch.empty(3, 0, device="cuda").bfloat16(), values, empty_masks, offsets, None, bias, 0, -1))
    torch.testing.assert_close(y, bias.expand(3, 50))


def _bad(i, value):
    def make(args):
        out = list(args)
        out[i] = value(args) if callable(value) else value
        return tuple(out)

    return make


BAD_INPUTS = [
    ("x must be float32, bfloat16 or float16", _bad(0, lambda a: a[0].to(torch.int32))),
    ("x must be float32, bfloat16 or float16", _bad(0, lambda a: a[0].double())),
    ("values must be a 1-D float32, bfloat16, float16 or int8 tensor", _bad(1, lambda a: a[1].double())),
    ("values must be a 1-D", _bad(1, lambda a: a[1].view(1, -1))),
    (r"masks must be a 2-D int16 tensor \(N, ceil\(K / 16\)\)", _bad(2, lambda a: a[2].int())),
    (r"x has 63 input features \(shape [(\[]3, 63[)\]]\) but in_features is 64", _bad(0, lambda a: a[0][:, :63])),
    (r"masks has 3 chunks per row but in_features 64 needs ceil\(64 / 16\) = 4", _bad(2, lambda a: a[2][:, :3])),
    (r"row_offsets must be an int64 tensor of shape \(N \+ 1,\) = \(33,\)", _bad(3, lambda a: a[3].int())),
    (r"row_offsets must be an int64 tensor of shape \(N \+ 1,\) = \(33,\)", _bad(3, lambda a: a[3][:-1])),
    ("values must end with 64 elements of padding", _bad(1, lambda a: a[1][:10])),
    ("int8 values need float32 scales, got None", lambda a: (a[0], a[1].to(torch.int8), *a[2:4], None, *a[5:])),
    ("scales must be None for", _bad(4, lambda a: torch.ones(32, device="cuda"))),
    (r"bias dtype (torch.float16|Half) must match x dtype (torch.bfloat16|BFloat16)", _bad(5, lambda a: a[5].half())),
    (r"bias must have shape \(32,\)", _bad(5, lambda a: a[5][:5])),
    ("group_size must be -1", _bad(7, 24)),
]


@pytest.mark.parametrize(("message", "make_args"), BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
def test_bad_input_is_named(message, make_args):
    args, _ = make_case(3, 64, 32, torch.bfloat16, torch.bfloat16, 0.5, seed=1)
    with pytest.raises(RuntimeError, match=message):
        run(make_args(args))


def test_bad_int8_scales_are_named():
    args, _ = make_case(3, 64, 32, torch.int8, torch.bfloat16, 0.5, 32, seed=1)
    with pytest.raises(RuntimeError, match="scales must be float32"):
        run((*args[:4], args[4].half(), *args[5:]))
    with pytest.raises(RuntimeError, match=r"group-wise scales .* must have shape \(32, 2\)"):
        run((*args[:4], args[4][:, :1].contiguous(), *args[5:]))
    with pytest.raises(RuntimeError, match=r"per-channel scales must have shape \(N,\) = \(32,\)"):
        run((*args[:4], args[4][:, 0].contiguous()[:31], *args[5:7], -1))


@pytest.mark.parametrize("on_cpu", [0, 1, 2, 3, 5], ids=["x", "values", "masks", "row_offsets", "bias"])
def test_mixed_devices_rejected(on_cpu):
    args, _ = make_case(3, 64, 32, torch.bfloat16, torch.bfloat16, 0.5, seed=1)
    args = list(args)
    args[on_cpu] = args[on_cpu].cpu()
    with pytest.raises(RuntimeError, match="device"):
        run(tuple(args))


# ---------------------------------------------------------------- sparse_csr_linear (csr16 weight) on CUDA
# csrc/cuda/sparse_csr_linear*.{cu,cpp,h}: one warp per weight row, x tiles of up to 16 rows staged in shared
# memory (or gathered from global memory when one row of x does not fit), any M by tiles.
#
# Tolerance rule (csr16): with y64 the float64 evaluation of reference.sparse_csr_linear's formula (W =
# reference.sparse_csr_dequantize: int8 values times their scales in fp32, repeated columns added), y_ref what
# reference.sparse_csr_linear (fp32 products and sums, the op's oracle) returns in x's dtype and u the unit
# roundoff of x's dtype, every output element must satisfy
#
#     |y - y64| <= 2 * |y_ref - y64| + 2^-12 * sqrt((x^2) @ (W^2)^T) + 4 * u * |y64|
#
# The kernel multiplies and adds in fp32 as the oracle does, so this is tighter than the bitmap16 rule above
# (which allows cuBLAS at x's dtype): the first term is what rounding the oracle's fp32 result to x's dtype
# loses, the second fp32 accumulation in any order (and per-channel int8 scales applied to the sum rather than
# to each weight), the third the final rounding. Dropping, duplicating or misplacing one kept weight moves y by
# about sqrt(1 / kept) of the scale term, >= 2^-6 of it for the <= 4096 kept weights per row here.

CSR_VALUE_KINDS = [  # (values dtype, group_size): every value dtype, int8 per-channel and with group scales
    (torch.float32, -1),
    (torch.bfloat16, -1),
    (torch.float16, -1),
    (torch.int8, -1),
    (torch.int8, 32),
    (torch.int8, 128),
]
CSR_KIND_IDS = ["f32", "bf16", "f16", "i8", "i8g32", "i8g128"]
CSR_M = [1, 3, 17]  # one 16-row tile of x or less, and 17: a second tile of one row
CSR_N = [1, 3, 17, 64]  # blocks with idle warps, an all-zero row 1 (make_case) from N = 3
CSR_K = [1, 17, 1025, 4096]  # rows shorter than a warp's 8-entry unit, ragged units, several 512-entry batches
CSR_SPARSITIES = [0.0, 0.5, 0.9, 1.0]


def as_int16(columns: torch.Tensor) -> torch.Tensor:
    """uint16 column numbers as the int16 two's complement the format stores."""
    return torch.where(columns >= 2**15, columns - 2**16, columns).to(torch.int16)


def csr_from_bitmap(args):
    """The csr16 operands of a bitmap16 case: the same values and row offsets, a column index per value."""
    x, values, masks, row_offsets, scales, bias, k, group_size = args
    column_indices = reference.sparse_column_indices(masks, k, values.numel())
    return (x, values, column_indices, row_offsets, scales, bias, k, group_size)


def make_csr_case(m, k, n, values_dtype, x_dtype, sparsity, group_size=-1, with_bias=True, seed=0):
    args, _ = make_case(m, k, n, values_dtype, x_dtype, sparsity, group_size, with_bias, seed)
    return csr_from_bitmap(args)


def run_csr(args):
    return torch.ops.fastquant.sparse_csr_linear(*args)


def assert_csr_close(y, args, what=""):
    x, values, column_indices, row_offsets, scales, bias, k, group_size = args
    weight = reference.sparse_csr_dequantize(values, column_indices, row_offsets, scales, k, group_size)
    assert_cuda_rule(y, x, weight, bias, reference.sparse_csr_linear(*args), f"{what}: ")


def test_csr_cuda_kernel_is_registered():
    """Without it the op would silently run the reference on CUDA tensors (and pass every comparison)."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastquant::sparse_csr_linear", "CUDA")


@pytest.mark.parametrize("sparsity", CSR_SPARSITIES, ids=str)
@pytest.mark.parametrize(("values_dtype", "group_size"), CSR_VALUE_KINDS, ids=CSR_KIND_IDS)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
def test_csr_matches_reference(x_dtype, values_dtype, group_size, sparsity):
    """Every (M, N, K) of CSR_M x CSR_N x CSR_K, fresh random weights, x and bias (or none) for each."""
    for m, n, k in itertools.product(CSR_M, CSR_N, CSR_K):
        case = (m, n, k, values_dtype, x_dtype, group_size, sparsity)
        seed = zlib.crc32(repr(case).encode())
        args = make_csr_case(m, k, n, values_dtype, x_dtype, sparsity, group_size, seed % 2 == 0, seed)
        y = run_csr(args)
        assert_csr_close(y, args, f"(M, N, K) = ({m}, {n}, {k})")
        if sparsity == 1.0 and args[5] is not None:
            torch.testing.assert_close(y, args[5].expand(m, n), rtol=0, atol=0)


# (M, K, N): x tiles the kernel cannot take in one pass (csrc/cuda/sparse_csr_linear.cu): 16 rows of K = 4096
# fit the shared-memory budget only as 4 tiles of 4; large M (tiles spread over blockIdx.y when N is small);
# K = 20000 and 30000 fit one row of x per tile only in the device's whole opt-in shared memory; K = 65536 (the
# format's limit, columns >= 32768 stored as negative int16) does not fit at all: x is gathered from global.
CSR_TILE_SHAPES = shape_params("16x4096x300 40x1025x50 300x4096x64 1000x17x3 2x20000x33 17x30000x5 3x65536x20")


@pytest.mark.parametrize("shape", CSR_TILE_SHAPES)
@pytest.mark.parametrize(
    ("values_dtype", "group_size"), [(torch.bfloat16, -1), (torch.int8, 128)], ids=["bf16", "i8g128"]
)
def test_csr_tiles_of_x(shape, values_dtype, group_size):
    m, k, n = shape
    x_dtype = torch.float32 if m % 2 else torch.bfloat16
    args = make_csr_case(m, k, n, values_dtype, x_dtype, 0.9, group_size, seed=m * 7919 + k + n)
    assert_csr_close(run_csr(args), args, f"tiles {shape}")


def make_random_csr(m, k, n, values_dtype, x_dtype, group_size, max_per_row, padding, seed):
    """A csr16 weight no bitmap16 weight gives: columns in random order, repeated ones (which add up), and
    values.numel() = kept + padding (padding 0 with an odd count: a ragged last 8-entry unit)."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_per_row + 1, (n,), generator=gen)
    if padding == 0 and int(counts.sum()) % 8 == 0:
        counts[-1] += 1
    row_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int64)
    total = int(row_offsets[-1])
    columns = torch.randint(0, k, (total + padding,), generator=gen)
    columns[total:] = 0
    scales = None
    if values_dtype == torch.int8:
        values = torch.randint(-127, 128, (total + padding,), generator=gen).to(torch.int8)
        n_scales = (n,) if group_size == -1 else (n, -(-k // group_size))
        scales = torch.rand(n_scales, generator=gen) * 0.02 + 1e-3
    else:
        values = torch.randn(total + padding, generator=gen).to(values_dtype)
    values[total:] = 0
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    bias = torch.randn(n, generator=gen).to(x_dtype)
    tensors = (x, values, as_int16(columns), row_offsets, scales, bias)
    return (*(None if t is None else t.cuda() for t in tensors), k, group_size)


@pytest.mark.parametrize("padding", [0, 3, 64])
@pytest.mark.parametrize(("values_dtype", "group_size"), CSR_VALUE_KINDS, ids=CSR_KIND_IDS)
def test_csr_any_order_repeats_and_ragged_end(values_dtype, group_size, padding):
    for m, k, n, max_per_row in ((1, 100, 37, 300), (5, 4096, 64, 700), (17, 65536, 9, 40)):
        args = make_random_csr(m, k, n, values_dtype, torch.bfloat16, group_size, max_per_row, padding, seed=k + n)
        assert_csr_close(run_csr(args), args, f"random csr16 ({m}, {k}, {n})")


def test_csr_misaligned_views():
    """values and column_indices starting 1 element into their storage (no 16-byte loads): the glue copies them."""
    args = make_csr_case(3, 1000, 50, torch.bfloat16, torch.bfloat16, 0.5, seed=3)
    moved = list(args)
    for i in (1, 2):
        shifted = torch.empty(args[i].numel() + 1, dtype=args[i].dtype, device="cuda")[1:]
        shifted.copy_(args[i])
        assert shifted.data_ptr() % 16 != 0
        moved[i] = shifted
    torch.testing.assert_close(run_csr(tuple(moved)), run_csr(args), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("values_dtype", "group_size"), [(torch.bfloat16, -1), (torch.int8, 128)], ids=["bf16", "i8g128"]
)
def test_csr_column_index_past_k_is_skipped(values_dtype, group_size):
    """Column indices are not checked on the GPU (no sync per call): one >= K must not read past x (nor past the
    row's group scales) and is skipped. The reference path would raise instead, so this also shows the CUDA
    kernel ran."""
    args = make_csr_case(5, 1025, 40, values_dtype, torch.float16, 0.5, group_size, seed=21)
    x, values, indices, row_offsets, scales, bias, k, g = args
    kept = torch.arange(int(row_offsets[-1]), device="cuda")
    hit = kept[::7]
    bad = indices.clone()
    bad[hit[0::2]] = k  # just past x
    bad[hit[1::2]] = -1  # int16 -1: column 65535
    y = run_csr((x, values, bad, row_offsets, scales, bias, k, g))
    torch.cuda.synchronize()
    without = values.clone()
    without[hit] = 0
    assert_csr_close(y, (x, without, indices, row_offsets, scales, bias, k, g), "indices past K skipped")


def clamped_rows(values, indices, row_offsets):
    """What the kernel reads for row offsets it cannot trust: row j is values[max(o[j], 0) : min(o[j + 1], numel)]
    (empty when that is), as a valid csr16 weight."""
    numel = values.numel()
    offsets = row_offsets.tolist()
    parts = [(max(a, 0), min(b, numel)) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    keep = [torch.arange(a, b) for a, b in parts if b > a]
    take = torch.cat(keep).cuda() if keep else torch.zeros(0, dtype=torch.int64, device="cuda")
    counts = torch.tensor([max(b - a, 0) for a, b in parts])
    new_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).cuda()
    return values[take], indices[take], new_offsets


def test_csr_row_offsets_out_of_range_never_crash():
    """Offsets are not checked on the GPU either: negative, past values.numel() or decreasing ones must not read
    out of bounds; each row reads its range clamped to [0, values.numel())."""
    args = make_csr_case(5, 1000, 30, torch.bfloat16, torch.bfloat16, 0.5, seed=23)
    x, values, indices, row_offsets, scales, bias, k, g = args
    numel = values.numel()
    bad = row_offsets.clone()
    bad[0] = -(2**40)  # row 0 from 0: unchanged
    bad[-1] = 2**40  # the last row runs to the end of values: its padding zeros add nothing
    bad[10] = numel + 1000  # row 9 runs to the end of values (rows 10.. included), row 10 is empty
    bad[20] = -5  # row 19 empty, row 20 from 0
    bad[25] = int(row_offsets[24]) - 3  # row 24 empty (decreasing), row 25 from 3 entries of row 23 on
    y = run_csr((x, values, indices, bad, scales, bias, k, g))
    torch.cuda.synchronize()
    assert bool(torch.isfinite(y).all())
    clamped = clamped_rows(values, indices, bad)
    assert_csr_close(y, (x, *clamped, scales, bias, k, g), "clamped rows")
    assert_csr_close(y[:, :9], (x, values, indices, row_offsets[:10], scales, bias[:9], k, g), "rows 0..8")
    assert_csr_close(run_csr(args), args, "valid call afterwards")  # the context is still usable


@pytest.mark.parametrize("m", [3, 40])
@pytest.mark.parametrize(
    ("values_dtype", "group_size"), [(torch.bfloat16, -1), (torch.int8, 64)], ids=["bf16", "i8g64"]
)
def test_csr_opcheck(m, values_dtype, group_size):
    args = make_csr_case(m, 320, 48, values_dtype, torch.bfloat16, 0.5, group_size, seed=7)
    op = torch.ops.fastquant.sparse_csr_linear.default
    torch.library.opcheck(op, args)
    torch.library.opcheck(op, (args[0].half(), *args[1:5], None, *args[6:]))
    torch.library.opcheck(op, (args[0].float(), *args[1:5], None, *args[6:]))


def test_csr_torch_compile_fullgraph():
    _, values, indices, row_offsets, scales, bias, k, g = make_csr_case(
        1, 1024, 512, torch.int8, torch.bfloat16, 0.9, 128, seed=11
    )

    def f(x):
        y = torch.ops.fastquant.sparse_csr_linear(x, values, indices, row_offsets, scales, bias, k, g)
        return F.gelu(y) * 2

    assert_compiled_matches_eager(f, k)  # one tile, one padded tile, several


def test_csr_cuda_graph_capture_and_replay():
    """No device-to-host sync in the glue: the op captures into a CUDA graph."""
    args = make_csr_case(4, 2048, 256, torch.bfloat16, torch.bfloat16, 0.9, seed=13)
    graph, static_x, static_y = cuda_graph_of(lambda xs: run_csr((xs, *args[1:])), args[0])
    graph_args = (static_x, *args[1:])
    for seed in (1, 2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        static_x.copy_(torch.randn(4, 2048, generator=gen, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_y, run_csr(graph_args), rtol=0, atol=0)  # no atomics: deterministic
        assert_csr_close(static_y, graph_args, "graph replay")


def test_csr_fp16_partial_sums_do_not_overflow():
    """Partial sums reach 4e5, past fp16's 65504, and cancel to a small result: fp32 accumulation."""
    k, n, m = 512, 32, 3
    weight = torch.cat([torch.full((n, k // 2), 8.0), torch.full((n, k // 2), -8.0)], dim=1).cuda().half()
    weight[:, 0] += 0.5
    weight[:, 1::2] = 0
    values, masks, row_offsets = reference.sparse_pack(weight)
    x = torch.full((m, k), 100.0, dtype=torch.float16, device="cuda")
    args = csr_from_bitmap((x, values, masks, row_offsets, None, None, k, -1))
    y = run_csr(args)
    assert bool(torch.isfinite(y).all())
    assert_csr_close(y, args, "fp16 overflow")


def test_csr_non_contiguous_batched_and_empty():
    args = make_csr_case(1, 256, 50, torch.bfloat16, torch.bfloat16, 0.5, seed=5)
    assert_non_contiguous_and_batched(run_csr, args)
    bias = args[5]
    empty = torch.zeros(64, dtype=torch.bfloat16, device="cuda")
    empty_indices = torch.zeros(64, dtype=torch.int16, device="cuda")
    offsets = torch.zeros(51, dtype=torch.int64, device="cuda")
    y = run_csr((torch.empty(3, 0, device="cuda").bfloat16(), empty, empty_indices, offsets, None, bias, 0, -1))
    torch.testing.assert_close(y, bias.expand(3, 50))  # in_features = 0: y = bias
    no_rows = torch.zeros(1, dtype=torch.int64, device="cuda")
    assert run_csr((args[0], args[1], args[2], no_rows, None, None, 256, -1)).shape == (1, 0)


CSR_BAD_INPUTS = [
    ("x must be float32, bfloat16 or float16", _bad(0, lambda a: a[0].double())),
    ("values must be a 1-D float32, bfloat16, float16 or int8 tensor", _bad(1, lambda a: a[1].double())),
    ("column_indices must be an int16 tensor of the values' shape", _bad(2, lambda a: a[2].int())),
    ("column_indices must be an int16 tensor of the values' shape", _bad(2, lambda a: a[2][:-1])),
    ("row_offsets must be a non-empty 1-D int64 tensor", _bad(3, lambda a: a[3].int())),
    ("row_offsets must be a non-empty 1-D int64 tensor", _bad(3, lambda a: a[3][:0])),
    (r"in_features must be in \[0, 65536\]", _bad(6, 65537)),
    (r"x has 64 input features .* but in_features is 60", _bad(6, 60)),
    ("group_size must be -1 .* or a positive multiple of 16, got 24", _bad(7, 24)),
    ("int8 values need float32 scales, got None", lambda a: (a[0], a[1].to(torch.int8), *a[2:4], None, *a[5:])),
    ("scales must be None for", _bad(4, lambda a: torch.ones(32, device="cuda"))),
    (r"bias must have shape \(32,\)", _bad(5, lambda a: a[5][:5])),
]


@pytest.mark.parametrize(("message", "make_args"), CSR_BAD_INPUTS, ids=[m for m, _ in CSR_BAD_INPUTS])
def test_csr_bad_input_is_named(message, make_args):
    args = make_csr_case(3, 64, 32, torch.bfloat16, torch.bfloat16, 0.5, seed=1)
    with pytest.raises(RuntimeError, match=message):
        run_csr(make_args(args))


@pytest.mark.parametrize("on_cpu", [0, 1, 2, 3, 5], ids=["x", "values", "column_indices", "row_offsets", "bias"])
def test_csr_mixed_devices_rejected(on_cpu):
    args = list(make_csr_case(3, 64, 32, torch.bfloat16, torch.bfloat16, 0.5, seed=1))
    args[on_cpu] = args[on_cpu].cpu()
    with pytest.raises(RuntimeError, match="device"):
        run_csr(tuple(args))
