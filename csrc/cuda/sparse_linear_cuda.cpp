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
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "cuda/glue_common.h"
#include "cuda/launch_check.h"
#include "cuda/sparse_linear_dispatch.h"
#include "cuda/sparse_linear_launch.h"
#include "sparse_linear_contract.h"

namespace fastquant::cuda {

FASTQUANT_DEFINE_RUNTIME_CAP(sparse_gemv_max_m, kDefaultSparseGemvMaxM)
FASTQUANT_DEFINE_RUNTIME_CAP(sparse_mma_max_m, kDefaultSparseMmaMaxM)
FASTQUANT_DEFINE_RUNTIME_CAP(sparse_smem_limit, 0)

namespace {

constexpr const char* kOp = "fastquant.sparse_linear";

at::ScalarType scalar_type_of(DType d) {
  return d == DType::kFloat32 ? at::kFloat : (d == DType::kBFloat16 ? at::kBFloat16 : at::kHalf);
}

bool same_float_dtype(DType v, DType x) {
  return (v == DType::kFloat32 && x == DType::kFloat32) || (v == DType::kBFloat16 && x == DType::kBFloat16) ||
         (v == DType::kFloat16 && x == DType::kFloat16);
}

// c.positions: the mask words.
at::Tensor sparse_linear_cuda(const SparseLinearCall& c) {
  const int64_t m = c.shape.m, n = c.shape.n, k = c.shape.k;
  const DType xd = c.shape.x_dtype, vd = c.shape.values_dtype;
  check_int32_sizes(kOp, m, n, k);
  // A group of K or more columns is one group per row: clamped to K rounded up to its 16-column mask words,
  // it stays a multiple of 16 and fits the kernels' 32-bit arguments.
  const int64_t group = c.group_size == -1 ? -1 : std::min(c.group_size, group_count(k, 16) * 16);

  c10::cuda::CUDAGuard device_guard(c.x.device());
  const cudaDeviceProp* props = device_props_sm80(kOp);
  at::Tensor y = empty_output(c.x, n);
  if (output_without_kernel(y, k, c.bias)) return y;

  const SparseOperands o = sparse_operands(c);
  const at::Tensor mk = c.positions.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // sharedMemPerBlockOptin is cudaDevAttrMaxSharedMemoryPerBlockOptin: what a block may have after
  // cudaFuncSetAttribute (99 KiB on sm_86/sm_89, 163 KiB on sm_80, 227 KiB on sm_90).
  int64_t max_smem = static_cast<int64_t>(props->sharedMemPerBlockOptin);
  if (sparse_smem_limit() > 0 && sparse_smem_limit() < max_smem) max_smem = sparse_smem_limit();
  SparseLinearArgs args;
  set_sparse_args(args, c.shape, o, y, group, max_smem, props->multiProcessorCount);
  args.masks = reinterpret_cast<const uint16_t*>(mk.data_ptr<int16_t>());
  args.workspace = nullptr;
  args.split_offsets = nullptr;

  const SparsePath path =
      choose_sparse_path(m, n, k, vd, xd, group, max_smem, sparse_gemv_max_m(), sparse_mma_max_m());
  if (path == SparsePath::kMma) {
    // Split-K scratch (fresh per call from the caching allocator, so concurrent calls on other streams and
    // CUDA-graph replays never share it): fp32 partial sums and each split's per-row start offsets.
    const int splits = sparse_mma_splits(m, n, k, sparse_mma_block_m(m, vd, max_smem), args.num_sms);
    const at::Tensor workspace = split_k_workspace(splits > 1 ? splits : 0, m, n, c.x);
    at::Tensor split_offsets;
    if (splits > 1) {
      split_offsets = at::empty({n, splits}, c.x.options().dtype(at::kLong));
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
  at::Tensor weight = at::empty({n, k}, c.x.options().dtype(scalar_type_of(wd)));
  check_launch(launch_sparse_densify(args, weight.data_ptr(), wd, stream), kOp, m, n, k);
  if (in_x_dtype) {
    dense_linear_into(y, o.x2, weight, o.bias);
  } else {
    at::Tensor yf = at::mm(o.x2.to(at::kFloat), weight.t());
    if (o.bias.defined()) yf.add_(o.bias.to(at::kFloat));
    y.view({m, n}).copy_(yf);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastquant, CUDA, m) { impl_sparse_linear<Backend::kCuda, sparse_linear_cuda>(m); }

}  // namespace fastquant::cuda
