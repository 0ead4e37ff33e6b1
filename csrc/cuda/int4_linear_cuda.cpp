// Torch glue for fastquant::int4_linear on CUDA: checks the arguments (the shared contract of every int4
// kernel, csrc/int4_linear_contract.h, plus the CUDA-only rules), picks a kernel from the table in
// int4_linear_dispatch.h and launches it on the current stream of x's device. Compiled only when building
// against a CUDA torch.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cuda/cuda_info.h"
#include "cuda/glue_common.h"
#include "cuda/int4_linear_dispatch.h"
#include "cuda/int4_linear_launch.h"
#include "cuda/launch_check.h"
#include "int4_linear_contract.h"
#include "int8_activations.h"

namespace fastquant::cuda {
namespace {

constexpr const char* kOp = "fastquant.int4_linear";

}  // namespace

at::Tensor int4_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& bias,
                            int64_t in_features, int64_t group_size, bool int8_activations) {
  // Shapes, dtypes and devices: the rules (and words) every int4_linear kernel shares.
  const Int4LinearShape shape =
      check_int4_linear(Backend::kCuda, x, qweight, scales, offsets, bias, in_features, group_size);
  const DType dtype = shape.x_dtype;
  const int64_t m = shape.m;
  const int64_t n = shape.n;
  const int64_t k = shape.k;
  const int64_t n_groups = shape.n_groups;
  // A group at least as wide as K (rounded up to 32) is one group: same result, and 32-bit in the kernels.
  const int64_t k_up32 = (k + 31) / 32 * 32;
  const int64_t group = group_size < k_up32 ? group_size : (k_up32 > 0 ? k_up32 : 32);

  // The kernels index rows and k in 32 bits (k plus a block of 64 of padding); n * k and m * k products are
  // formed in 64 bits.
  check_int32_sizes(kOp, m, n, k + 64);
  c10::cuda::CUDAGuard device_guard(x.device());
  const cudaDeviceProp* props = device_props_sm80(kOp);
  at::Tensor y = empty_output(x, n);
  if (output_without_kernel(y, k, bias)) return y;

  at::Tensor x2 = x.reshape({m, k}).contiguous();
  // int8_activations: the kernels run on x~ (int8_activations.h, torch ops on the GPU) stored in x's dtype
  // (bf16 and fp16 x: x~ rounded once more, as the kernels take x), unless x holds NaN or inf (they propagate
  // from x as it is). No GPU kernel of its own: on a GPU the rounding saves no bandwidth, it keeps the op's
  // meaning the same on every device.
  if (int8_activations && at::isfinite(x2).all().item<bool>()) {
    x2 = int8_activation_round(x2.to(at::kFloat)).to(x.scalar_type());
  }
  // The kernels load the packed weight in 8-byte pieces of 32-byte rows (ceil(K/64) * 32 bytes).
  const at::Tensor w = contiguous_aligned16(qweight);
  const at::Tensor s = scales.contiguous();
  const at::Tensor o = contiguous_or_undefined(offsets);
  const at::Tensor b = contiguous_or_undefined(bias);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Int4Plan plan =
      plan_int4(m, n, k, group, dtype, aligned16(x2.data_ptr()), int4_gemv_max_m(), int4_gemm_max_m());

  if (plan.path == Int4Path::kDequantCublas) {
    // cuBLAS on the weight dequantized to x's dtype (fp32 accumulation in cuBLAS; for fp32 x, TF32 only if
    // the user allowed it through torch.backends.cuda.matmul.allow_tf32).
    at::Tensor weight = at::empty({n, k}, x.options());
    check_launch(
        launch_int4_dequantize(w.data_ptr<uint8_t>(), s.data_ptr(), o.defined() ? o.data_ptr() : nullptr,
                               weight.data_ptr(), static_cast<int>(n), static_cast<int>(k),
                               static_cast<int>(group), static_cast<int>(n_groups), dtype, stream),
        kOp, m, n, k);
    dense_linear_into(y, x2, weight, b);
    return y;
  }

  // A fresh allocation of the caching allocator is 16-byte aligned (e.g. x sliced 1 element in).
  if (plan.copy_x) x2 = x2.clone();
  const bool gemm = plan.path == Int4Path::kGemmMma;
  at::Tensor workspace;
  Int4GemvArgs args;
  static_cast<QuantLinearArgs&>(args) = quant_linear_args(
      *props, x2, b, y, workspace, m, n, k, group, n_groups, plan.x_vector, dtype,
      [&](int num_sms, bool deterministic) {
        return int4_workspace_slices(gemm, m, n, k, num_sms, int4_gemv_n_tiles(plan.path), deterministic);
      });
  args.w = w.data_ptr<uint8_t>();
  args.scales = s.data_ptr();
  args.offsets = o.defined() ? o.data_ptr() : nullptr;
  args.path = plan.path;
  check_launch(gemm ? launch_int4_gemm_mma(args, stream) : launch_int4_gemv_mma(args, stream), kOp, m, n, k);
  return y;
}

TORCH_LIBRARY_IMPL(fastquant, CUDA, m) { m.impl("int4_linear", &int4_linear_cuda); }

}  // namespace fastquant::cuda
