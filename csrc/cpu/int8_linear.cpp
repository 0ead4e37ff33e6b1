// Torch glue for fastquant::int8_linear on CPU: checks arguments, then splits output columns across
// torch's intra-op threads (so torch.set_num_threads applies) and runs the kernel for the active ISA.
#include "cpu/int8_linear.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cpu_features.h"

namespace fastquant::cpu {
namespace {

ActDType act_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return ActDType::kFloat32;
    case at::kBFloat16:
      return ActDType::kBFloat16;
    case at::kHalf:
      return ActDType::kFloat16;
    default:
      TORCH_CHECK(false, "fastquant.int8_linear: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

Int8LinearKernel kernel_for(Isa isa) {
  return int8_linear_portable;
}

}  // namespace

const char* int8_linear_cpu_path(int64_t m, int64_t n, int64_t k, int64_t group_size, ActDType dtype) {
  return "cpu_portable";
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& bias, int64_t group_size) {
  const ActDType dtype = act_dtype(x);
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scales.device().is_cpu(),
              "fastquant.int8_linear (CPU kernel): all tensors must be on the CPU, got x on ", x.device(),
              ", qweight on ", qweight.device(), ", scales on ", scales.device());
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
  int64_t effective_group = k;
  if (group_size == -1) {
    TORCH_CHECK(scales.dim() == 1 && scales.size(0) == n,
                "fastquant.int8_linear: per-channel scales must have shape (N,) = (", n, ",), got ",
                scales.sizes());
  } else {
    TORCH_CHECK(group_size > 0, "fastquant.int8_linear: group_size must be -1 (per-channel) or positive, got ",
                group_size);
    n_groups = (k + group_size - 1) / group_size;
    effective_group = group_size;
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == n_groups,
                "fastquant.int8_linear: group-wise scales for qweight (", n, ", ", k, ") and group_size ",
                group_size, " must have shape (", n, ", ", n_groups, "), got ", scales.sizes());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu(), "fastquant.int8_linear: bias must be on the CPU, got ", bias->device());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "fastquant.int8_linear: bias dtype ",
                bias->scalar_type(), " must match x dtype ", x.scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "fastquant.int8_linear: bias must have shape (", n,
                ",), got ", bias->sizes());
  }

  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = n;
  at::Tensor y = at::empty(out_sizes, x.options());
  const int64_t m = x.numel() / std::max<int64_t>(k, 1);
  if (y.numel() == 0) return y;
  if (k == 0) return bias.has_value() ? y.copy_(bias->expand_as(y)) : y.zero_();

  const at::Tensor x2 = x.reshape({m, k}).contiguous();
  const at::Tensor w = qweight.contiguous();
  const at::Tensor s = scales.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  Int8LinearProblem p{x2.data_ptr(), w.data_ptr<int8_t>(), s.data_ptr<float>(),
                      b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), m, n, k, effective_group, n_groups,
                      dtype};
  const Int8LinearKernel kernel = kernel_for(active_isa());
  // Columns are the unit of work: each thread streams a disjoint slice of the weight exactly once.
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) { kernel(p, begin, end); });
  return y;
}

TORCH_LIBRARY_IMPL(fastquant, CPU, m) { m.impl("int8_linear", &int8_linear_cpu); }

}  // namespace fastquant::cpu
