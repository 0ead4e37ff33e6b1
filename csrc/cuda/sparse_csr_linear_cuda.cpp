// Torch glue for fastquant::sparse_csr_linear on CUDA (csr16 weights): checks the arguments (same rules and
// wording as python/fastquant/kernels/ops.py check_sparse_csr_linear_args) and launches the kernel of
// sparse_csr_linear.cu on the current stream of x's device. Compiled only when building against a CUDA torch.
//
// The contents of row_offsets and column_indices are not checked here (that needs a device-to-host copy: a
// sync per call, and no CUDA-graph capture); the kernel clamps every row to [0, values.numel()) and skips
// column indices >= in_features, so inconsistent contents give wrong numbers but never an out-of-bounds
// read. The Python reference path checks them (ops.check_sparse_csr_linear_contents).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "cuda/glue_common.h"
#include "cuda/launch_check.h"
#include "cuda/sparse_csr_linear_launch.h"
#include "sparse_linear_contract.h"

namespace fastquant::cuda {
namespace {

constexpr const char* kOp = "fastquant.sparse_csr_linear";

// c.positions: the column indices.
at::Tensor sparse_csr_linear_cuda(const SparseLinearCall& c) {
  const int64_t m = c.shape.m, n = c.shape.n, k = c.shape.k;
  check_int32_sizes(kOp, m, n, k);

  c10::cuda::CUDAGuard device_guard(c.x.device());
  const cudaDeviceProp* props = device_props_sm80(kOp);
  at::Tensor y = empty_output(c.x, n);
  if (output_without_kernel(y, k, c.bias)) return y;

  const SparseOperands o = sparse_operands(c);
  // The kernel reads column indices with 16-byte loads, as it reads values.
  const at::Tensor ci = contiguous_aligned16(c.positions);
  // Every column is in group 0 once group_size >= K (K <= 65536): any larger group_size is clamped to fit an
  // int.
  const int64_t group = c.group_size < (int64_t{1} << 20) ? c.group_size : (int64_t{1} << 20);
  SparseCsrLinearArgs args;
  set_sparse_args(args, c.shape, o, y, group, props->sharedMemPerBlockOptin, props->multiProcessorCount);
  args.column_indices = reinterpret_cast<const uint16_t*>(ci.data_ptr<int16_t>());
  check_launch(launch_sparse_csr_linear(args, at::cuda::getCurrentCUDAStream()), kOp, m, n, k);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastquant, CUDA, m) { impl_sparse_csr_linear<Backend::kCuda, sparse_csr_linear_cuda>(m); }

}  // namespace fastquant::cuda
