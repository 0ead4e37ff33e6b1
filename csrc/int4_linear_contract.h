#pragma once
// The argument rules of fastquant::int4_linear, in one place for every native kernel (CPU glue
// csrc/cpu/int4_linear.cpp, CUDA glue). Worded exactly as check_int4_linear_args in
// python/fastquant/kernels/ops.py, which the fake kernel (what torch.compile traces) and the reference run,
// so every path refuses the same input with the same message. The format itself:
// python/fastquant/kernels/reference.py (int4 section).
//
// Every byte of qweight is a valid pair of codes and codes past K multiply nothing (kernels never read x
// past K), so shapes, dtypes and devices are all there is to check.
#include <ATen/ATen.h>

#include <optional>

#include "op_contract.h"

namespace fastquant {

// A checked int4_linear problem: x viewed as (m, k), weight (n, k) in row_bytes bytes per row.
struct Int4LinearShape {
  int64_t m = 0, n = 0, k = 0;
  int64_t group_size = 0;  // a positive multiple of 32 (may exceed k: then one group covers the row)
  int64_t n_groups = 0;    // ceil(k / group_size)
  int64_t row_bytes = 0;   // ceil(k / 64) * 32
  DType x_dtype = DType::kFloat32;
  bool has_offsets = false;  // asymmetric: w = s * q + o; symmetric: w = s * (q - 8)
  bool has_bias = false;
};

inline Int4LinearShape check_int4_linear(Backend backend, const at::Tensor& x, const at::Tensor& qweight,
                                         const at::Tensor& scales, const std::optional<at::Tensor>& offsets,
                                         const std::optional<at::Tensor>& bias, int64_t in_features,
                                         int64_t group_size) {
  constexpr const char* kPrefix = "fastquant.int4_linear:";
  check_devices("fastquant.int4_linear", backend,
                {{"x", &x},
                 {"qweight", &qweight},
                 {"scales", &scales},
                 {"offsets", optional_arg(offsets)},
                 {"bias", optional_arg(bias)}});
  Int4LinearShape s;
  s.x_dtype = check_activations(kPrefix, x);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2, kPrefix,
              " qweight must be a 2-D uint8 tensor (N, ceil(K / 64) * 32), got ",
              py_dtype(qweight.scalar_type()), " of shape ", py_shape(qweight.sizes()));
  TORCH_CHECK(in_features >= 0, kPrefix, " in_features must be >= 0, got ", in_features);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0, kPrefix,
              " group_size must be a positive multiple of 32, got ", group_size);
  s.n = qweight.size(0);
  s.k = in_features;
  check_in_features(kPrefix, x, s.k);
  s.row_bytes = group_count(s.k, 64) * 32;
  TORCH_CHECK(qweight.size(1) == s.row_bytes, kPrefix, " qweight has ", qweight.size(1),
              " bytes per row but in_features ", s.k, " needs ceil(", s.k, " / 64) * 32 = ", s.row_bytes);
  s.group_size = group_size;
  s.n_groups = group_count(s.k, group_size);
  const auto check_group_tensor = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == at::kHalf, kPrefix, " ", name, " must be float16, got ",
                py_dtype(t.scalar_type()));
    TORCH_CHECK(t.dim() == 2 && t.size(0) == s.n && t.size(1) == s.n_groups, kPrefix, " ", name,
                " for N = ", s.n, ", in_features ", s.k, " and group_size ", group_size, " must have shape (",
                s.n, ", ", s.n_groups, "), got ", py_shape(t.sizes()));
  };
  check_group_tensor("scales", scales);
  s.has_offsets = offsets.has_value();
  if (s.has_offsets) check_group_tensor("offsets", *offsets);
  s.has_bias = bias.has_value();
  check_bias(kPrefix, x, bias, s.n);
  s.m = activation_rows(x);
  return s;
}

}  // namespace fastquant
