#pragma once
// The torch glue's check of a launcher's LaunchStatus: a broken precondition and a CUDA error both become
// a RuntimeError that names the op and the problem shape, in fastquant's own words.
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/launch_status.h"

namespace fastquant::cuda {

inline void check_launch(const LaunchStatus& status, const char* op, int64_t m, int64_t n, int64_t k) {
  TORCH_CHECK(status.broken == nullptr, op, " (CUDA kernel) internal error on (M, N, K) = (", m, ", ", n,
              ", ", k, "): the launcher's precondition failed: ", status.broken);
  TORCH_CHECK(status.cuda == cudaSuccess, op, " (CUDA kernel) failed on (M, N, K) = (", m, ", ", n, ", ", k,
              "): ", cudaGetErrorName(status.cuda), ": ", cudaGetErrorString(status.cuda));
}

}  // namespace fastquant::cuda
