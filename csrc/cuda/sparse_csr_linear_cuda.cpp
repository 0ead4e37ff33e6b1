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
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "cuda/launch_check.h"
#include "cuda/sparse_csr_linear_launch.h"
#include "sparse_linear_contract.h"

namespace fastquant::cuda {
namespace {

constexpr const char* kOp = "fastquant.sparse_csr_linear";

// The kernel reads values and column indices with 16-byte loads: a view that starts mid-allocation gets an
// aligned copy.
at::Tensor aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<std::uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

}  // namespace

at::Tensor sparse_csr_linear_cuda(const at::Tensor& x, const at::Tensor& values,
                                  const at::Tensor& column_indices, const at::Tensor& row_offsets,
                                  const std::optional<at::Tensor>& scales,
                                  const std::optional<at::Tensor>& bias, int64_t in_features,
                                  int64_t group_size) {
  const SparseLinearShape shape = check_sparse_csr_linear(Backend::kCuda, x, values, column_indices,
                                                          row_offsets, scales, bias, in_features, group_size);
  const int64_t m = shape.m, n = shape.n, k = shape.k, n_groups = shape.n_groups;
  const DType xd = shape.x_dtype, vd = shape.values_dtype;
  check_int32_sizes(kOp, m, n, k);

  c10::cuda::CUDAGuard device_guard(x.device());
  const cudaDeviceProp* props = device_props_sm80(kOp);
  at::Tensor y = empty_output(x, n);
  if (output_without_kernel(y, k, bias)) return y;

  const at::Tensor x2 = x.reshape({m, k}).contiguous();
  const at::Tensor v = aligned16(values);
  const at::Tensor ci = aligned16(column_indices);
  const at::Tensor ro = row_offsets.contiguous();
  const at::Tensor s = scales.has_value() ? scales->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();

  SparseCsrLinearArgs args;
  args.x = x2.data_ptr();
  args.values = v.data_ptr();
  args.column_indices = reinterpret_cast<const uint16_t*>(ci.data_ptr<int16_t>());
  args.values_numel = v.numel();
  args.row_offsets = ro.data_ptr<int64_t>();
  args.scales = s.defined() ? s.data_ptr<float>() : nullptr;
  args.bias = b.defined() ? b.data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.m = static_cast<int>(m);
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  // Every column is in group 0 once group_size >= K (K <= 65536): any larger group_size is clamped to fit an
  // int.
  args.group_size = static_cast<int>(group_size < (int64_t{1} << 20) ? group_size : (int64_t{1} << 20));
  args.n_groups = static_cast<int>(n_groups);
  args.max_smem_bytes = static_cast<int>(props->sharedMemPerBlockOptin);
  args.num_sms = props->multiProcessorCount;
  args.x_dtype = xd;
  args.values_dtype = vd;
  check_launch(launch_sparse_csr_linear(args, at::cuda::getCurrentCUDAStream()),
               "fastquant.sparse_csr_linear", m, n, k);
  return y;
}

TORCH_LIBRARY_IMPL(fastquant, CUDA, m) { m.impl("sparse_csr_linear", &sparse_csr_linear_cuda); }

}  // namespace fastquant::cuda
