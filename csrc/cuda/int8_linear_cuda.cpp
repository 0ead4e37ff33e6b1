// Torch glue for fastquant::int8_linear on CUDA: checks the arguments (same rules and wording as the CPU
// kernel and the fake kernel), picks a kernel from the table in int8_linear_dispatch.h and launches it on
// the current stream of x's device. Compiled only when building against a CUDA torch.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "cuda/cuda_info.h"
#include "cuda/int8_linear_dispatch.h"
#include "cuda/int8_linear_launch.h"
#include "cuda/launch_check.h"

namespace fastquant::cuda {
namespace {

DType act_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "fastquant.int8_linear: x must be float32, bfloat16 or float16, got ",
                  x.scalar_type());
  }
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& bias, int64_t group_size) {
  const DType dtype = act_dtype(x);
  const bool same_device = x.is_cuda() && qweight.device() == x.device() && scales.device() == x.device() &&
                           (!bias.has_value() || bias->device() == x.device());
  TORCH_CHECK(same_device,
              "fastquant.int8_linear (CUDA kernel): all tensors must be on one CUDA device, got x on ",
              x.device(), ", qweight on ", qweight.device(), ", scales on ", scales.device(),
              bias.has_value() ? ", bias on " : "", bias.has_value() ? bias->device().str() : std::string());
  TORCH_CHECK(x.dim() >= 1, "fastquant.int8_linear: x must have at least 1 dimension, got a scalar");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2,
              "fastquant.int8_linear: qweight must be a 2-D int8 tensor (N, K), got ", qweight.scalar_type(),
              " of shape ", qweight.sizes());
  const int64_t n = qweight.size(0);
  const int64_t k = qweight.size(1);
  TORCH_CHECK(x.size(-1) == k, "fastquant.int8_linear: x has ", x.size(-1), " input features (shape ",
              x.sizes(), ") but qweight is (N, K) = (", n, ", ", k, ")");
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "fastquant.int8_linear: scales must be float32, got ",
              scales.scalar_type());
  int64_t n_groups = 1;
  if (group_size == -1) {
    TORCH_CHECK(scales.dim() == 1 && scales.size(0) == n,
                "fastquant.int8_linear: per-channel scales must have shape (N,) = (", n, ",), got ",
                scales.sizes());
  } else {
    TORCH_CHECK(group_size > 0,
                "fastquant.int8_linear: group_size must be -1 (per-channel) or positive, got ", group_size);
    n_groups = (k + group_size - 1) / group_size;
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == n_groups,
                "fastquant.int8_linear: group-wise scales for qweight (", n, ", ", k, ") and group_size ",
                group_size, " must have shape (", n, ", ", n_groups, "), got ", scales.sizes());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "fastquant.int8_linear: bias dtype ",
                bias->scalar_type(), " must match x dtype ", x.scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "fastquant.int8_linear: bias must have shape (", n,
                ",), got ", bias->sizes());
  }

  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(
      m <= kIntMax && n <= kIntMax && k <= kIntMax && group_size <= kIntMax,
      "fastquant.int8_linear (CUDA kernel): M, N, K and group_size must fit in 32 bits, got (M, N, K) = (", m,
      ", ", n, ", ", k, "), group_size ", group_size);

  c10::cuda::CUDAGuard device_guard(x.device());
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  // bf16 mma.sync and cp.async need sm_80; the kernels are compiled for sm_80 and sm_90 only.
  TORCH_CHECK(props->major >= 8,
              "fastquant.int8_linear (CUDA kernel): needs a GPU of compute capability 8.0 or "
              "newer, got ",
              props->name, " (", props->major, ".", props->minor, ")");
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = n;
  at::Tensor y = at::empty(out_sizes, x.options());
  if (y.numel() == 0) return y;
  if (k == 0) return bias.has_value() ? y.copy_(bias->expand_as(y)) : y.zero_();

  at::Tensor x2 = x.reshape({m, k}).contiguous();
  const at::Tensor w = qweight.contiguous();
  const at::Tensor s = scales.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Int8Plan plan = plan_int8(m, n, k, group_size, dtype, aligned16(x2.data_ptr()),
                                  aligned16(w.data_ptr()), gemv_max_m(), gemm_max_m());
  constexpr const char* kOp = "fastquant.int8_linear";

  if (plan.path == Int8Path::kDequantCublas) {
    // cuBLAS on the weight dequantized to x's dtype (fp32 accumulation in cuBLAS; for fp32 x, TF32 only if
    // the user allowed it through torch.backends.cuda.matmul.allow_tf32).
    at::Tensor weight = at::empty({n, k}, x.options());
    check_launch(
        launch_int8_dequantize(w.data_ptr<int8_t>(), s.data_ptr<float>(), weight.data_ptr(),
                               static_cast<int>(n), static_cast<int>(k), static_cast<int>(group_size),
                               static_cast<int>(n_groups), dtype, plan.w_vector, stream),
        kOp, m, n, k);
    at::Tensor y2 = y.view({m, n});
    if (b.defined()) {
      at::addmm_out(y2, b, x2, weight.t());
    } else {
      at::mm_out(y2, x2, weight.t());
    }
    return y;
  }

  // A fresh allocation of the caching allocator is 16-byte aligned (e.g. x sliced 1 element in).
  if (plan.copy_x) x2 = x2.clone();
  const int num_sms = props->multiProcessorCount;
  const bool gemm = plan.path == Int8Path::kGemmMma;
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  // Split-K scratch, M x N fp32 slices: the GEMM's one per split; the GEMV's one for its atomics or, when
  // deterministic, one per split. Fresh per call: concurrent streams and CUDA-graph replays never share it.
  int slices = 0;
  if (gemm) {
    const int splits = int8_gemm_splits(m, n, k, num_sms);
    slices = splits > 1 ? splits : 0;
  } else {
    slices = int8_gemv_workspace_slices(int8_gemv_splits(n, k, num_sms, int8_gemv_n_tiles(plan.path)),
                                        deterministic);
  }
  at::Tensor workspace;
  if (slices > 0) workspace = at::empty({slices, m, n}, x.options().dtype(at::kFloat));
  Int8GemvArgs args;
  args.x = x2.data_ptr();
  args.w = w.data_ptr<int8_t>();
  args.scales = s.data_ptr<float>();
  args.bias = b.defined() ? b.data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.workspace = workspace.defined() ? workspace.data_ptr<float>() : nullptr;
  args.m = static_cast<int>(m);
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.group_size = static_cast<int>(group_size);
  args.n_groups = static_cast<int>(n_groups);
  args.num_sms = num_sms;
  args.w_vector = plan.w_vector;
  args.x_vector = plan.x_vector;
  args.deterministic = deterministic;
  args.dtype = dtype;
  args.path = plan.path;
  check_launch(gemm ? launch_int8_gemm_mma(args, stream) : launch_int8_gemv_mma(args, stream), kOp, m, n, k);
  return y;
}

TORCH_LIBRARY_IMPL(fastquant, CUDA, m) { m.impl("int8_linear", &int8_linear_cuda); }

}  // namespace fastquant::cuda
