#pragma once
// Argument rules the torch glues of sparse_linear (bitmap16) and sparse_csr_linear (csr16) share, on CPU
// (csrc/cpu) and CUDA (csrc/cuda), worded as python/fastquant/ops.py (check_sparse_linear_args,
// _check_scales_and_bias). Includes torch headers: glue files only, never a kernel file.
#include <ATen/ATen.h>

#include <optional>

namespace fastquant {

// The dtype enums of the CPU and CUDA kernel interfaces (ActDType / DType, SparseValues) number their
// members alike: float32 0, bfloat16 1, float16 2, int8 3. Each glue static_asserts it for its enums.
enum SparseDTypeCode : int { kCodeFloat32 = 0, kCodeBFloat16 = 1, kCodeFloat16 = 2, kCodeInt8 = 3 };

template <typename ActEnum>
ActEnum sparse_act_dtype(const at::Tensor& x, const char* prefix) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return static_cast<ActEnum>(kCodeFloat32);
    case at::kBFloat16:
      return static_cast<ActEnum>(kCodeBFloat16);
    case at::kHalf:
      return static_cast<ActEnum>(kCodeFloat16);
    default:
      TORCH_CHECK(false, prefix, " x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

template <typename ValuesEnum>
ValuesEnum sparse_values_dtype(const at::Tensor& values, const char* prefix) {
  int code = -1;
  switch (values.scalar_type()) {
    case at::kFloat:
      code = kCodeFloat32;
      break;
    case at::kBFloat16:
      code = kCodeBFloat16;
      break;
    case at::kHalf:
      code = kCodeFloat16;
      break;
    case at::kChar:
      code = kCodeInt8;
      break;
    default:
      break;
  }
  TORCH_CHECK(code >= 0 && values.dim() == 1, prefix,
              " values must be a 1-D float32, bfloat16, float16 or int8 tensor, got ", values.scalar_type(),
              " of shape ", values.sizes());
  return static_cast<ValuesEnum>(code);
}

// group_size, scales and bias for a weight of n rows and k columns; returns the columns of scales.
inline int64_t check_sparse_scales_and_bias(const char* prefix, const at::Tensor& x, const at::Tensor& values,
                                            const std::optional<at::Tensor>& scales,
                                            const std::optional<at::Tensor>& bias, int64_t n, int64_t k,
                                            int64_t group_size) {
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % 16 == 0), prefix,
              " group_size must be -1 (per-channel) or a positive multiple of 16, got ", group_size);
  int64_t n_groups = 1;
  if (values.scalar_type() == at::kChar) {
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

}  // namespace fastquant
