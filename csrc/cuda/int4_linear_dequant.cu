// Dequantize a packed int4 weight to the activation dtype, for the cuBLAS path of int4_linear (M past the
// GEMV's table, fp32 activations). out = dtype(w) with w the reference's fp32 dequantization: s * (q - 8)
// (symmetric) or s * q + o (asymmetric; multiply, then add, never fused, as fastquant.kernels.reference and
// gguf's Q4_1 do), so the cuBLAS path computes exactly "dequantize, then F.linear" with one pass over the
// weight: read 0.5 byte (plus the group's scale), write 2 or 4 bytes per weight.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cuda_common.cuh"
#include "cuda/int4_linear_launch.h"

namespace fastquant::cuda {
namespace {

// One thread per 8 packed bytes of a row (bytes 8j .. 8j + 7 of block b): 8 consecutive k in the block's
// first half (low nibbles) and the 8 at k + 32 (high nibbles); each run of 8 lies in one half block, so in
// one group. kVector (K % 8 == 0): a run is all inside K or all past it, and is written with 16-byte stores
// (out rows start at multiples of 16 bytes).
template <typename T, bool kAsym, bool kVector>
__global__ void int4_dequant_kernel(const uint8_t* __restrict__ w, const __half* __restrict__ scales,
                                    const __half* __restrict__ offsets, T* __restrict__ out, int64_t segments,
                                    int k, int row_segments, int group_size, int n_groups) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < segments;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / row_segments;
    const int seg = static_cast<int>(e - row * row_segments);
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(w) + e);
    const uint32_t words[2] = {q.x, q.y};
    const int k_lo = (seg / 4) * 64 + (seg % 4) * 8;  // block seg / 4, bytes 8 (seg % 4) ..
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k0 = k_lo + 32 * h;
      if (k0 >= k) break;
      const int64_t gi = row * n_groups + k0 / group_size;
      const float s = __half2float(scales[gi]);
      const float o = kAsym ? __half2float(offsets[gi]) : 0.f;
      alignas(16) T vals[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const uint32_t code = (words[i / 4] >> (8 * (i % 4) + 4 * h)) & 0xFu;
        const float v = kAsym ? __fadd_rn(__fmul_rn(s, static_cast<float>(code)), o)
                              : __fmul_rn(s, static_cast<float>(static_cast<int>(code) - 8));
        vals[i] = from_float<T>(v);
      }
      T* dst = out + row * k + k0;
      if constexpr (kVector) {
        const uint4* src = reinterpret_cast<const uint4*>(vals);
#pragma unroll
        for (int i = 0; i < static_cast<int>(8 * sizeof(T) / 16); ++i)
          reinterpret_cast<uint4*>(dst)[i] = src[i];
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (k0 + i < k) dst[i] = vals[i];
        }
      }
    }
  }
}

template <typename T, bool kAsym>
cudaError_t launch(const uint8_t* w, const __half* scales, const __half* offsets, void* out, int n, int k,
                   int group_size, int n_groups, cudaStream_t stream) {
  const int threads = 256;
  const int row_segments = (k + 63) / 64 * 4;
  const int64_t segments = static_cast<int64_t>(n) * row_segments;
  // Grid-stride loop; 64K blocks are plenty to fill any GPU and keep the index math in range.
  const int64_t blocks64 = (segments + threads - 1) / threads;
  const int blocks = static_cast<int>(blocks64 < 65536 ? blocks64 : 65536);
  if (k % 8 == 0) {
    int4_dequant_kernel<T, kAsym, true><<<blocks, threads, 0, stream>>>(
        w, scales, offsets, static_cast<T*>(out), segments, k, row_segments, group_size, n_groups);
  } else {
    int4_dequant_kernel<T, kAsym, false><<<blocks, threads, 0, stream>>>(
        w, scales, offsets, static_cast<T*>(out), segments, k, row_segments, group_size, n_groups);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_any(const uint8_t* w, const __half* scales, const __half* offsets, void* out, int n, int k,
                       int group_size, int n_groups, cudaStream_t stream) {
  if (offsets != nullptr) return launch<T, true>(w, scales, offsets, out, n, k, group_size, n_groups, stream);
  return launch<T, false>(w, scales, offsets, out, n, k, group_size, n_groups, stream);
}

}  // namespace

LaunchStatus launch_int4_dequantize(const uint8_t* w, const void* scales, const void* offsets, void* out,
                                    int n, int k, int group_size, int n_groups, DType dtype,
                                    cudaStream_t stream) {
  if (n <= 0 || k <= 0) return cudaSuccess;
  if (group_size <= 0 || group_size % 32 != 0 || n_groups != (k + group_size - 1) / group_size)
    return LaunchStatus::precondition("the int4 dequantize needs a group size that is a multiple of 32");
  if (reinterpret_cast<uintptr_t>(w) % 8 != 0 || reinterpret_cast<uintptr_t>(out) % 16 != 0)
    return LaunchStatus::precondition(
        "the int4 dequantize needs an 8-byte aligned qweight and 16-byte aligned out");
  const auto* s = static_cast<const __half*>(scales);
  const auto* o = static_cast<const __half*>(offsets);
  return launch_for_float_dtype(
      dtype, "the int4 dequantize takes float32, bfloat16 or float16 outputs", [&](auto t) {
        return LaunchStatus(
            launch_any<typename decltype(t)::type>(w, s, o, out, n, k, group_size, n_groups, stream));
      });
}

}  // namespace fastquant::cuda
