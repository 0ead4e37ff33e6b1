#pragma once
// The argument contract of fastquant::int8_linear, shared by its CPU glue (cpu/int8_linear.cpp) and CUDA glue
// (cuda/int8_linear_cuda.cpp); python/fastquant/kernels/ops.py (check_int8_linear_args) words it alike.
#include <ATen/ATen.h>

#include <optional>

#include "op_contract.h"

namespace fastquant {

// A checked int8_linear problem: y (M x N) = x (M x K) @ dequantized qweight (N x K)^T.
struct Int8LinearShape {
  int64_t m, n, k;
  int64_t group_size;  // as passed: -1 per channel, else > 0 (may exceed K)
  int64_t n_groups;    // columns of scales (1 per channel)
  DType x_dtype;
};

inline Int8LinearShape check_int8_linear(Backend backend, const at::Tensor& x, const at::Tensor& qweight,
                                         const at::Tensor& scales, const std::optional<at::Tensor>& bias,
                                         int64_t group_size) {
  constexpr const char* kPrefix = "fastquant.int8_linear:";
  check_devices("fastquant.int8_linear", backend,
                {{"x", &x}, {"qweight", &qweight}, {"scales", &scales}, {"bias", optional_arg(bias)}});
  const DType x_dtype = check_activations(kPrefix, x);
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, kPrefix,
              " qweight must be a 2-D int8 tensor (N, K), got ", py_dtype(qweight.scalar_type()),
              " of shape ", py_shape(qweight.sizes()));
  const int64_t n = qweight.size(0);
  const int64_t k = qweight.size(1);
  TORCH_CHECK(x.size(-1) == k, kPrefix, " x has ", x.size(-1), " input features (shape ", py_shape(x.sizes()),
              ") but qweight is (N, K) = (", n, ", ", k, ")");
  check_group_size(kPrefix, group_size, 1);
  const int64_t n_groups = check_scales(kPrefix, scales, "qweight", n, k, group_size);
  check_bias(kPrefix, x, bias, n);
  return {activation_rows(x), n, k, group_size, n_groups, x_dtype};
}

}  // namespace fastquant
