#pragma once
// Raw-pointer interface between the torch glue (sparse_csr_linear_cuda.cpp) and the CUDA kernel of
// fastquant::sparse_csr_linear (sparse_csr_linear.cu): the .cu file includes no torch header. The launcher
// returns a LaunchStatus (the CUDA error of its launch, or a broken precondition); the glue checks it.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/launch_status.h"
#include "cuda/sparse_linear_dispatch.h"  // DType, DType (csr16 has bitmap16's value dtypes)
#include "formats.h"

namespace fastquant::cuda {

// The one CUDA kernel of sparse_csr_linear (python -m fastquant.info, fastquant.report).
inline constexpr const char* kSparseCsrCudaPath = "cuda_csr_warp_per_row";

struct SparseCsrLinearArgs {
  const void* x;                   // m x k activations (x_dtype), row-major, contiguous
  const void* values;              // kept weights (values dtype), 16-byte aligned
  const uint16_t* column_indices;  // one per value (int16 in torch, read as uint16), 16-byte aligned
  int64_t values_numel;            // elements of values and of column_indices: no load goes past it
  const int64_t* row_offsets;      // n + 1 element offsets into values
  const float* scales;             // int8 values: n (group_size == -1) or n x n_groups; else nullptr
  const void* bias;                // n values of x_dtype, or nullptr
  void* y;                         // m x n output, x_dtype
  int m, n, k;                     // k <= kSparseCsrMaxInFeatures
  int group_size;                  // -1: per-channel (int8 values only); else a positive multiple of 16
  int n_groups;                    // ceil(k / group_size), 1 for per-channel
  int max_smem_bytes;              // the device's opt-in shared memory per block
  int num_sms;                     // SMs of the device (grid sizing)
  DType x_dtype;
  DType values_dtype;
};

// y = x @ W^T (+ bias) for any m >= 1, n >= 1, 1 <= k <= kSparseCsrMaxInFeatures, on `stream`. Entries of a
// row outside [0, values_numel) and column indices >= k are skipped, never read out of bounds: the kernel
// trusts no content of row_offsets or column_indices (checking them would need a device-to-host sync).
LaunchStatus launch_sparse_csr_linear(const SparseCsrLinearArgs& args, cudaStream_t stream);

}  // namespace fastquant::cuda
