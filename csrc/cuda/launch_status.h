#pragma once
// What every launcher returns: the CUDA runtime's error code, or fastquant's own text when the arguments
// break one of the launcher's preconditions. A broken precondition is a bug in the glue that called the
// launcher, not a fault of the device; reported as a CUDA code (cudaErrorInvalidValue, ...) it would read
// like one. Plain C++: the .cu files and the torch glue both include it.
#include <cuda_runtime_api.h>

#include "dtypes.h"

namespace fastquant::cuda {

struct LaunchStatus {
  cudaError_t cuda = cudaSuccess;
  const char* broken = nullptr;  // static text naming the broken precondition, or nullptr

  LaunchStatus() = default;
  // Implicit, so that `return cudaGetLastError();` reads as it always did.
  LaunchStatus(cudaError_t error) : cuda(error) {}
  static LaunchStatus precondition(const char* what) {
    LaunchStatus s;
    s.broken = what;
    return s;
  }
  bool ok() const { return cuda == cudaSuccess && broken == nullptr; }
};

// The launcher of a kernel compiled once per 16-bit activation dtype, picked by args.dtype: bfloat16 or
// float16; any other dtype breaks the precondition `refusal`.
template <typename Args>
LaunchStatus launch_bf16_or_f16(const Args& args, cudaStream_t stream,
                                LaunchStatus (*bf16)(const Args&, cudaStream_t),
                                LaunchStatus (*f16)(const Args&, cudaStream_t), const char* refusal) {
  if (args.dtype == DType::kBFloat16) return bf16(args, stream);
  if (args.dtype == DType::kFloat16) return f16(args, stream);
  return LaunchStatus::precondition(refusal);
}

}  // namespace fastquant::cuda
