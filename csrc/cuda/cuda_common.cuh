#pragma once
// Device and launch helpers shared by the CUDA kernels of every op: rounding fp32 to an activation dtype,
// cp.async staging into shared memory, the once-per-device opt-in to more dynamic shared memory than the
// 48 KiB default, and the launch of a kernel template for a run-time float dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>

#include "cuda/launch_status.h"
#include "dtypes.h"

namespace fastquant::cuda {

// fp32 to an activation dtype, rounded to nearest even.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_size = pred ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_size));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// cudaFuncSetAttribute once per kernel and device (not a stream operation: the first call on a device
// normally happens outside CUDA-graph capture, in the warm-up that capture requires anyway).
constexpr int kMaxDevices = 64;

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes, std::atomic<bool> (&done)[kMaxDevices]) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kMaxDevices && done[device].load(std::memory_order_acquire)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && device < kMaxDevices) done[device].store(true, std::memory_order_release);
  return err;
}

// A C++ type as a value, for generic lambdas: `[&](auto t) { using T = typename decltype(t)::type; ... }`.
template <typename T>
struct TypeTag {
  using type = T;
};

// launch(TypeTag<T>{}) with T the CUDA type of a float dtype (float, __nv_bfloat16, __half); any other dtype
// breaks the precondition `refusal`.
template <typename Launch>
LaunchStatus launch_for_float_dtype(DType dtype, const char* refusal, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat32:
      return launch(TypeTag<float>{});
    case DType::kBFloat16:
      return launch(TypeTag<__nv_bfloat16>{});
    case DType::kFloat16:
      return launch(TypeTag<__half>{});
    case DType::kInt8:
      break;
  }
  return LaunchStatus::precondition(refusal);
}

}  // namespace fastquant::cuda
