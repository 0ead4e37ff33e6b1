// Dequantize an int8 weight to the activation dtype, for the cuBLAS path (M > 64 and fp32 activations).
// out = dtype(float(q) * scale): the rounding PyTorch's (qweight.float() * scales).to(dtype) does, so the
// cuBLAS path computes exactly what "dequantize, then F.linear" would, without the fp32 intermediate (one
// pass: read 1 byte, write 2 or 4 bytes per weight).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cuda_common.cuh"
#include "cuda/int8_linear_launch.h"

namespace fastquant::cuda {
namespace {

// Vector variant: one thread turns 16 weight bytes (one 16-byte load, never straddling a scale group since
// group_size % 16 == 0 and k % 16 == 0) into 16 outputs written as 2 (16-bit) or 4 (fp32) 16-byte stores.
template <typename T>
__global__ void dequant_vec16_kernel(const int8_t* __restrict__ w, const float* __restrict__ scales,
                                     T* __restrict__ out, int64_t n_vec, int k, int group_size,
                                     int n_groups) {
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < n_vec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = v * 16;
    const int64_t row = e / k;
    const int col = static_cast<int>(e - row * k);
    const float s = __ldg(scales + row * n_groups + col / group_size);
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(w + e));
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
    alignas(16) T vals[16];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int8_t b = static_cast<int8_t>((words[i] >> (8 * j)) & 0xFFu);
        vals[4 * i + j] = from_float<T>(static_cast<float>(b) * s);
      }
    }
    const uint4* src = reinterpret_cast<const uint4*>(vals);
    uint4* dst = reinterpret_cast<uint4*>(out + e);
#pragma unroll
    for (int i = 0; i < static_cast<int>(16 * sizeof(T) / 16); ++i) dst[i] = src[i];
  }
}

// Any shape and group size: one element per thread iteration.
template <typename T>
__global__ void dequant_scalar_kernel(const int8_t* __restrict__ w, const float* __restrict__ scales,
                                      T* __restrict__ out, int64_t total, int k, int group_size,
                                      int n_groups) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / k;
    const int col = static_cast<int>(e - row * k);
    out[e] = from_float<T>(static_cast<float>(w[e]) * __ldg(scales + row * n_groups + col / group_size));
  }
}

template <typename T>
cudaError_t launch(const int8_t* w, const float* scales, void* out, int n, int k, int group_size,
                   int n_groups, bool aligned, cudaStream_t stream) {
  const int threads = 256;
  const int64_t total = static_cast<int64_t>(n) * k;
  const int64_t work = aligned ? total / 16 : total;
  // Grid-stride loop; 64K blocks are plenty to fill any GPU and keep the index math in range.
  const int64_t blocks64 = (work + threads - 1) / threads;
  const int blocks = static_cast<int>(blocks64 < 65536 ? blocks64 : 65536);
  if (aligned) {
    dequant_vec16_kernel<T>
        <<<blocks, threads, 0, stream>>>(w, scales, static_cast<T*>(out), work, k, group_size, n_groups);
  } else {
    dequant_scalar_kernel<T>
        <<<blocks, threads, 0, stream>>>(w, scales, static_cast<T*>(out), work, k, group_size, n_groups);
  }
  return cudaGetLastError();
}

}  // namespace

LaunchStatus launch_int8_dequantize(const int8_t* w, const float* scales, void* out, int n, int k,
                                    int group_size, int n_groups, DType dtype, bool aligned,
                                    cudaStream_t stream) {
  if (n <= 0 || k <= 0) return cudaSuccess;
  const int g = group_size == -1 ? k : group_size;
  const int ng = group_size == -1 ? 1 : n_groups;
  return launch_for_float_dtype(dtype, "dequantize takes float32, bfloat16 or float16 outputs", [&](auto t) {
    return LaunchStatus(launch<typename decltype(t)::type>(w, scales, out, n, k, g, ng, aligned, stream));
  });
}

}  // namespace fastquant::cuda
