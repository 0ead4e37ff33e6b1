#pragma once
// Raw-pointer interface between the torch glue (int4_linear_cuda.cpp) and the int4 CUDA kernels
// (int4_linear_*.cu). The .cu files include no torch header: they see these structs, device pointers and a
// cudaStream_t. Every launcher returns a LaunchStatus (the CUDA error of its launches, or a broken
// precondition); the glue checks it. The packed format (fastquant.kernels.reference.int4_pack): qweight uint8
// [N, ceil(K/64) * 32]; byte j of 64-k block b holds code(64b + j) in its low nibble and code(64b + 32 + j)
// in its high nibble; codes past K are 0.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/int4_linear_dispatch.h"
#include "cuda/launch_status.h"
#include "cuda/quant_linear_args.h"

namespace fastquant::cuda {

struct Int4GemvArgs : QuantLinearArgs {
  const uint8_t* w;     // n x row_bytes packed codes, contiguous, 16-byte aligned
  const void* scales;   // n x n_groups fp16
  const void* offsets;  // n x n_groups fp16 (asymmetric), or nullptr (symmetric: w = s * (q - 8))
  Int4Path path;        // one of the kGemvMma* rows of the dispatch table (sets the number of n=8 tiles)
};

// The fields the int4 GEMV and GEMM kernel parameters (Int4GemvParams, Int4GemmParams) share, from the
// launch arguments: pointers in the kernels' types, sizes, and the group as 32-column halves (a shift when a
// power of two).
template <typename Params>
void set_int4_params(Params& p, const Int4GemvArgs& a) {
  p.x = static_cast<decltype(p.x)>(a.x);
  p.w = a.w;
  p.scales = static_cast<decltype(p.scales)>(a.scales);
  p.offsets = static_cast<decltype(p.offsets)>(a.offsets);
  p.bias = static_cast<decltype(p.bias)>(a.bias);
  p.y = static_cast<decltype(p.y)>(a.y);
  p.workspace = a.workspace;
  p.m = a.m;
  p.n = a.n;
  p.k = a.k;
  p.row_bytes = (a.k + kInt4BlockK - 1) / kInt4BlockK * kInt4BlockBytes;
  p.n_groups = a.n_groups;
  p.halves_per_group = a.group_size / 32;
  p.group_shift = -1;
  for (int s = 0; s < 31; ++s) {
    if ((1 << s) == p.halves_per_group) p.group_shift = s;
  }
}

// Tensor-core GEMV for m <= 64 (int4_linear_gemv.cuh). dtype must be bf16 or fp16.
LaunchStatus launch_int4_gemv_mma_bf16(const Int4GemvArgs& args, cudaStream_t stream);
LaunchStatus launch_int4_gemv_mma_f16(const Int4GemvArgs& args, cudaStream_t stream);

inline LaunchStatus launch_int4_gemv_mma(const Int4GemvArgs& args, cudaStream_t stream) {
  return launch_bf16_or_f16(args, stream, launch_int4_gemv_mma_bf16, launch_int4_gemv_mma_f16,
                            "the int4 GEMV takes bfloat16 or float16 activations");
}

// Fused tensor-core GEMM (int4_linear_gemm.cu) for the kGemmMma path: same arguments (path and x_vector
// unused; workspace when int4_gemm_splits(m, n, k, num_sms) > 1); x and w 16-byte aligned, K % 8 == 0, dtype
// bf16 or fp16.
LaunchStatus launch_int4_gemm_mma(const Int4GemvArgs& args, cudaStream_t stream);

// out[n][k] = dtype(w(n, k)) for k < K, with w = float(s) * (q - 8) or float(s) * q + float(o) in fp32 (the
// reference's dequantization; multiply, then add, never fused), rounded once to dtype: what
// "int4_dequantize(...).to(dtype)" gives, for the cuBLAS path (M > the GEMV's, fp32 activations). out is a
// fresh n x k allocation of dtype (16-byte aligned); w as in Int4GemvArgs.
LaunchStatus launch_int4_dequantize(const uint8_t* w, const void* scales, const void* offsets, void* out,
                                    int n, int k, int group_size, int n_groups, DType dtype,
                                    cudaStream_t stream);

}  // namespace fastquant::cuda
