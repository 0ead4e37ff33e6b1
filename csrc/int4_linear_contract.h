#pragma once
// The argument rules of fastquant::int4_linear, in one place for every native kernel (CPU glue
// csrc/cpu/int4_linear.cpp, CUDA glue). Worded exactly as check_int4_linear_args in python/fastquant/ops.py,
// which the fake kernel (what torch.compile traces) and the reference run, so every path refuses the same
// input with the same message. The format itself: python/fastquant/reference.py (int4 section).
//
// Every byte of qweight is a valid pair of codes and codes past K multiply nothing (kernels never read x
// past K), so shapes, dtypes and devices are all there is to check.
#include <ATen/ATen.h>

#include <optional>

namespace fastquant {

// A checked int4_linear problem: x viewed as (m, k), weight (n, k) in row_bytes bytes per row.
struct Int4LinearShape {
  int64_t m = 0, n = 0, k = 0;
  int64_t group_size = 0;  // a positive multiple of 32 (may exceed k: then one group covers the row)
  int64_t n_groups = 0;    // ceil(k / group_size)
  int64_t row_bytes = 0;   // ceil(k / 64) * 32
  at::ScalarType x_dtype = at::kFloat;
  bool has_offsets = false;  // asymmetric: w = s * q + o; symmetric: w = s * (q - 8)
  bool has_bias = false;
};

inline Int4LinearShape check_int4_linear_args(const at::Tensor& x, const at::Tensor& qweight,
                                              const at::Tensor& scales,
                                              const std::optional<at::Tensor>& offsets,
                                              const std::optional<at::Tensor>& bias, int64_t in_features,
                                              int64_t group_size) {
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf,
              "fastquant.int4_linear: x must be float32, bfloat16 or float16, got ", xt);
  TORCH_CHECK(x.dim() >= 1, "fastquant.int4_linear: x must have at least 1 dimension, got a scalar");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2,
              "fastquant.int4_linear: qweight must be a 2-D uint8 tensor (N, ceil(K / 64) * 32), got ",
              qweight.scalar_type(), " of shape ", qweight.sizes());
  TORCH_CHECK(in_features >= 0, "fastquant.int4_linear: in_features must be >= 0, got ", in_features);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0,
              "fastquant.int4_linear: group_size must be a positive multiple of 32, got ", group_size);
  Int4LinearShape s;
  s.n = qweight.size(0);
  s.k = in_features;
  TORCH_CHECK(x.size(-1) == s.k, "fastquant.int4_linear: x has ", x.size(-1), " input features (shape ",
              x.sizes(), ") but in_features is ", s.k);
  s.row_bytes = (s.k + 63) / 64 * 32;
  TORCH_CHECK(qweight.size(1) == s.row_bytes, "fastquant.int4_linear: qweight has ", qweight.size(1),
              " bytes per row but in_features ", s.k, " needs ceil(", s.k, " / 64) * 32 = ", s.row_bytes);
  s.group_size = group_size;
  s.n_groups = (s.k + group_size - 1) / group_size;
  const auto check_group_tensor = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == at::kHalf, "fastquant.int4_linear: ", name, " must be float16, got ",
                t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == s.n && t.size(1) == s.n_groups, "fastquant.int4_linear: ", name,
                " for N = ", s.n, ", in_features ", s.k, " and group_size ", group_size, " must have shape (",
                s.n, ", ", s.n_groups, "), got ", t.sizes());
  };
  check_group_tensor("scales", scales);
  s.has_offsets = offsets.has_value();
  if (s.has_offsets) check_group_tensor("offsets", *offsets);
  s.has_bias = bias.has_value();
  if (s.has_bias) {
    TORCH_CHECK(bias->scalar_type() == xt, "fastquant.int4_linear: bias dtype ", bias->scalar_type(),
                " must match x dtype ", xt);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.n, "fastquant.int4_linear: bias must have shape (",
                s.n, ",), got ", bias->sizes());
  }
  const auto same_device = [&](const at::Tensor& t) { return t.device() == x.device(); };
  TORCH_CHECK(same_device(qweight) && same_device(scales) && (!s.has_offsets || same_device(*offsets)) &&
                  (!s.has_bias || same_device(*bias)),
              "fastquant.int4_linear: all tensors must be on one device, got x on ", x.device(),
              ", qweight on ", qweight.device(), ", scales on ", scales.device(),
              s.has_offsets ? ", offsets on " + offsets->device().str() : std::string(),
              s.has_bias ? ", bias on " + bias->device().str() : std::string());
  s.m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) s.m *= x.size(d);
  s.x_dtype = xt;
  return s;
}

}  // namespace fastquant
