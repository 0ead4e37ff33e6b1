// Torch glue for fastquant::sparse_csr_linear on CUDA (csr16 weights): checks the arguments (same rules and
// wording as python/fastquant/ops.py check_sparse_csr_linear_args) and launches the kernel of
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
#include "sparse_glue.h"

namespace fastquant::cuda {
namespace {

constexpr const char* kPrefix = "fastquant.sparse_csr_linear:";

static_assert(static_cast<int>(DType::kBFloat16) == kCodeBFloat16 &&
                  static_cast<int>(SparseValues::kInt8) == kCodeInt8,
              "sparse_glue.h dtype codes");

std::string optional_device_str(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->device().str() : "-";
}

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
  const DType xd = sparse_act_dtype<DType>(x, kPrefix);
  const auto on_x = [&](const std::optional<at::Tensor>& t) {
    return !t.has_value() || t->device() == x.device();
  };
  const bool same_device = x.is_cuda() && values.device() == x.device() &&
                           column_indices.device() == x.device() && row_offsets.device() == x.device() &&
                           on_x(scales) && on_x(bias);
  TORCH_CHECK(same_device, kPrefix, " (CUDA kernel) all tensors must be on one CUDA device, got x on ",
              x.device(), ", values on ", values.device(), ", column_indices on ", column_indices.device(),
              ", row_offsets on ", row_offsets.device(), ", scales on ", optional_device_str(scales),
              ", bias on ", optional_device_str(bias));
  TORCH_CHECK(x.dim() >= 1, kPrefix, " x must have at least 1 dimension, got a scalar");
  const SparseValues vd = sparse_values_dtype<SparseValues>(values, kPrefix);
  TORCH_CHECK(column_indices.scalar_type() == at::kShort && column_indices.sizes() == values.sizes(), kPrefix,
              " column_indices must be an int16 tensor of the values' shape ", values.sizes(), ", got ",
              column_indices.scalar_type(), " of shape ", column_indices.sizes());
  TORCH_CHECK(row_offsets.scalar_type() == at::kLong && row_offsets.dim() == 1 && row_offsets.numel() >= 1,
              kPrefix, " row_offsets must be a non-empty 1-D int64 tensor (N + 1,), got ",
              row_offsets.scalar_type(), " of shape ", row_offsets.sizes());
  TORCH_CHECK(in_features >= 0 && in_features <= kSparseCsrMaxInFeatures, kPrefix,
              " in_features must be in [0, ", kSparseCsrMaxInFeatures, "] (16-bit column indices), got ",
              in_features);
  const int64_t k = in_features;
  const int64_t n = row_offsets.numel() - 1;
  TORCH_CHECK(x.size(-1) == k, kPrefix, " x has ", x.size(-1), " input features (shape ", x.sizes(),
              ") but in_features is ", k);
  const int64_t n_groups = check_sparse_scales_and_bias(kPrefix, x, values, scales, bias, n, k, group_size);

  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(m <= kIntMax && n <= kIntMax, kPrefix,
              " (CUDA kernel) M and N must fit in 32 bits, got (M, N) = (", m, ", ", n, ")");

  c10::cuda::CUDAGuard device_guard(x.device());
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  // The kernel is compiled for sm_80 and sm_90 only (cp.async-era streaming-load qualifiers).
  TORCH_CHECK(props->major >= 8, kPrefix,
              " (CUDA kernel) needs a GPU of compute capability 8.0 or newer, got ", props->name, " (",
              props->major, ".", props->minor, ")");
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = n;
  at::Tensor y = at::empty(out_sizes, x.options());
  if (y.numel() == 0) return y;
  if (k == 0) return bias.has_value() ? y.copy_(bias->expand_as(y)) : y.zero_();

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
