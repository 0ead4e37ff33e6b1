#pragma once
// Which CUDA kernel fastquant::sparse_linear (bitmap16 weight, see python/fastquant/reference.py) runs for a
// problem. Plain C++ (no CUDA, no torch headers): the torch glue (sparse_linear_cuda.cpp), the launchers and
// the pybind path query (fastquant._C.sparse_linear_cuda_path) all read this one table.
#include <cstdint>

#include "cuda/int8_linear_dispatch.h"  // DType (activation dtype codes)

namespace fastquant::cuda {

// Value dtype codes of the bitmap16 format (float values are the layer's weight; int8 values are codes
// with fp32 scales, as in int8_linear).
enum class SparseValues : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt8 = 3 };

enum class SparsePath : int {
  kGemv,           // one warp per weight row, values streamed once, fp32 FMA (M <= 16, one launch)
  kGemvTiled,      // the same kernel once per 16 rows of x (16 < M <= sparse_gemv_max_m)
  kDensifyCublas,  // unpack the whole weight into a dense temporary, then cuBLAS (at::mm / at::addmm)
};

// Decode kernel geometry. A warp step covers 32 chunks of 16 columns (one mask word per lane, 512 columns):
// the mask loads are one coalesced 64-byte access and the warp's packed values for the step are one
// contiguous range, read with 16-byte loads.
inline constexpr int kSparseStepChunks = 32;
inline constexpr int kSparseStepCols = kSparseStepChunks * 16;
inline constexpr int kSparseMaxTileM = 16;  // x rows per launch (fp32 accumulators per lane)

// GUESSED (never measured: written on a machine without a GPU); re-measure with
// benchmarks/bench_gpu_sparse.py and move it. Above 16 rows the GEMV is relaunched per 16 rows: every
// launch re-reads the format (from L2 when it fits: 50 MB on H100) and the fp32 FMA work grows with M,
// while densify + cuBLAS pays a dense write + read of the weight (4 bytes per weight for bf16) once and then
// runs on tensor cores. At 50% density the two cost about the same near M = 64; at 90% sparsity the tiled
// GEMV stays ahead longer, at 0% sparsity it falls behind sooner.
inline constexpr int64_t kDefaultSparseGemvMaxM = 64;

inline bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// The GEMV looks up a group scale per 16-column chunk with a shift (chunk >> log2(G / 16)): power-of-two
// group sizes (32..256 in practice); other multiples of 16 are exact on the densify path.
inline bool sparse_gemv_group_ok(int64_t group_size) {
  return group_size == -1 || (group_size >= 16 && group_size % 16 == 0 && is_power_of_two(group_size));
}

inline SparsePath choose_sparse_path(int64_t m, int64_t n, int64_t k, SparseValues values, DType x_dtype,
                                     int64_t group_size, int64_t gemv_max_m = kDefaultSparseGemvMaxM) {
  (void)n;
  (void)k;
  (void)x_dtype;
  if (values == SparseValues::kInt8 && !sparse_gemv_group_ok(group_size)) return SparsePath::kDensifyCublas;
  if (m <= kSparseMaxTileM && m <= gemv_max_m) return SparsePath::kGemv;
  if (m <= gemv_max_m) return SparsePath::kGemvTiled;
  return SparsePath::kDensifyCublas;
}

// x rows the GEMV kernel is instantiated for: M padded to 1, 2, 4, 8 or 16 (fp32 accumulators per lane and
// the x row stride in shared memory; float4 loads of x from 4 rows up).
inline int sparse_gemv_tile_m(int64_t m) {
  if (m <= 1) return 1;
  if (m <= 2) return 2;
  if (m <= 4) return 4;
  if (m <= 8) return 8;
  return 16;
}

inline const char* sparse_path_name(SparsePath path, int64_t m) {
  switch (path) {
    case SparsePath::kGemv:
      switch (sparse_gemv_tile_m(m)) {
        case 1:
          return "cuda_sparse_gemv_m1";
        case 2:
          return "cuda_sparse_gemv_m2";
        case 4:
          return "cuda_sparse_gemv_m4";
        case 8:
          return "cuda_sparse_gemv_m8";
        default:
          return "cuda_sparse_gemv_m16";
      }
    case SparsePath::kGemvTiled:
      return "cuda_sparse_gemv_tiled";
    case SparsePath::kDensifyCublas:
      return "cuda_sparse_densify_cublas";
  }
  return "unknown";
}

// Run-time cap of the GEMV (default kDefaultSparseGemvMaxM; 0: always densify + cuBLAS). Defined in
// sparse_linear_cuda.cpp.
int64_t sparse_gemv_max_m();
void set_sparse_gemv_max_m(int64_t m);

}  // namespace fastquant::cuda
