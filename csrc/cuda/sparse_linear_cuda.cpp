// Torch glue for fastquant::sparse_linear on CUDA (bitmap16 weights): checks the arguments (same rules and
// wording as python/fastquant/kernels/ops.py check_sparse_linear_args), picks a kernel from the table in
// sparse_linear_dispatch.h and launches it on the current stream of x's device. Compiled only when building
// against a CUDA torch.
//
// The contents of row_offsets are not checked here (that needs a device-to-host copy: a sync per call, and
// no CUDA-graph capture); the kernels bound every load by values.numel(), so inconsistent offsets give wrong
// numbers but never an out-of-bounds read. The Python reference path checks them.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "cuda/launch_check.h"
#include "cuda/sparse_linear_dispatch.h"
#include "cuda/sparse_linear_launch.h"
#include "sparse_linear_contract.h"

namespace fastquant::cuda {

namespace {
std::atomic<int64_t> g_sparse_gemv_max_m{kDefaultSparseGemvMaxM};
std::atomic<int64_t> g_sparse_mma_max_m{kDefaultSparseMmaMaxM};
std::atomic<int64_t> g_sparse_smem_limit{0};
}  // namespace

int64_t sparse_gemv_max_m() { return g_sparse_gemv_max_m.load(std::memory_order_relaxed); }

void set_sparse_gemv_max_m(int64_t m) { g_sparse_gemv_max_m.store(m < 0 ? 0 : m, std::memory_order_relaxed); }

int64_t sparse_mma_max_m() { return g_sparse_mma_max_m.load(std::memory_order_relaxed); }

void set_sparse_mma_max_m(int64_t m) { g_sparse_mma_max_m.store(m < 0 ? 0 : m, std::memory_order_relaxed); }

int64_t sparse_smem_limit() { return g_sparse_smem_limit.load(std::memory_order_relaxed); }

void set_sparse_smem_limit(int64_t bytes) {
  g_sparse_smem_limit.store(bytes < 0 ? 0 : bytes, std::memory_order_relaxed);
}

namespace {

constexpr const char* kOp = "fastquant.sparse_linear";

at::ScalarType scalar_type_of(DType d) {
  return d == DType::kFloat32 ? at::kFloat : (d == DType::kBFloat16 ? at::kBFloat16 : at::kHalf);
}

bool same_float_dtype(DType v, DType x) {
  return (v == DType::kFloat32 && x == DType::kFloat32) || (v == DType::kBFloat16 && x == DType::kBFloat16) ||
         (v == DType::kFloat16 && x == DType::kFloat16);
}

}  // namespace

at::Tensor sparse_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& masks,
                              const at::Tensor& row_offsets, const std::optional<at::Tensor>& scales,
                              const std::optional<at::Tensor>& bias, int64_t in_features,
                              int64_t group_size) {
  const SparseLinearShape shape = check_sparse_linear(Backend::kCuda, x, values, masks, row_offsets, scales,
                                                      bias, in_features, group_size);
  const int64_t m = shape.m, n = shape.n, k = shape.k, n_groups = shape.n_groups;
  const DType xd = shape.x_dtype, vd = shape.values_dtype;
  check_int32_sizes(kOp, m, n, k);
  // A group of K or more columns is one group per row: clamped to K rounded up to its 16-column mask words,
  // it stays a multiple of 16 and fits the kernels' 32-bit arguments.
  const int64_t group = group_size == -1 ? -1 : std::min(group_size, group_count(k, 16) * 16);

  c10::cuda::CUDAGuard device_guard(x.device());
  const cudaDeviceProp* props = device_props_sm80(kOp);
  at::Tensor y = empty_output(x, n);
  if (output_without_kernel(y, k, bias)) return y;

  const at::Tensor x2 = x.reshape({m, k}).contiguous();
  at::Tensor v = values.contiguous();
  // 16-byte vector loads of the packed values: a view that starts mid-allocation gets an aligned copy.
  if (reinterpret_cast<std::uintptr_t>(v.data_ptr()) % 16 != 0) v = v.clone();
  const at::Tensor mk = masks.contiguous();
  const at::Tensor ro = row_offsets.contiguous();
  const at::Tensor s = scales.has_value() ? scales->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  SparseLinearArgs args;
  args.x = x2.data_ptr();
  args.values = v.data_ptr();
  args.values_numel = v.numel();
  args.masks = reinterpret_cast<const uint16_t*>(mk.data_ptr<int16_t>());
  args.row_offsets = ro.data_ptr<int64_t>();
  args.scales = s.defined() ? s.data_ptr<float>() : nullptr;
  args.bias = b.defined() ? b.data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.m = static_cast<int>(m);
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.group_size = static_cast<int>(group);
  args.n_groups = static_cast<int>(n_groups);
  // sharedMemPerBlockOptin is cudaDevAttrMaxSharedMemoryPerBlockOptin: what a block may have after
  // cudaFuncSetAttribute (99 KiB on sm_86/sm_89, 163 KiB on sm_80, 227 KiB on sm_90).
  int64_t max_smem = static_cast<int64_t>(props->sharedMemPerBlockOptin);
  if (sparse_smem_limit() > 0 && sparse_smem_limit() < max_smem) max_smem = sparse_smem_limit();
  args.max_smem_bytes = static_cast<int>(max_smem);
  args.num_sms = props->multiProcessorCount;
  args.workspace = nullptr;
  args.split_offsets = nullptr;
  args.x_dtype = xd;
  args.values_dtype = vd;

  const SparsePath path =
      choose_sparse_path(m, n, k, vd, xd, group, max_smem, sparse_gemv_max_m(), sparse_mma_max_m());
  if (path == SparsePath::kMma) {
    // Split-K scratch (fresh per call from the caching allocator, so concurrent calls on other streams and
    // CUDA-graph replays never share it): fp32 partial sums and each split's per-row start offsets.
    const int splits = sparse_mma_splits(m, n, k, sparse_mma_block_m(m, vd, max_smem), args.num_sms);
    at::Tensor workspace;
    at::Tensor split_offsets;
    if (splits > 1) {
      workspace = at::empty({splits, m, n}, x.options().dtype(at::kFloat));
      split_offsets = at::empty({n, splits}, x.options().dtype(at::kLong));
      args.workspace = workspace.data_ptr<float>();
      args.split_offsets = split_offsets.data_ptr<int64_t>();
    }
    check_launch(launch_sparse_mma(args, stream), kOp, m, n, k);
    return y;
  }
  if (path != SparsePath::kDensifyCublas) {
    check_launch(launch_sparse_gemv(args, stream), kOp, m, n, k);
    return y;
  }

  // Densify + cuBLAS. Same float dtype, or int8 codes (rounded once as dtype(q * s), like PyTorch's
  // dequantize-then-linear): the dense weight in x's dtype and one GEMM with fp32 accumulation. Mixed float
  // dtypes (e.g. fp32 values, bf16 x): both in fp32, as the op specifies, then one rounding to x's dtype.
  const bool in_x_dtype = vd == DType::kInt8 || same_float_dtype(vd, xd);
  const DType wd = in_x_dtype ? xd : DType::kFloat32;
  at::Tensor weight = at::empty({n, k}, x.options().dtype(scalar_type_of(wd)));
  check_launch(launch_sparse_densify(args, weight.data_ptr(), wd, stream), kOp, m, n, k);
  at::Tensor y2 = y.view({m, n});
  if (in_x_dtype) {
    if (b.defined()) {
      at::addmm_out(y2, b, x2, weight.t());
    } else {
      at::mm_out(y2, x2, weight.t());
    }
  } else {
    at::Tensor yf = at::mm(x2.to(at::kFloat), weight.t());
    if (b.defined()) yf.add_(b.to(at::kFloat));
    y2.copy_(yf);
  }
  return y;
}

TORCH_LIBRARY_IMPL(fastquant, CUDA, m) { m.impl("sparse_linear", &sparse_linear_cuda); }

}  // namespace fastquant::cuda
