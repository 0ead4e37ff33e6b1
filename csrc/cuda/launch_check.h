#pragma once
// What every CUDA torch glue checks besides its op's contract (csrc/*_contract.h): the device, the 32-bit
// sizes of the kernels' indexing, and each launcher's LaunchStatus -- a broken precondition and a CUDA error
// both become a RuntimeError that names the op and the problem shape, in fastquant's own words.
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <limits>

#include "cuda/launch_status.h"

namespace fastquant::cuda {

// The current device's properties, refusing GPUs below compute capability 8.0: the kernels are compiled for
// sm_80 and sm_90 only (bf16 mma.sync, cp.async and their streaming-load qualifiers need sm_80).
inline const cudaDeviceProp* device_props_sm80(const char* op) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, op, " (CUDA kernel) needs a GPU of compute capability 8.0 or newer, got ",
              props->name, " (", props->major, ".", props->minor, ")");
  return props;
}

// The kernels index with 32-bit ints.
inline void check_int32_sizes(const char* op, int64_t m, int64_t n, int64_t k) {
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(m <= kIntMax && n <= kIntMax && k <= kIntMax, op,
              " (CUDA kernel) M, N and K must fit in 32 bits, got (M, N, K) = (", m, ", ", n, ", ", k, ")");
}

inline void check_launch(const LaunchStatus& status, const char* op, int64_t m, int64_t n, int64_t k) {
  TORCH_CHECK(status.broken == nullptr, op, " (CUDA kernel) internal error on (M, N, K) = (", m, ", ", n,
              ", ", k, "): the launcher's precondition failed: ", status.broken);
  TORCH_CHECK(status.cuda == cudaSuccess, op, " (CUDA kernel) failed on (M, N, K) = (", m, ", ", n, ", ", k,
              "): ", cudaGetErrorName(status.cuda), ": ", cudaGetErrorString(status.cuda));
}

}  // namespace fastquant::cuda
