#pragma once
// Which CUDA kernel fastquant::int8_linear runs for a problem, and the split-K rule of the GEMV kernel.
// Plain C++ (no CUDA, no torch headers): the torch glue, the launchers and the pybind path query
// (fastquant._C.cuda_dispatch.int8_path) all read this one table, so what `fastquant.report` prints is
// what runs.
#include <cstdint>

#include "cuda/dispatch_common.h"
#include "dtypes.h"

namespace fastquant::cuda {

enum class Int8Path : int {
  kGemvMma8,      // tensor-core GEMV, x^T is the n=8 operand: M <= 8
  kGemvMma16,     // same kernel, two n=8 tiles: M <= 16
  kGemvMma32,     // four n=8 tiles: M <= 32
  kGemvMma64,     // eight n=8 tiles: M <= 64
  kGemmMma,       // fused tensor-core GEMM, int8 tiles dequantized in registers (int8_gemm_mma.cu)
  kDequantCublas  // dequantize the weight to x's dtype, then cuBLAS (at::mm / at::addmm)
};

struct Int8PathRow {
  int64_t max_m;  // largest number of activation rows this row of the table takes
  Int8Path path;
};

// The table, by M. ALL THRESHOLDS ARE GUESSED (never measured: written on a machine without a GPU);
// re-measure with benchmarks/bench_gpu_int8.py and move the rows.
// - M <= 64: the weight is the 16-row "A" operand of mma.m16n8k16 and the activations the 8-column "B"
//   operand, so one n=8 tile wastes at most 7/8 of tensor-core work that is nearly free anyway: at M <= 64 a
//   4096x4096 layer needs ~2 GFLOP against ~17 MB of int8 weight, i.e. it is bound by HBM (3.35 TB/s),
//   not by the tensor cores, as long as each weight byte is read exactly once.
// - 64 < M <= gemm_max_m (default 512): with 8+ n-tiles per warp the GEMV's x fragments (re-read from L1
//   for every 16 weight rows) and its mma count become the limit; the fused tiled GEMM reads each int8 weight
//   tile once per 64/128 x rows and skips the bf16 weight write of the cuBLAS path (3 bytes per weight).
// - M > gemm_max_m: compute-bound; cuBLAS (wgmma on sm_90) on a dequantized weight beats an mma.sync GEMM
//   once the dequantize pass is small against the matmul. Guess: crossover around M = 512-1024.
inline constexpr Int8PathRow kInt8PathTable[] = {
    {8, Int8Path::kGemvMma8},
    {16, Int8Path::kGemvMma16},
    {32, Int8Path::kGemvMma32},
    {64, Int8Path::kGemvMma64},
};

// The GEMV kernel gives each lane 16 consecutive k of one weight row, which must share one scale: group
// sizes must be multiples of 16 (32..256 are). Other group sizes take the dequantize path.
inline bool int8_gemv_group_ok(int64_t group_size) { return group_size == -1 || group_size % 16 == 0; }

// Shape part of the "aligned" variants: 16-byte vector loads of every weight row (K % 16 == 0) and scale
// groups made of whole 16-byte segments. The glue also checks that the data pointers are 16-byte aligned.
inline bool int8_shape_aligned(int64_t k, int64_t group_size) {
  return k % 16 == 0 && int8_gemv_group_ok(group_size);
}

// GUESSED default of the largest M the fused GEMM takes (above: dequantize + cuBLAS).
inline constexpr int64_t kDefaultGemmMaxM = 512;

// gemv_max_m / gemm_max_m: run-time caps (fastquant._C.set_cuda_gemv_max_m / set_cuda_gemm_max_m) so the
// benchmark can time every path at the same M; defaults 64 (the whole GEMV table) and kDefaultGemmMaxM.
inline Int8Path choose_int8_path(int64_t m, int64_t n, int64_t k, int64_t group_size, DType dtype,
                                 int64_t gemv_max_m = 64, int64_t gemm_max_m = kDefaultGemmMaxM) {
  (void)n;
  // fp32 activations: tensor cores would round x to tf32 (10-bit mantissa), which breaks the fp32 spec;
  // fp32 is a correctness path, dequantize + fp32 cuBLAS (TF32 off unless the user enabled it).
  if (dtype == DType::kFloat32 || !int8_gemv_group_ok(group_size)) return Int8Path::kDequantCublas;
  if (m <= gemv_max_m) {
    for (const Int8PathRow& row : kInt8PathTable) {
      if (m <= row.max_m) return row.path;
    }
  }
  // The GEMM stages 16-byte chunks with cp.async: aligned shapes only (the glue also checks the pointers).
  if (m <= gemm_max_m && int8_shape_aligned(k, group_size)) return Int8Path::kGemmMma;
  return Int8Path::kDequantCublas;
}

// Number of n=8 activation tiles of the GEMV kernel for a path.
inline int int8_gemv_n_tiles(Int8Path path) {
  switch (path) {
    case Int8Path::kGemvMma8:
      return 1;
    case Int8Path::kGemvMma16:
      return 2;
    case Int8Path::kGemvMma32:
      return 4;
    case Int8Path::kGemvMma64:
      return 8;
    default:
      return 0;
  }
}

// The kernel a problem runs, with the alignment of each operand's loads. The weight is streamed once (its
// 16-byte loads are what keeps HBM busy); x is small and re-read from L1/L2, so a misaligned x costs little
// in element loads and must not turn the weight loads into byte loads.
struct Int8Plan {
  Int8Path path;
  bool w_vector;  // GEMV/GEMM/dequantize: 16-byte loads of the weight (shape aligned, weight 16-byte aligned)
  bool x_vector;  // GEMV: 16-byte loads of x (w_vector and x 16-byte aligned)
  bool copy_x;    // GEMM: x is misaligned, so it is first copied to a fresh (aligned) buffer for cp.async
};

// choose_int8_path, then how each operand is loaded given the data pointers' 16-byte alignment. A weight
// that starts mid-allocation with x aligned is rare (qweight is a parameter of its own): x then takes the
// element loads too, which saves a third instantiation of every GEMV variant.
inline Int8Plan plan_int8(int64_t m, int64_t n, int64_t k, int64_t group_size, DType dtype,
                          bool x_ptr_aligned, bool w_ptr_aligned, int64_t gemv_max_m = 64,
                          int64_t gemm_max_m = kDefaultGemmMaxM) {
  Int8Plan plan;
  plan.path = choose_int8_path(m, n, k, group_size, dtype, gemv_max_m, gemm_max_m);
  plan.w_vector = int8_shape_aligned(k, group_size) && w_ptr_aligned;
  plan.x_vector = plan.w_vector && x_ptr_aligned;
  plan.copy_x = false;
  if (plan.path == Int8Path::kGemmMma) {
    // The GEMM stages both operands with 16-byte cp.async. x (M x K x 2 bytes) is cheap to copy next to the
    // dequantize pass of the cuBLAS path (N x K x 3 bytes); a misaligned weight is not.
    if (!plan.w_vector) {
      plan.path = Int8Path::kDequantCublas;
    } else {
      plan.copy_x = !x_ptr_aligned;
      plan.x_vector = true;
    }
  }
  return plan;
}

inline const char* int8_path_name(const Int8Plan& plan) {
  // Rows: the four GEMV paths (the enum's values 0..3); columns: both operands in 16-byte loads, x in element
  // loads, both in element loads.
  static const char* const kGemv[4][3] = {
      {"cuda_gemv_mma_m8", "cuda_gemv_mma_m8_x_unaligned", "cuda_gemv_mma_m8_unaligned"},
      {"cuda_gemv_mma_m16", "cuda_gemv_mma_m16_x_unaligned", "cuda_gemv_mma_m16_unaligned"},
      {"cuda_gemv_mma_m32", "cuda_gemv_mma_m32_x_unaligned", "cuda_gemv_mma_m32_unaligned"},
      {"cuda_gemv_mma_m64", "cuda_gemv_mma_m64_x_unaligned", "cuda_gemv_mma_m64_unaligned"},
  };
  switch (plan.path) {
    case Int8Path::kGemmMma:
      return plan.copy_x ? "cuda_gemm_mma_x_copied" : "cuda_gemm_mma";
    case Int8Path::kDequantCublas:
      return "cuda_dequant_cublas";
    default:
      return kGemv[static_cast<int>(plan.path)][plan.x_vector ? 0 : (plan.w_vector ? 1 : 2)];
  }
}

// GEMV geometry (shared by the kernel and the split rule).
inline constexpr int kGemvWarps = 8;    // warps per block, each on its own k chunks of the same 16 rows
inline constexpr int kGemvTileN = 16;   // weight rows per block: the M=16 side of mma.m16n8k16
inline constexpr int kGemvChunkK = 64;  // k per warp step: 4 lanes x 16 bytes of one row

// Chunks a warp loads before it uses any (U): 4 with 1-2 n=8 tiles, 2 with more (their accumulators take the
// registers that more loads in flight would need).
FASTQUANT_HOST_DEVICE constexpr int int8_gemv_chunks_per_step(int n_tiles) { return n_tiles <= 2 ? 4 : 2; }

// Split-K: one block per 16 weight rows gives N/16 blocks. When that is fewer than the SMs (small N, e.g.
// a 512x2048 k/v projection), the SMs without a block leave their share of HBM bandwidth unused, so K is
// split across blocks, then a small finalize kernel sums the splits. GUESSED: aim for 2 blocks per SM. A
// block's 8 warps each take U chunks per step, so a split of fewer than 8 * U chunks leaves warps idle
// (N = 1024, K = 4096 at U = 4: 5 splits of 13 chunks keep 4 of 8 warps busy): at most chunks / (8 * U).
inline int int8_gemv_splits(int64_t n, int64_t k, int num_sms, int n_tiles) {
  const int64_t tiles = (n + kGemvTileN - 1) / kGemvTileN;
  const int64_t chunks = (k + kGemvChunkK - 1) / kGemvChunkK;
  if (num_sms <= 0 || tiles >= num_sms) return 1;
  int64_t splits = (2 * static_cast<int64_t>(num_sms) + tiles - 1) / tiles;
  const int64_t most = chunks / (kGemvWarps * int8_gemv_chunks_per_step(n_tiles));
  if (splits > most) splits = most;
  if (splits > 64) splits = 64;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

// M x N fp32 slices of the GEMV's split-K workspace (0: no split). By default the splits are summed with fp32
// atomicAdd into one zeroed slice: no per-split storage, but the blocks finish in any order, so the last bits
// of y change from run to run. Under torch.use_deterministic_algorithms(True) each split stores its partial
// sums to a slice of its own and the finalize kernel adds the slices in split order: bit-identical runs.
inline int int8_gemv_workspace_slices(int splits, bool deterministic) {
  if (splits <= 1) return 0;
  return deterministic ? splits : 1;
}

// Fused GEMM geometry. Block tiles are (block_m) x 128 with k-tiles of 64. 128-row blocks reuse each
// dequantized weight fragment for 64 x rows per warp; when they would leave SMs idle (fewer blocks than
// SMs), 64-row blocks. If even then fewer than 3/4 of the SMs get a block (e.g. M = 128 on a 4096-wide layer:
// 64 blocks for 132 SMs), K is split (aiming at 2 blocks per SM): each split writes its fp32 partial tile to
// a workspace [splits][M][N] with plain stores and a finalize kernel sums them in a fixed order
// (deterministic, no zeroing). GUESSED: at least 4 k-tiles per split, at most 8 splits.
inline constexpr int kGemmTileN = 128;
inline constexpr int kGemmTileK = 64;

inline int int8_gemm_block_m(int64_t m, int64_t n, int num_sms) {
  const int64_t blocks128 = ((n + kGemmTileN - 1) / kGemmTileN) * ((m + 127) / 128);
  return blocks128 >= num_sms ? 128 : 64;
}

inline int int8_gemm_splits(int64_t m, int64_t n, int64_t k, int num_sms) {
  const int block_m = int8_gemm_block_m(m, n, num_sms);
  const int64_t blocks = ((n + kGemmTileN - 1) / kGemmTileN) * ((m + block_m - 1) / block_m);
  return mma_split_k(blocks, (k + kGemmTileK - 1) / kGemmTileK, num_sms);
}

// M x N fp32 slices of split-K scratch a launch needs (0: none): the fused GEMM's one per split (ordered,
// always deterministic), or the GEMV's (int8_gemv_workspace_slices) for its n=8 tiles.
inline int int8_workspace_slices(bool gemm, int64_t m, int64_t n, int64_t k, int num_sms, int gemv_n_tiles,
                                 bool deterministic) {
  if (gemm) {
    const int splits = int8_gemm_splits(m, n, k, num_sms);
    return splits > 1 ? splits : 0;
  }
  return int8_gemv_workspace_slices(int8_gemv_splits(n, k, num_sms, gemv_n_tiles), deterministic);
}

}  // namespace fastquant::cuda
