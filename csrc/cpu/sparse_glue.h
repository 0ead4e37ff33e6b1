#pragma once
// Argument rules the CPU glues of sparse_linear (bitmap16) and sparse_csr_linear (csr16) share, worded as
// python/fastquant/ops.py (check_sparse_linear_args, _check_scales_and_bias). Includes torch headers:
// glue files only, never an *_avx2 / *_avx512 kernel file.
#include <ATen/ATen.h>

#include <optional>

#include "cpu/int8_linear.h"
#include "cpu/sparse_linear.h"

namespace fastquant::cpu {

inline ActDType sparse_act_dtype(const at::Tensor& x, const char* prefix) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return ActDType::kFloat32;
    case at::kBFloat16:
      return ActDType::kBFloat16;
    case at::kHalf:
      return ActDType::kFloat16;
    default:
      TORCH_CHECK(false, prefix, " x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

inline SparseValues sparse_values_dtype(const at::Tensor& values, const char* prefix) {
  SparseValues out = SparseValues::kFloat32;
  bool known = true;
  switch (values.scalar_type()) {
    case at::kFloat:
      out = SparseValues::kFloat32;
      break;
    case at::kBFloat16:
      out = SparseValues::kBFloat16;
      break;
    case at::kHalf:
      out = SparseValues::kFloat16;
      break;
    case at::kChar:
      out = SparseValues::kInt8;
      break;
    default:
      known = false;
  }
  TORCH_CHECK(known && values.dim() == 1, prefix,
              " values must be a 1-D float32, bfloat16, float16 or int8 tensor, got ", values.scalar_type(),
              " of shape ", values.sizes());
  return out;
}

// group_size, scales and bias for a weight of n rows and k columns; returns the columns of scales.
inline int64_t check_sparse_scales_and_bias(const char* prefix, const at::Tensor& x, SparseValues vtype,
                                            const at::Tensor& values, const std::optional<at::Tensor>& scales,
                                            const std::optional<at::Tensor>& bias, int64_t n, int64_t k,
                                            int64_t group_size) {
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % 16 == 0), prefix,
              " group_size must be -1 (per-channel) or a positive multiple of 16, got ", group_size);
  int64_t n_groups = 1;
  if (vtype == SparseValues::kInt8) {
    TORCH_CHECK(scales.has_value(), prefix, " int8 values need float32 scales, got None");
    TORCH_CHECK(scales->scalar_type() == at::kFloat, prefix, " scales must be float32, got ",
                scales->scalar_type());
    if (group_size == -1) {
      TORCH_CHECK(scales->dim() == 1 && scales->size(0) == n, prefix,
                  " per-channel scales must have shape (N,) = (", n, ",), got ", scales->sizes());
    } else {
      n_groups = (k + group_size - 1) / group_size;
      TORCH_CHECK(scales->dim() == 2 && scales->size(0) == n && scales->size(1) == n_groups, prefix,
                  " group-wise scales for weight (", n, ", ", k, ") and group_size ", group_size,
                  " must have shape (", n, ", ", n_groups, "), got ", scales->sizes());
    }
  } else {
    TORCH_CHECK(!scales.has_value(), prefix, " scales must be None for ", values.scalar_type(),
                " values (only int8 values are scaled)");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), prefix, " bias dtype ", bias->scalar_type(),
                " must match x dtype ", x.scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, prefix, " bias must have shape (", n, ",), got ",
                bias->sizes());
  }
  return n_groups;
}

}  // namespace fastquant::cpu
