// Torch glue for fastquant::sparse_linear on CUDA (bitmap16 weights): checks the arguments (same rules and
// wording as python/fastquant/ops.py check_sparse_linear_args), picks a kernel from the table in
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

#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "cuda/launch_check.h"
#include "cuda/sparse_linear_dispatch.h"
#include "cuda/sparse_linear_launch.h"
#include "sparse_glue.h"

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

constexpr const char* kPrefix = "fastquant.sparse_linear:";

static_assert(static_cast<int>(DType::kBFloat16) == kCodeBFloat16 &&
                  static_cast<int>(SparseValues::kInt8) == kCodeInt8,
              "sparse_glue.h dtype codes");

at::ScalarType scalar_type_of(DType d) {
  return d == DType::kFloat32 ? at::kFloat : (d == DType::kBFloat16 ? at::kBFloat16 : at::kHalf);
}

bool same_float_dtype(SparseValues v, DType x) {
  return (v == SparseValues::kFloat32 && x == DType::kFloat32) ||
         (v == SparseValues::kBFloat16 && x == DType::kBFloat16) ||
         (v == SparseValues::kFloat16 && x == DType::kFloat16);
}

std::string optional_device_str(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->device().str() : "-";
}

}  // namespace

at::Tensor sparse_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& masks,
                              const at::Tensor& row_offsets, const std::optional<at::Tensor>& scales,
                              const std::optional<at::Tensor>& bias, int64_t in_features,
                              int64_t group_size) {
  const DType xd = sparse_act_dtype<DType>(x, kPrefix);
  const auto on_x = [&](const std::optional<at::Tensor>& t) {
    return !t.has_value() || t->device() == x.device();
  };
  const bool same_device = x.is_cuda() && values.device() == x.device() && masks.device() == x.device() &&
                           row_offsets.device() == x.device() && on_x(scales) && on_x(bias);
  TORCH_CHECK(same_device, kPrefix, " (CUDA kernel) all tensors must be on one CUDA device, got x on ",
              x.device(), ", values on ", values.device(), ", masks on ", masks.device(), ", row_offsets on ",
              row_offsets.device(), ", scales on ", optional_device_str(scales), ", bias on ",
              optional_device_str(bias));
  TORCH_CHECK(x.dim() >= 1, kPrefix, " x must have at least 1 dimension, got a scalar");
  const SparseValues vd = sparse_values_dtype<SparseValues>(values, kPrefix);
  TORCH_CHECK(masks.scalar_type() == at::kShort && masks.dim() == 2, kPrefix,
              " masks must be a 2-D int16 tensor (N, ceil(K / 16)), got ", masks.scalar_type(), " of shape ",
              masks.sizes());
  TORCH_CHECK(in_features >= 0, kPrefix, " in_features must be >= 0, got ", in_features);
  const int64_t k = in_features;
  const int64_t n = masks.size(0);
  const int64_t n_chunks = (k + 15) / 16;
  TORCH_CHECK(x.size(-1) == k, kPrefix, " x has ", x.size(-1), " input features (shape ", x.sizes(),
              ") but in_features is ", k);
  TORCH_CHECK(masks.size(1) == n_chunks, kPrefix, " masks has ", masks.size(1),
              " chunks per row but in_features ", k, " needs ceil(", k, " / 16) = ", n_chunks);
  TORCH_CHECK(
      row_offsets.scalar_type() == at::kLong && row_offsets.dim() == 1 && row_offsets.size(0) == n + 1,
      kPrefix, " row_offsets must be an int64 tensor of shape (N + 1,) = (", n + 1, ",), got ",
      row_offsets.scalar_type(), " of shape ", row_offsets.sizes());
  TORCH_CHECK(values.numel() >= 64, kPrefix, " values must end with 64 elements of padding, got ",
              values.numel(), " elements");
  const int64_t n_groups = check_sparse_scales_and_bias(kPrefix, x, values, scales, bias, n, k, group_size);

  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(m <= kIntMax && n <= kIntMax && k <= kIntMax, kPrefix,
              " (CUDA kernel) M, N and K must fit in 32 bits, got (M, N, K) = (", m, ", ", n, ", ", k, ")");

  c10::cuda::CUDAGuard device_guard(x.device());
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  // The kernels are compiled for sm_80 and sm_90 only (cp.async-era streaming-load qualifiers).
  TORCH_CHECK(props->major >= 8, kPrefix,
              " (CUDA kernel) needs a GPU of compute capability 8.0 or newer, got ", props->name, " (",
              props->major, ".", props->minor, ")");
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = n;
  at::Tensor y = at::empty(out_sizes, x.options());
  if (y.numel() == 0) return y;
  if (k == 0) return bias.has_value() ? y.copy_(bias->expand_as(y)) : y.zero_();

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
  args.group_size = static_cast<int>(group_size);
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
      choose_sparse_path(m, n, k, vd, xd, group_size, max_smem, sparse_gemv_max_m(), sparse_mma_max_m());
  constexpr const char* kOp = "fastquant.sparse_linear";
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
  const bool in_x_dtype = vd == SparseValues::kInt8 || same_float_dtype(vd, xd);
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
