// Unpack a bitmap16 weight into a dense (N, K) matrix for the cuBLAS path (M > sparse_gemv_max_m, group sizes
// the GEMV does not take), and the per-16-rows driver of the GEMV for M > 16.
//
// Densify: one warp per row, steps of 32 chunks (512 columns). After the warp scan of the mask popcounts,
// lane l writes columns l, l + 32, ... of the step: the value of a kept column is at
// run + offset(chunk) + popc(mask & bits below it), so in every instruction the lanes read consecutive kept
// values and write 32 consecutive outputs (both coalesced). Reads the format once and writes the dense
// weight once: the least traffic an unpack can have.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/sparse_linear_common.cuh"

namespace fastquant::cuda {
namespace {

using sparse_detail::kFullMask;

struct DensifyParams {
  const void* values;
  int64_t values_numel;
  const uint16_t* masks;
  const int64_t* row_offsets;
  const float* scales;  // int8 values only
  void* out;
  int n, k, n_chunks;
  int group_size;  // -1: per-channel
  int n_groups;
  DType out_dtype;
};

constexpr int kDensifyWarps = 8;

template <typename V>
__global__ void __launch_bounds__(kDensifyWarps * 32) sparse_densify_kernel(DensifyParams p) {
  constexpr bool kInt8 = std::is_same_v<V, int8_t>;
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kDensifyWarps + (threadIdx.x >> 5);
  if (n >= p.n) return;  // warp-uniform; no block barrier below
  int64_t run = __ldg(p.row_offsets + n);
  const uint16_t* mrow = p.masks + static_cast<int64_t>(n) * p.n_chunks;
  const float channel_scale = (kInt8 && p.group_size == -1) ? __ldg(p.scales + n) : 1.f;
  const int64_t out_row = static_cast<int64_t>(n) * p.k;

  for (int c0 = 0; c0 < p.n_chunks; c0 += kSparseStepChunks) {
    const int c = c0 + lane;
    const uint32_t mask = c < p.n_chunks ? static_cast<uint32_t>(__ldg(mrow + c)) : 0u;
    const int cnt = __popc(mask);
    const int incl = sparse_detail::warp_inclusive_scan(cnt, lane);
    const int excl = incl - cnt;
    const int total = __shfl_sync(kFullMask, incl, 31);
#pragma unroll 4
    for (int j = 0; j < 16; ++j) {
      const int local = j * 32 + lane;
      const int owner = local >> 4;
      const int bit = local & 15;
      const uint32_t om = __shfl_sync(kFullMask, mask, owner);
      const int oe = __shfl_sync(kFullMask, excl, owner);
      const int col = c0 * 16 + local;
      if (col >= p.k) continue;
      float v = 0.f;
      if ((om >> bit) & 1u) {
        const int64_t idx = run + oe + __popc(om & ((1u << bit) - 1u));
        // Bounded by values.numel() whatever row_offsets says (its contents are not checked on the GPU).
        if (idx >= 0 && idx < p.values_numel) v = sparse_detail::load_value<V>(p.values, idx);
        if constexpr (kInt8) {
          v *= p.group_size == -1
                   ? channel_scale
                   : __ldg(p.scales + static_cast<int64_t>(n) * p.n_groups + col / p.group_size);
        }
      }
      sparse_detail::store_act(p.out, out_row + col, v, p.out_dtype);
    }
    run += total;
  }
}

template <typename V>
cudaError_t launch_densify(const DensifyParams& p, cudaStream_t stream) {
  const int blocks = (p.n + kDensifyWarps - 1) / kDensifyWarps;
  sparse_densify_kernel<V><<<blocks, kDensifyWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

LaunchStatus launch_sparse_densify(const SparseLinearArgs& a, void* out, DType out_dtype,
                                   cudaStream_t stream) {
  if (a.n <= 0 || a.k <= 0) return cudaSuccess;
  DensifyParams p;
  p.values = a.values;
  p.values_numel = a.values_numel;
  p.masks = a.masks;
  p.row_offsets = a.row_offsets;
  p.scales = a.scales;
  p.out = out;
  p.n = a.n;
  p.k = a.k;
  p.n_chunks = (a.k + 15) / 16;
  p.group_size = a.group_size;
  p.n_groups = a.group_size == -1 ? 1 : a.n_groups;
  p.out_dtype = out_dtype;
  switch (a.values_dtype) {
    case DType::kFloat32:
      return launch_densify<float>(p, stream);
    case DType::kBFloat16:
      return launch_densify<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return launch_densify<__half>(p, stream);
    case DType::kInt8:
      if (a.scales == nullptr) return LaunchStatus::precondition("int8 values need scales");
      if (a.group_size != -1 && a.group_size <= 0)
        return LaunchStatus::precondition("the group size must be -1 or positive");
      return launch_densify<int8_t>(p, stream);
  }
  return LaunchStatus::precondition("unknown values dtype code");
}

LaunchStatus launch_sparse_gemv(const SparseLinearArgs& args, cudaStream_t stream) {
  if (args.m <= 0) return LaunchStatus::precondition("the bitmap16 GEMV needs M >= 1");
  const int64_t x_bytes = args.x_dtype == DType::kFloat32 ? 4 : 2;
  // One launch per 16 rows of x (the fp32 accumulators of a lane); every launch streams the whole format
  // again (from L2 when it fits), so this is for moderate M only (see sparse_linear_dispatch.h).
  for (int m0 = 0; m0 < args.m; m0 += kSparseMaxTileM) {
    SparseLinearArgs tile = args;
    tile.m = args.m - m0 < kSparseMaxTileM ? args.m - m0 : kSparseMaxTileM;
    tile.x = static_cast<const char*>(args.x) + static_cast<int64_t>(m0) * args.k * x_bytes;
    tile.y = static_cast<char*>(args.y) + static_cast<int64_t>(m0) * args.n * x_bytes;
    const LaunchStatus status = launch_for_values(
        tile, stream,
        {launch_sparse_gemv_f32, launch_sparse_gemv_bf16, launch_sparse_gemv_f16, launch_sparse_gemv_i8});
    if (!status.ok()) return status;
  }
  return cudaSuccess;
}

}  // namespace fastquant::cuda
