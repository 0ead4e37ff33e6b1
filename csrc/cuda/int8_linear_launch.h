#pragma once
// Raw-pointer interface between the torch glue (int8_linear_cuda.cpp) and the CUDA kernels (*.cu). The .cu
// files include no torch header: they only see these structs, device pointers and a cudaStream_t. Every
// launcher returns a LaunchStatus (the CUDA error of its launches, or a broken precondition); the glue
// checks it.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/int8_linear_dispatch.h"
#include "cuda/launch_status.h"
#include "cuda/quant_linear_args.h"

namespace fastquant::cuda {

struct Int8GemvArgs : QuantLinearArgs {
  const int8_t* w;      // n x k int8 weight, row-major, contiguous
  const float* scales;  // n scales (group_size == -1) or n x n_groups
  bool w_vector;        // Int8Plan: 16-byte loads of the weight
  Int8Path path;        // one of the kGemvMma* rows of the dispatch table (sets the number of n=8 tiles)
};

// Tensor-core GEMV for m <= 64 (see int8_gemv_mma.cuh). dtype must be bf16 or fp16.
LaunchStatus launch_int8_gemv_mma_bf16(const Int8GemvArgs& args, cudaStream_t stream);
LaunchStatus launch_int8_gemv_mma_f16(const Int8GemvArgs& args, cudaStream_t stream);

inline LaunchStatus launch_int8_gemv_mma(const Int8GemvArgs& args, cudaStream_t stream) {
  return launch_bf16_or_f16(args, stream, launch_int8_gemv_mma_bf16, launch_int8_gemv_mma_f16,
                            "the int8 GEMV takes bfloat16 or float16 activations");
}

// Fused tensor-core GEMM (int8_gemm_mma.cu) for the kGemmMma path: same arguments (path unused; workspace
// when int8_gemm_splits(m, n, k, num_sms) > 1); needs w_vector and x 16-byte aligned; dtype bf16 or fp16.
LaunchStatus launch_int8_gemm_mma(const Int8GemvArgs& args, cudaStream_t stream);

// out[n][k] = dtype(float(w[n][k]) * scales[n][k / group_size]): the same rounding as PyTorch's
// (qweight.float() * scales).to(dtype). group_size == -1: per-channel. aligned: k % 16 == 0, group_size
// -1 or a multiple of 16, and w 16-byte aligned (out is a fresh allocation).
LaunchStatus launch_int8_dequantize(const int8_t* w, const float* scales, void* out, int n, int k,
                                    int group_size, int n_groups, DType dtype, bool aligned,
                                    cudaStream_t stream);

}  // namespace fastquant::cuda
