"""The CUDA kernel choice (csrc/cuda/*_dispatch.h), tested without a GPU.

The choice is plain C++ compiled into every build of the extension (fastquant._C.cuda_dispatch), so which
kernel, block size, K split and workspace a problem gets on a given device is checked here; whether the
chosen kernels compute the right numbers is for tests/test_*_cuda.py on a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastquant.kernels import extension

pytestmark = pytest.mark.skipif(extension.native is None, reason="fastquant native extension not built")

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) of the GPU generations the kernels
# are built for: sm_86 / sm_89 (RTX 30/40, A10, L4, L40), sm_80 (A100), sm_90 (H100).
SMEM_SM86 = 101_376
SMEM_SM80 = 166_912
SMEM_SM90 = 232_448
H100_SMS = 132


def dispatch():
    return extension.native.cuda_dispatch


def test_bitmap16_mma_shared_memory_matches_the_kernel_layout():
    d = dispatch()
    # Two 128 x 64 A tiles of 16-bit values, a 3-stage ring of block_m x 64 x tiles, 256 threads' value words.
    for values, units in (("bfloat16", 5), ("float16", 5), ("float32", 9), ("int8", 3)):
        for block_m in (32, 64, 128):
            expected = 2 * 128 * 64 * 2 + 3 * block_m * 64 * 2 + units * 4 * 256 * 4
            assert d.sparse_mma_smem_bytes(values, block_m) == expected
    assert d.sparse_mma_smem_bytes("bfloat16", 128) == 102_400 > SMEM_SM86


@pytest.mark.parametrize("values", ["bfloat16", "float16", "int8", "float32"])
@pytest.mark.parametrize("m", [17, 33, 64, 65, 200, 512])
def test_bitmap16_mma_block_fits_every_device(values, m):
    d = dispatch()
    wanted = 32 if m <= 32 else (64 if m <= 64 or values == "float32" else 128)
    for smem in (SMEM_SM86, SMEM_SM80, SMEM_SM90):
        block_m = d.sparse_mma_block_m(m, values, smem)
        assert d.sparse_mma_smem_bytes(values, block_m) <= smem
        assert block_m <= wanted
    assert d.sparse_mma_block_m(m, values, SMEM_SM90) == wanted
    # 16-bit values at 128 rows need 102,400 B: sm_86 / sm_89 take 64-row blocks, the rest fit.
    expect_sm86 = 64 if (wanted == 128 and values in ("bfloat16", "float16")) else wanted
    assert d.sparse_mma_block_m(m, values, SMEM_SM86) == expect_sm86


@pytest.mark.parametrize(
    ("m", "smem", "gemv_max_m", "expected"),
    [
        (200, SMEM_SM86, 64, "cuda_sparse_mma"),  # a smaller block fits
        (200, 60 * 1024, 64, "cuda_sparse_mma"),  # 60 KiB still holds a 32-row block of int8 values
        (40, 16 * 1024, 64, "cuda_sparse_gemv_tiled"),  # no block fits: the next path, the tiled GEMV
        (200, 16 * 1024, 64, "cuda_sparse_densify_cublas"),  # past the GEMV's M: densify + cuBLAS
        (40, 16 * 1024, 0, "cuda_sparse_densify_cublas"),  # GEMV capped off
    ],
)
def test_bitmap16_falls_back_when_no_mma_block_fits(m, smem, gemv_max_m, expected):
    path = dispatch().sparse_path(m, 4096, 4096, "int8", "bfloat16", -1, smem, gemv_max_m=gemv_max_m)
    assert path == expected


def test_bitmap16_path_names_respect_the_group_size():
    """The GEMV looks a group up with a shift: a group size that is a multiple of 16 but not a power of two
    (48, 96) goes elsewhere, and the reported name must say so."""
    cases = [
        (1, 32, "cuda_sparse_gemv_m1"),
        (1, 48, "cuda_sparse_densify_cublas"),
        (4, 96, "cuda_sparse_densify_cublas"),
        (40, 64, "cuda_sparse_mma"),
        (40, 48, "cuda_sparse_mma"),  # the mma kernel counts chunks: any multiple of 16
    ]
    for m, group_size, expected in cases:
        assert (
            extension.cuda_sparse_linear_path(m, 1024, 4096, torch.int8, torch.bfloat16, group_size, SMEM_SM90)
            == expected
        )
        # Float values carry no scales: the group size changes nothing.
        path = extension.cuda_sparse_linear_path(m, 1024, 4096, torch.bfloat16, torch.bfloat16, group_size, SMEM_SM90)
        assert path == ("cuda_sparse_mma" if m > 16 else f"cuda_sparse_gemv_m{m}")


@pytest.mark.parametrize("m", [1, 8, 9, 16, 17, 32, 33, 64])
@pytest.mark.parametrize(("n", "k"), [(1024, 4096), (512, 2048), (64, 8192), (48, 14336), (4096, 4096), (3, 100)])
def test_int8_gemv_splits_keep_every_warp_busy(m, n, k):
    d = dispatch()
    n_tiles = d.int8_gemv_n_tiles(m)
    chunks = -(-k // 64)
    per_step = d.int8_gemv_chunks_per_step(n_tiles)
    splits = d.int8_gemv_splits(n, k, H100_SMS, n_tiles)
    assert splits >= 1
    if splits > 1:
        # Each split gives the block's 8 warps at least one full step of U chunks each.
        assert chunks // splits >= 8 * per_step
        assert -(-n // 16) < H100_SMS  # only when N / 16 blocks leave SMs idle
    else:  # enough blocks already, or too few chunks for two full splits
        assert -(-n // 16) >= H100_SMS or chunks < 2 * 8 * per_step


def test_int8_gemv_splits_issue_example():
    """N = 1024, K = 4096 (64 chunks) on 132 SMs: 5 splits of 13 chunks kept 4 of 8 warps busy at U = 4."""
    d = dispatch()
    assert d.int8_gemv_n_tiles(1) == 1 and d.int8_gemv_chunks_per_step(1) == 4
    assert d.int8_gemv_splits(1024, 4096, H100_SMS, 1) == 2
    assert d.int8_gemv_chunks_per_step(8) == 2
    assert d.int8_gemv_splits(1024, 4096, H100_SMS, 8) == 4


def test_int8_gemv_workspace_is_per_split_when_deterministic():
    d = dispatch()
    assert d.int8_gemv_workspace_slices(1, False) == 0 and d.int8_gemv_workspace_slices(1, True) == 0
    assert d.int8_gemv_workspace_slices(6, False) == 1  # atomics into one zeroed slice
    assert d.int8_gemv_workspace_slices(6, True) == 6  # one slice per split, summed in order


@pytest.mark.parametrize(("m", "tile"), [(1, 8), (8, 8), (9, 16), (32, 32), (64, 64)])
def test_int8_misaligned_x_keeps_vector_weight_loads(m, tile):
    """A misaligned x view only moves x to element loads; a misaligned weight (or K % 16 != 0) moves both."""
    path = extension.cuda_int8_linear_path
    assert path(m, 4096, 4096, -1, torch.bfloat16) == f"cuda_gemv_mma_m{tile}"
    assert path(m, 4096, 4096, -1, torch.bfloat16, x_aligned=False) == f"cuda_gemv_mma_m{tile}_x_unaligned"
    assert path(m, 4096, 4096, 64, torch.float16, w_aligned=False) == f"cuda_gemv_mma_m{tile}_unaligned"
    assert path(m, 4096, 4100, -1, torch.float16) == f"cuda_gemv_mma_m{tile}_unaligned"


def test_int8_gemm_copies_a_misaligned_x():
    path = extension.cuda_int8_linear_path
    assert path(200, 4096, 4096, -1, torch.bfloat16) == "cuda_gemm_mma"
    assert path(200, 4096, 4096, -1, torch.bfloat16, x_aligned=False) == "cuda_gemm_mma_x_copied"
    assert path(200, 4096, 4096, -1, torch.bfloat16, w_aligned=False) == "cuda_dequant_cublas"
    assert path(200, 4096, 4096, -1, torch.float32, x_aligned=False) == "cuda_dequant_cublas"


@pytest.mark.parametrize("group_size", [48, 80, 96, 112, 160, 192])
def test_int8_non_power_of_two_groups_take_the_gemv(group_size):
    """The int8 GEMV needs each lane's 16 k to share a scale: any multiple of 16 does."""
    assert extension.cuda_int8_linear_path(1, 4096, 4096, group_size, torch.bfloat16) == "cuda_gemv_mma_m8"
    assert extension.cuda_int8_linear_path(1, 4096, 4096, 24, torch.bfloat16) == "cuda_dequant_cublas"


def test_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="unknown activation dtype 'float64'"):
        extension.cuda_int8_linear_path(1, 64, 64, -1, torch.float64)
    with pytest.raises(ValueError, match="unknown values dtype 'int16'"):
        extension.cuda_sparse_linear_path(1, 64, 64, torch.int16, torch.float32, -1, SMEM_SM90)


def test_device_query_forwards_group_size_and_shared_memory(monkeypatch):
    """The per-device query (what fastquant.report and fastquant.info print) hands the layer's group size and
    the device's opt-in shared memory per block to the choice; dropping the group size named the GEMV for
    group sizes it cannot take."""
    calls = []

    def record(*args):
        calls.append(args)
        return "recorded"

    monkeypatch.setattr(extension, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(extension, "cuda_sparse_linear_path", record)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(shared_memory_per_block_optin=SMEM_SM86)
    )
    path = extension.sparse_linear_kernel_path(torch.device("cuda"), 1, 1024, 4096, torch.int8, torch.bfloat16, 48)
    assert path == "recorded"
    assert calls == [(1, 1024, 4096, torch.int8, torch.bfloat16, 48, SMEM_SM86)]


# ---------------------------------------------------------------- int4_linear (csrc/cuda/int4_linear_dispatch.h)


def int4_path(m, n, k, group_size, dtype, x_aligned=True, gemv_max_m=64, gemm_max_m=512):
    return dispatch().int4_path(m, n, k, group_size, dtype, x_aligned, gemv_max_m, gemm_max_m)


@pytest.mark.parametrize(("m", "tile"), [(1, 8), (8, 8), (9, 16), (16, 16), (17, 32), (32, 32), (33, 64), (64, 64)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_int4_gemv_table(m, tile, dtype):
    assert int4_path(m, 4096, 4096, 32, dtype) == f"cuda_int4_gemv_mma_m{tile}"
    assert int4_path(m, 4096, 4096, 96, dtype) == f"cuda_int4_gemv_mma_m{tile}"  # any multiple of 32
    # x in element loads: a misaligned x pointer, or K % 8 != 0 (a 16-byte load would straddle K)
    assert int4_path(m, 4096, 4096, 32, dtype, x_aligned=False) == f"cuda_int4_gemv_mma_m{tile}_x_unaligned"
    assert int4_path(m, 4096, 4100, 32, dtype) == f"cuda_int4_gemv_mma_m{tile}_x_unaligned"
    assert int4_path(m, 4096, 1000, 32, dtype) == f"cuda_int4_gemv_mma_m{tile}"  # K % 8 == 0, K % 64 != 0
    assert dispatch().int4_gemv_n_tiles(m) == tile // 8


@pytest.mark.parametrize("m", [65, 100, 512])
def test_int4_medium_m_takes_the_fused_gemm(m):
    assert int4_path(m, 4096, 4096, 32, "bfloat16") == "cuda_int4_gemm_mma"
    assert int4_path(m, 4096, 1000, 96, "float16") == "cuda_int4_gemm_mma"  # K % 8 == 0: whole x chunks
    assert int4_path(m, 4096, 4096, 32, "bfloat16", x_aligned=False) == "cuda_int4_gemm_mma_x_copied"
    assert int4_path(m, 4096, 4100, 32, "bfloat16") == "cuda_int4_dequant_cublas"  # K % 8 != 0
    assert dispatch().int4_gemv_n_tiles(m) == 0


@pytest.mark.parametrize("m", [513, 4096])
def test_int4_large_m_and_fp32_take_dequantize_cublas(m):
    assert int4_path(m, 4096, 4096, 32, "bfloat16") == "cuda_int4_dequant_cublas"
    assert int4_path(1, 4096, 4096, 32, "float32") == "cuda_int4_dequant_cublas"
    assert int4_path(100, 4096, 4096, 32, "float32") == "cuda_int4_dequant_cublas"


def test_int4_caps():
    d = dispatch()
    assert d.DEFAULT_INT4_GEMV_MAX_M == 64 and d.DEFAULT_INT4_GEMM_MAX_M == d.DEFAULT_GEMM_MAX_M
    assert int4_path(16, 4096, 4096, 32, "bfloat16", gemv_max_m=8) == "cuda_int4_gemm_mma"
    assert int4_path(16, 4096, 4096, 32, "bfloat16", gemv_max_m=8, gemm_max_m=0) == "cuda_int4_dequant_cublas"
    assert int4_path(8, 4096, 4096, 32, "bfloat16", gemv_max_m=8) == "cuda_int4_gemv_mma_m8"
    assert int4_path(1, 4096, 4096, 32, "bfloat16", gemv_max_m=0) == "cuda_int4_gemm_mma"
    assert int4_path(600, 4096, 4096, 32, "bfloat16", gemm_max_m=1024) == "cuda_int4_gemm_mma"


@pytest.mark.parametrize(
    ("m", "n", "k", "block_m", "splits"),
    [
        (65, 256, 512, 64, 2),  # 4 blocks: split, capped at k-tiles / 4
        (200, 300, 1000, 64, 4),  # 12 blocks, 16 k-tiles
        (128, 1024, 4096, 64, 8),  # 16 blocks: at most 8 splits
        (512, 8192, 256, 128, 1),  # 256 blocks of 128 rows fill 132 SMs
        (300, 4100, 320, 64, 1),  # 165 blocks of 64 rows: over 3/4 of the SMs busy
    ],
)
def test_int4_gemm_geometry(m, n, k, block_m, splits):
    """The int4 GEMM has the int8 GEMM's block tiles (k-tile 64 = one packed block) and its rules: 128-row blocks
    when they fill the SMs, else 64; K split (ordered partial sums) when under 3/4 of the SMs get a block."""
    d = dispatch()
    assert d.int4_gemm_block_m(m, n, H100_SMS) == block_m
    assert d.int4_gemm_splits(m, n, k, H100_SMS) == splits


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize(("n", "k"), [(1024, 4096), (64, 8192), (48, 14336), (4096, 4096), (3, 100)])
def test_int4_gemv_splits_follow_the_int8_rule(m, n, k):
    """The int4 GEMV has the int8 GEMV's geometry (8 warps on 16 rows, 64-k units per warp step), so it splits K
    by the same rule, which keeps every warp busy (test_int8_gemv_splits_keep_every_warp_busy)."""
    d = dispatch()
    n_tiles = d.int4_gemv_n_tiles(m)
    assert d.int4_gemv_blocks_per_step(n_tiles) == d.int8_gemv_chunks_per_step(n_tiles)
    assert d.int4_gemv_splits(n, k, H100_SMS, n_tiles) == d.int8_gemv_splits(n, k, H100_SMS, n_tiles)
