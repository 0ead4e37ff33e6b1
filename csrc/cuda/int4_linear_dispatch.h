#pragma once
// Which CUDA kernel fastquant::int4_linear runs for a problem, and the split-K rule of its GEMV. Plain C++
// (no CUDA, no torch headers): the torch glue, the launchers and the pybind path query
// (fastquant._C.cuda_dispatch.int4_path) all read this one table, so what is reported is what runs.
#include <cstdint>

#include "cuda/int8_linear_dispatch.h"

namespace fastquant::cuda {

enum class Int4Path : int {
  kGemvMma8,      // tensor-core GEMV, x^T is the n=8 operand: M <= 8
  kGemvMma16,     // two n=8 tiles: M <= 16
  kGemvMma32,     // four n=8 tiles: M <= 32
  kGemvMma64,     // eight n=8 tiles: M <= 64
  kGemmMma,       // fused tensor-core GEMM, int4 tiles dequantized in registers (int4_linear_gemm.cu)
  kDequantCublas  // dequantize the weight to x's dtype, then cuBLAS (at::mm / at::addmm)
};

// The table, by M. THRESHOLDS ARE GUESSED (written on a machine without a GPU; re-measure with
// benchmarks/bench_gpu_int4.py). Up to M = 64 the int4 weight (0.5 byte per weight + 2 or 4 bytes of scale
// and offset per group) is streamed once and the layer is bound by HBM: ~9 MB for 4096 x 4096 at group 32,
// ~2.7 us at 3.35 TB/s, against ~2 GFLOP at M = 64 that mma.sync does in a few us. Past M = 64 the GEMV's
// mma count and x re-reads grow with M: the fused GEMM reads each packed weight tile once per 64 or 128 x
// rows and skips the dense weight of the cuBLAS path (2.5 bytes per weight written and read back). Past
// gemm_max_m (default: int8's guess, 512) cuBLAS's wgmma on a dequantized weight should beat mma.sync.
inline constexpr int64_t kDefaultInt4GemvMaxM = 64;
inline constexpr int64_t kDefaultInt4GemmMaxM = kDefaultGemmMaxM;

struct Int4PathRow {
  int64_t max_m;  // largest number of activation rows this row of the table takes
  Int4Path path;
};

inline constexpr Int4PathRow kInt4PathTable[] = {
    {8, Int4Path::kGemvMma8},
    {16, Int4Path::kGemvMma16},
    {32, Int4Path::kGemvMma32},
    {64, Int4Path::kGemvMma64},
};

// The GEMV streams whole 64-k blocks (32 bytes per row) and applies each group's scale to the fp32 result of
// one 32-k half block: any group size that is a positive multiple of 32 (the format's rule) keeps a half
// block inside one group, since groups start at multiples of 32 too.
inline bool int4_group_ok(int64_t group_size) { return group_size > 0 && group_size % 32 == 0; }

// gemv_max_m / gemm_max_m: run-time caps (fastquant._C.set_int4_cuda_gemv_max_m / _gemm_max_m) so the
// benchmark can time every path at the same M; defaults kDefaultInt4GemvMaxM and kDefaultInt4GemmMaxM.
inline Int4Path choose_int4_path(int64_t m, int64_t n, int64_t k, int64_t group_size, DType dtype,
                                 int64_t gemv_max_m = kDefaultInt4GemvMaxM,
                                 int64_t gemm_max_m = kDefaultInt4GemmMaxM) {
  (void)n;
  // fp32 activations: tensor cores would round x to tf32/bf16, which breaks the fp32 spec; fp32 is a
  // correctness path, dequantize + fp32 cuBLAS (TF32 off unless the user enabled it).
  if (dtype == DType::kFloat32 || !int4_group_ok(group_size)) return Int4Path::kDequantCublas;
  if (m <= gemv_max_m) {
    for (const Int4PathRow& row : kInt4PathTable) {
      if (m <= row.max_m) return row.path;
    }
  }
  // The GEMM stages x in 16-byte chunks of 8 activations with cp.async: K % 8 == 0 (the glue copies a
  // misaligned x to an aligned buffer).
  if (m <= gemm_max_m && k % 8 == 0) return Int4Path::kGemmMma;
  return Int4Path::kDequantCublas;
}

// Number of n=8 activation tiles of the GEMV kernel for a path (0: not the GEMV): the int8 GEMV's, whose
// paths come in the same order.
static_assert(static_cast<int>(Int4Path::kGemvMma64) == static_cast<int>(Int8Path::kGemvMma64) &&
                  static_cast<int>(Int4Path::kDequantCublas) == static_cast<int>(Int8Path::kDequantCublas),
              "Int4Path lists its paths in Int8Path's order");
inline int int4_gemv_n_tiles(Int4Path path) { return int8_gemv_n_tiles(static_cast<Int8Path>(path)); }

// x in 16-byte loads: 8 consecutive activations of one row per load, so K % 8 == 0 (a load is then all
// inside or all past K) and x 16-byte aligned. qweight rows are 32-byte multiples: the glue copies a weight
// whose data pointer is not 16-byte aligned (a view into a larger buffer; never a module's own parameter), so
// there is a single weight-load variant.
inline bool int4_x_vector(int64_t k, bool x_ptr_aligned) { return k % 8 == 0 && x_ptr_aligned; }

struct Int4Plan {
  Int4Path path;
  bool x_vector;  // GEMV: 16-byte loads of x
  bool copy_x;    // GEMM: x is misaligned, so it is first copied to a fresh (aligned) buffer for cp.async
};

inline Int4Plan plan_int4(int64_t m, int64_t n, int64_t k, int64_t group_size, DType dtype,
                          bool x_ptr_aligned, int64_t gemv_max_m = kDefaultInt4GemvMaxM,
                          int64_t gemm_max_m = kDefaultInt4GemmMaxM) {
  Int4Plan plan;
  plan.path = choose_int4_path(m, n, k, group_size, dtype, gemv_max_m, gemm_max_m);
  plan.x_vector = int4_x_vector(k, x_ptr_aligned);
  // x (M x K x 2 bytes) is cheap to copy next to the dense weight of the cuBLAS path (N x K x 2 bytes).
  plan.copy_x = plan.path == Int4Path::kGemmMma && !x_ptr_aligned;
  if (plan.path == Int4Path::kGemmMma) plan.x_vector = true;
  return plan;
}

inline const char* int4_path_name(const Int4Plan& plan) {
  static const char* const kGemv[4][2] = {
      {"cuda_int4_gemv_mma_m8", "cuda_int4_gemv_mma_m8_x_unaligned"},
      {"cuda_int4_gemv_mma_m16", "cuda_int4_gemv_mma_m16_x_unaligned"},
      {"cuda_int4_gemv_mma_m32", "cuda_int4_gemv_mma_m32_x_unaligned"},
      {"cuda_int4_gemv_mma_m64", "cuda_int4_gemv_mma_m64_x_unaligned"},
  };
  if (plan.path == Int4Path::kDequantCublas) return "cuda_int4_dequant_cublas";
  if (plan.path == Int4Path::kGemmMma)
    return plan.copy_x ? "cuda_int4_gemm_mma_x_copied" : "cuda_int4_gemm_mma";
  return kGemv[static_cast<int>(plan.path)][plan.x_vector ? 0 : 1];
}

// GEMV geometry: the int8 GEMV's (8 warps on 16 weight rows; a warp step takes U whole 64-k blocks, 32 bytes
// per row), so its split-K rule and chunk count per step carry over unchanged: one 64-k block is one int8
// "chunk" of kGemvChunkK = 64.
inline constexpr int kInt4BlockK = 64;      // k per packed block
inline constexpr int kInt4BlockBytes = 32;  // bytes per packed block and row
static_assert(kInt4BlockK == kGemvChunkK, "the int4 GEMV reuses the int8 GEMV's 64-k split-K rule");

FASTQUANT_HOST_DEVICE constexpr int int4_gemv_blocks_per_step(int n_tiles) {
  return int8_gemv_chunks_per_step(n_tiles);
}

inline int int4_gemv_splits(int64_t n, int64_t k, int num_sms, int n_tiles) {
  return int8_gemv_splits(n, k, num_sms, n_tiles);
}

inline int int4_gemv_workspace_slices(int splits, bool deterministic) {
  return int8_gemv_workspace_slices(splits, deterministic);
}

// Fused GEMM geometry: the int8 GEMM's block tiles ((64 or 128) x 128, k-tiles of 64 = one packed block), so
// its block-size and deterministic split-K rules carry over unchanged.
inline int int4_gemm_block_m(int64_t m, int64_t n, int num_sms) { return int8_gemm_block_m(m, n, num_sms); }

inline int int4_gemm_splits(int64_t m, int64_t n, int64_t k, int num_sms) {
  return int8_gemm_splits(m, n, k, num_sms);
}

inline int int4_workspace_slices(bool gemm, int64_t m, int64_t n, int64_t k, int num_sms, int gemv_n_tiles,
                                 bool deterministic) {
  return int8_workspace_slices(gemm, m, n, k, num_sms, gemv_n_tiles, deterministic);
}

}  // namespace fastquant::cuda
