#pragma once
// Which CUDA kernel fastquant::sparse_linear (bitmap16 weight, see python/fastquant/kernels/reference.py)
// runs for a problem. Plain C++ (no CUDA, no torch headers): the torch glue (sparse_linear_cuda.cpp), the
// launchers and the pybind path query (fastquant._C.cuda_dispatch.sparse_path) all read this one table.
#include <cstdint>

#include "cuda/dispatch_common.h"
#include "dtypes.h"

namespace fastquant::cuda {

// Value dtype codes of the bitmap16 format (float values are the layer's weight; int8 values are codes
enum class SparsePath : int {
  kGemv,       // one warp per weight row, values streamed once, fp32 FMA (M <= 16, one launch)
  kGemvTiled,  // the same kernel once per 16 rows of x (16 < M <= sparse_gemv_max_m; fp32 x, or mma capped)
  kDensifyCublas,  // unpack the whole weight into a dense temporary, then cuBLAS (at::mm / at::addmm)
  kMma,            // tensor-core GEMM on weight tiles densified in shared memory (bf16/fp16 x, M > 16)
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

// Tensor-core path (sparse_linear_mma.cuh). GUESSED (never measured: written on a machine without a GPU);
// re-measure with benchmarks/bench_gpu_sparse.py (its mma / densify columns) and move it.
// - 16 < M <= kDefaultSparseMmaMaxM, bf16/fp16 x: the mma path. Each block densifies a 128-row x 64-column
//   weight tile into shared memory and runs mma.sync m16n8k16 on it, so the format is read once per 128 x
//   rows (no dense temporary: densify + cuBLAS writes and re-reads 2 bytes per weight, ~17 us for 4096 x 4096
//   on an H100) and the multiply is on tensor cores (the tiled GEMV does fp32 FMAs on CUDA cores).
// - M > kDefaultSparseMmaMaxM: densify + cuBLAS. The mma path does the dense multiply on the densified tiles
//   (unstructured zeros cannot be skipped by a 16 x 16 x 16 tensor-core step), re-densifies the weight for
//   every 128 x rows, and mma.sync reaches only part of the wgmma peak that cuBLAS uses on sm_90; once M is
//   large the one-off densify pass of the cuBLAS path is the cheaper overhead. Predicted crossover on H100
//   around M = 512 at any sparsity (the mma path's cost does not shrink with sparsity once compute-bound);
//   on A100 (no wgmma) later. Neither path can beat dense F.linear there: both do dense work plus a densify.
// - fp32 x keeps the GEMV / densify + cuBLAS paths: tensor cores would round x (tf32 or bf16), which the
//   fp32 spec does not allow.
inline constexpr int64_t kDefaultSparseMmaMaxM = 512;

// mma geometry (shared by the kernel, the path choice, the glue's workspace sizing and the split rule):
// blocks of 128 weight rows x block_m x rows, 256 threads, k-tiles of 64 columns (4 mask chunks), x staged
// in a 3-deep cp.async ring.
inline constexpr int kSparseMmaTileN = 128;
inline constexpr int kSparseMmaTileK = 64;
inline constexpr int kSparseMmaThreads = 256;
inline constexpr int kSparseMmaXStages = 3;

// Values per 16-byte unit of the packed values.
FASTQUANT_HOST_DEVICE constexpr int sparse_values_per_unit(DType v) {
  return v == DType::kFloat32 ? 4 : (v == DType::kInt8 ? 16 : 8);
}

// 16-byte units a thread of the mma kernel may need for 32 consecutive values starting anywhere inside a
// unit: fp32 9, 16-bit 5, int8 3.
FASTQUANT_HOST_DEVICE constexpr int sparse_mma_raw_units(DType v) {
  return (32 + 2 * (sparse_values_per_unit(v) - 1)) / sparse_values_per_unit(v);
}

// Dynamic shared memory of one mma block: two densified 128 x 64 A tiles (16-bit), the x ring and the
// thread-private value words. 16-bit values at block_m = 128: 32768 + 49152 + 20480 = 102400 bytes, more
// than the 101376 that sm_86/sm_89 GPUs (RTX 30/40, A10, L4, L40) allow per block.
FASTQUANT_HOST_DEVICE constexpr int sparse_mma_smem_bytes(DType v, int block_m) {
  return 2 * kSparseMmaTileN * kSparseMmaTileK * 2 + kSparseMmaXStages * block_m * kSparseMmaTileK * 2 +
         sparse_mma_raw_units(v) * 4 * kSparseMmaThreads * 4;
}

// x rows per mma block: 32 / 64 / 128 (n=8 mma tiles per warp: 2, 4, 8). Small M takes small blocks so that
// the zero rows of the last tile cost as few mma and shared-memory loads as possible. fp32 values stop at
// 64: their 36 registers of in-flight values per thread and the 64 accumulators of block_m = 128 would spill
// under the 128-register cap of 2 blocks per SM. A block that does not fit the device's opt-in shared memory
// per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) halves; 0 when not even 32 rows fit.
inline int sparse_mma_block_m(int64_t m, DType values, int64_t max_smem_bytes) {
  int bm = m <= 32 ? 32 : (m <= 64 ? 64 : 128);
  if (values == DType::kFloat32 && bm > 64) bm = 64;
  while (bm >= 32 && sparse_mma_smem_bytes(values, bm) > max_smem_bytes) bm /= 2;
  return bm >= 32 ? bm : 0;
}

// gemv_max_m / mma_max_m: run-time caps (fastquant._C.set_sparse_cuda_gemv_max_m / set_sparse_cuda_mma_max_m)
// so that the benchmark can time every path at the same M. max_smem_bytes: the device's opt-in shared memory
// per block; the mma path is taken only when one of its block sizes fits (else the next path in this order).
inline SparsePath choose_sparse_path(int64_t m, int64_t n, int64_t k, DType values, DType x_dtype,
                                     int64_t group_size, int64_t max_smem_bytes,
                                     int64_t gemv_max_m = kDefaultSparseGemvMaxM,
                                     int64_t mma_max_m = kDefaultSparseMmaMaxM) {
  (void)n;
  (void)k;
  const bool gemv_group_ok = values != DType::kInt8 || sparse_gemv_group_ok(group_size);
  if (m <= kSparseMaxTileM && m <= gemv_max_m && gemv_group_ok) return SparsePath::kGemv;
  // The mma kernel looks a scale up per 16-column chunk by counting chunks: any group size that is a multiple
  // of 16 (the glue rejects others).
  if (x_dtype != DType::kFloat32 && m > kSparseMaxTileM && m <= mma_max_m &&
      sparse_mma_block_m(m, values, max_smem_bytes) > 0)
    return SparsePath::kMma;
  if (m <= gemv_max_m && gemv_group_ok) return SparsePath::kGemvTiled;
  return SparsePath::kDensifyCublas;
}

// Split-K: N / 128 x ceil(M / block_m) blocks is 32 for a 4096-row layer at M <= 128, a quarter of an H100's
// 132 SMs, and each SM's share of HBM bandwidth needs its own block to stream it. So K is split until about 2
// blocks per SM (3/4 of the SMs busy is enough: the partial-sum round trip, splits x M x N x 4 bytes mostly
// in L2, costs more than the idle quarter). Each split's per-row start offsets come from a small kernel that
// scans the mask popcounts once (the format has offsets only per row). GUESSED: >= 4 k-tiles per split,
// at most 8 splits.
inline int sparse_mma_splits(int64_t m, int64_t n, int64_t k, int block_m, int num_sms) {
  const int64_t blocks = ((n + kSparseMmaTileN - 1) / kSparseMmaTileN) * ((m + block_m - 1) / block_m);
  return mma_split_k(blocks, (k + kSparseMmaTileK - 1) / kSparseMmaTileK, num_sms);
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
    case SparsePath::kMma:
      return "cuda_sparse_mma";
  }
  return "unknown";
}

// Run-time cap of the GEMV (default kDefaultSparseGemvMaxM; 0: always densify + cuBLAS). Defined in
// sparse_linear_cuda.cpp.
int64_t sparse_gemv_max_m();
void set_sparse_gemv_max_m(int64_t m);

// Run-time cap of the mma path (default kDefaultSparseMmaMaxM; 0: never). Defined in sparse_linear_cuda.cpp.
int64_t sparse_mma_max_m();
void set_sparse_mma_max_m(int64_t m);

// Run-time cap of the shared memory per block that the path choice and the launchers may assume (0, the
// default: the device's opt-in limit), so that a test on an H100 (227 KiB) can take the block sizes and
// fallbacks of a smaller GPU (99 KiB on sm_86/sm_89). Defined in sparse_linear_cuda.cpp.
int64_t sparse_smem_limit();
void set_sparse_smem_limit(int64_t bytes);

}  // namespace fastquant::cuda
