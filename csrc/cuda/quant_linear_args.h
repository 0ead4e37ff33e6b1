#pragma once
// The launch arguments the GEMV and GEMM kernels of both dense quantized ops share (int8_linear:
// Int8GemvArgs, int4_linear: Int4GemvArgs derive from it and add their weight format). Plain C++: the .cu
// files and the torch glue both include it; the glue fills it with quant_linear_args (glue_common.h).
#include "dtypes.h"

namespace fastquant::cuda {

struct QuantLinearArgs {
  const void* x;     // m x k activations (fp16 or bf16), row-major, contiguous
  const void* bias;  // n values of x's dtype, or nullptr
  void* y;           // m x n output, x's dtype
  float* workspace;  // fp32 split-K scratch (GEMV: the op's workspace slices; GEMM: splits) x m x n
  int m, n, k;
  int group_size;      // int8: -1 for per-channel; int4: a positive multiple of 32
  int n_groups;        // ceil(k / group_size), 1 for per-channel
  int num_sms;         // SMs of the device (split-K rule)
  bool x_vector;       // the plan's 16-byte loads of x
  bool deterministic;  // split-K: ordered sum of per-split slices instead of atomics
  DType dtype;         // kBFloat16 or kFloat16
};

}  // namespace fastquant::cuda
