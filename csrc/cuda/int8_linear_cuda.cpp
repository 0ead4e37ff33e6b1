// Torch glue for fastquant::int8_linear on CUDA: checks the arguments (same rules and wording as the CPU
// kernel and the fake kernel), picks a kernel from the table in int8_linear_dispatch.h and launches it on
// the current stream of x's device. Compiled only when building against a CUDA torch.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cuda/cuda_info.h"
#include "cuda/glue_common.h"
#include "cuda/int8_linear_dispatch.h"
#include "cuda/int8_linear_launch.h"
#include "cuda/launch_check.h"
#include "int8_activations.h"
#include "int8_linear_contract.h"

namespace fastquant::cuda {

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& bias, int64_t group_size,
                            bool int8_activations) {
  const Int8LinearShape shape = check_int8_linear(Backend::kCuda, x, qweight, scales, bias, group_size);
  const int64_t m = shape.m, n = shape.n, k = shape.k, n_groups = shape.n_groups;
  const DType dtype = shape.x_dtype;
  // A group of K or more columns is one group per row: clamped, it fits the kernels' 32-bit arguments.
  const int64_t group = group_size == -1 ? -1 : std::min(group_size, k);
  constexpr const char* kOp = "fastquant.int8_linear";
  check_int32_sizes(kOp, m, n, k);
  c10::cuda::CUDAGuard device_guard(x.device());
  const cudaDeviceProp* props = device_props_sm80(kOp);
  at::Tensor y = empty_output(x, n);
  if (output_without_kernel(y, k, bias)) return y;

  at::Tensor x2 = x.reshape({m, k}).contiguous();
  // int8_activations: the kernels run on x~ (int8_activations.h, torch ops on the GPU) stored in x's dtype,
  // unless x holds NaN or inf, as int4_linear's CUDA glue does: on a GPU the rounding saves no bandwidth, it
  // keeps the op's meaning the same on every device.
  if (int8_activations && at::isfinite(x2).all().item<bool>()) {
    x2 = int8_activation_round(x2.to(at::kFloat)).to(x.scalar_type());
  }
  const at::Tensor w = qweight.contiguous();
  const at::Tensor s = scales.contiguous();
  const at::Tensor b = contiguous_or_undefined(bias);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Int8Plan plan = plan_int8(m, n, k, group, dtype, aligned16(x2.data_ptr()), aligned16(w.data_ptr()),
                                  gemv_max_m(), gemm_max_m());

  if (plan.path == Int8Path::kDequantCublas) {
    // cuBLAS on the weight dequantized to x's dtype (fp32 accumulation in cuBLAS; for fp32 x, TF32 only if
    // the user allowed it through torch.backends.cuda.matmul.allow_tf32).
    at::Tensor weight = at::empty({n, k}, x.options());
    check_launch(launch_int8_dequantize(w.data_ptr<int8_t>(), s.data_ptr<float>(), weight.data_ptr(),
                                        static_cast<int>(n), static_cast<int>(k), static_cast<int>(group),
                                        static_cast<int>(n_groups), dtype, plan.w_vector, stream),
                 kOp, m, n, k);
    dense_linear_into(y, x2, weight, b);
    return y;
  }

  // A fresh allocation of the caching allocator is 16-byte aligned (e.g. x sliced 1 element in).
  if (plan.copy_x) x2 = x2.clone();
  const bool gemm = plan.path == Int8Path::kGemmMma;
  at::Tensor workspace;
  Int8GemvArgs args;
  static_cast<QuantLinearArgs&>(args) = quant_linear_args(
      *props, x2, b, y, workspace, m, n, k, group, n_groups, plan.x_vector, dtype,
      [&](int num_sms, bool deterministic) {
        return int8_workspace_slices(gemm, m, n, k, num_sms, int8_gemv_n_tiles(plan.path), deterministic);
      });
  args.w = w.data_ptr<int8_t>();
  args.scales = s.data_ptr<float>();
  args.w_vector = plan.w_vector;
  args.path = plan.path;
  check_launch(gemm ? launch_int8_gemm_mma(args, stream) : launch_int8_gemv_mma(args, stream), kOp, m, n, k);
  return y;
}

TORCH_LIBRARY_IMPL(fastquant, CUDA, m) { m.impl("int8_linear", &int8_linear_cuda); }

}  // namespace fastquant::cuda
