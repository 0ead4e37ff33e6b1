#pragma once
// Raw-pointer interface between the torch glue (sparse_linear_cuda.cpp) and the CUDA kernels of
// fastquant::sparse_linear (sparse_linear_*.cu). The .cu files include no torch header: they see these
// structs, device pointers and a cudaStream_t. Every launcher returns a LaunchStatus (the CUDA error of its
// launches, or a broken precondition); the glue checks it.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/launch_status.h"
#include "cuda/sparse_linear_dispatch.h"

namespace fastquant::cuda {

struct SparseLinearArgs {
  const void* x;               // m x k activations (x_dtype), row-major, contiguous
  const void* values;          // packed kept weights (values dtype), 16-byte aligned, then >= 64 of padding
  int64_t values_numel;        // elements of values: no load goes past it, whatever row_offsets say
  const uint16_t* masks;       // n x n_chunks mask words (int16 in torch, read as uint16)
  const int64_t* row_offsets;  // n + 1 element offsets into values
  const float* scales;         // int8 values: n (group_size == -1) or n x n_groups; else nullptr
  const void* bias;            // n values of x_dtype, or nullptr
  void* y;                     // m x n output, x_dtype
  int m, n, k;
  int group_size;      // -1: per-channel (int8 values only)
  int n_groups;        // ceil(k / group_size), 1 for per-channel
  int max_smem_bytes;  // the device's opt-in shared memory per block (GEMV slab, mma block size)
  int num_sms;         // SMs of the device (mma split-K rule)
  // mma path with sparse_mma_splits(m, n, k, block_m, num_sms) > 1 only (else unused, may be nullptr):
  float* workspace;        // splits x m x n fp32 partial sums
  int64_t* split_offsets;  // n x splits: each split's start offset into values, per row
  DType x_dtype;
  DType values_dtype;
};

// Decode GEMV (sparse_linear_gemv.cuh) for 1 <= m <= 16; one file per value dtype.
LaunchStatus launch_sparse_gemv_f32(const SparseLinearArgs& args, cudaStream_t stream);
LaunchStatus launch_sparse_gemv_bf16(const SparseLinearArgs& args, cudaStream_t stream);
LaunchStatus launch_sparse_gemv_f16(const SparseLinearArgs& args, cudaStream_t stream);
LaunchStatus launch_sparse_gemv_i8(const SparseLinearArgs& args, cudaStream_t stream);

// Any m: the GEMV once per 16 rows of x (x and y pointers advanced per tile; all launches on one stream).
LaunchStatus launch_sparse_gemv(const SparseLinearArgs& args, cudaStream_t stream);

// out (n x k, dense, row-major, out_dtype: float32, bfloat16 or float16) = the unpacked weight, int8 values
// times their scales rounded once to out_dtype (the rounding of PyTorch's (q.float() * s).to(dtype)).
// Needs the same alignment of values as the GEMV.
LaunchStatus launch_sparse_densify(const SparseLinearArgs& args, void* out, DType out_dtype,
                                   cudaStream_t stream);

// Tensor-core GEMM on densified weight tiles (sparse_linear_mma.cuh) for x bf16/fp16, any m >= 1 (dispatched
// for m > 16); one file per value dtype. Needs workspace and split_offsets when
// sparse_mma_splits(m, n, k, block_m, num_sms) > 1 and values 16-byte aligned.
LaunchStatus launch_sparse_mma_f32(const SparseLinearArgs& args, cudaStream_t stream);
LaunchStatus launch_sparse_mma_bf16(const SparseLinearArgs& args, cudaStream_t stream);
LaunchStatus launch_sparse_mma_f16(const SparseLinearArgs& args, cudaStream_t stream);
LaunchStatus launch_sparse_mma_i8(const SparseLinearArgs& args, cudaStream_t stream);

// The launcher of a kernel compiled once per values dtype, picked by args.values_dtype: launchers in DType's
// order (float32, bfloat16, float16, int8).
using SparseLauncher = LaunchStatus (*)(const SparseLinearArgs&, cudaStream_t);
inline LaunchStatus launch_for_values(const SparseLinearArgs& args, cudaStream_t stream,
                                      const SparseLauncher (&launchers)[4]) {
  const int v = static_cast<int>(args.values_dtype);
  if (v < 0 || v >= 4) return LaunchStatus::precondition("unknown values dtype code");
  return launchers[v](args, stream);
}

inline LaunchStatus launch_sparse_mma(const SparseLinearArgs& args, cudaStream_t stream) {
  return launch_for_values(
      args, stream,
      {launch_sparse_mma_f32, launch_sparse_mma_bf16, launch_sparse_mma_f16, launch_sparse_mma_i8});
}

}  // namespace fastquant::cuda
