#pragma once
// The argument contracts of fastquant::sparse_linear (bitmap16 weights) and fastquant::sparse_csr_linear
// (csr16 weights), shared by their CPU glue (cpu/sparse_linear.cpp, cpu/sparse_csr_linear.cpp) and CUDA glue
// (cuda/sparse_linear_cuda.cpp, cuda/sparse_csr_linear_cuda.cpp); python/fastquant/kernels/ops.py
// (check_sparse_linear_args, check_sparse_csr_linear_args) words them alike. The contents of row_offsets,
// masks and column_indices are the kernels' business: checking them needs a pass over the data (and on CUDA a
// copy to the host), which each backend does where it reads them anyway.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "formats.h"
#include "op_contract.h"

namespace fastquant {

// A checked sparse problem: y (M x N) = x (M x K) @ W^T, W packed as kept values + positions.
struct SparseLinearShape {
  int64_t m, n, k;
  int64_t n_groups;  // columns of scales (int8 values; 1 per channel or for float values)
  DType x_dtype;
  DType values_dtype;  // float32, bfloat16, float16 or int8
};

namespace sparse_contract {

inline DType check_values(const char* prefix, const at::Tensor& values) {
  const at::ScalarType t = values.scalar_type();
  const DType d = t == at::kFloat      ? DType::kFloat32
                  : t == at::kBFloat16 ? DType::kBFloat16
                  : t == at::kHalf     ? DType::kFloat16
                                       : DType::kInt8;
  TORCH_CHECK(
      (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kChar) && values.dim() == 1,
      prefix, " values must be a 1-D float32, bfloat16, float16 or int8 tensor, got ", py_dtype(t),
      " of shape ", py_shape(values.sizes()));
  return d;
}

// The dtypes of a sparse problem's activations and values.
struct SparseDTypes {
  DType x, values;
};

// The first checks of both sparse ops: devices, activations and values. `positions` is where the kept values
// sit (masks for bitmap16, column_indices for csr16), named as the op names it.
inline SparseDTypes check_operands(const char* op, const char* prefix, Backend backend, const at::Tensor& x,
                                   const at::Tensor& values, const char* positions_name,
                                   const at::Tensor& positions, const at::Tensor& row_offsets,
                                   const std::optional<at::Tensor>& scales,
                                   const std::optional<at::Tensor>& bias) {
  check_devices(op, backend,
                {{"x", &x},
                 {"values", &values},
                 {positions_name, &positions},
                 {"row_offsets", &row_offsets},
                 {"scales", optional_arg(scales)},
                 {"bias", optional_arg(bias)}});
  return {check_activations(prefix, x), check_values(prefix, values)};
}

// The last checks of both sparse ops, scales and bias for a weight of n rows and k columns (int8 values need
// float32 scales, group sizes a multiple of 16, the mask word the kernels step by; float values take none),
// and the checked shape.
inline SparseLinearShape check_scales_and_bias(const char* prefix, const at::Tensor& x,
                                               const at::Tensor& values,
                                               const std::optional<at::Tensor>& scales,
                                               const std::optional<at::Tensor>& bias, int64_t n, int64_t k,
                                               int64_t group_size, SparseDTypes dtypes) {
  check_group_size(prefix, group_size, kSparseGroupMultiple);
  int64_t n_groups = 1;
  if (values.scalar_type() == at::kChar) {
    TORCH_CHECK(scales.has_value(), prefix, " int8 values need float32 scales, got None");
    n_groups = check_scales(prefix, *scales, "weight", n, k, group_size);
  } else {
    TORCH_CHECK(!scales.has_value(), prefix, " scales must be None for ", py_dtype(values.scalar_type()),
                " values (only int8 values are scaled)");
  }
  check_bias(prefix, x, bias, n);
  return {activation_rows(x), n, k, n_groups, dtypes.x, dtypes.values};
}

}  // namespace sparse_contract

inline SparseLinearShape check_sparse_linear(Backend backend, const at::Tensor& x, const at::Tensor& values,
                                             const at::Tensor& masks, const at::Tensor& row_offsets,
                                             const std::optional<at::Tensor>& scales,
                                             const std::optional<at::Tensor>& bias, int64_t in_features,
                                             int64_t group_size) {
  constexpr const char* kPrefix = "fastquant.sparse_linear:";
  const sparse_contract::SparseDTypes dtypes = sparse_contract::check_operands(
      "fastquant.sparse_linear", kPrefix, backend, x, values, "masks", masks, row_offsets, scales, bias);
  TORCH_CHECK(masks.scalar_type() == at::kShort && masks.dim() == 2, kPrefix,
              " masks must be a 2-D int16 tensor (N, ceil(K / 16)), got ", py_dtype(masks.scalar_type()),
              " of shape ", py_shape(masks.sizes()));
  TORCH_CHECK(in_features >= 0, kPrefix, " in_features must be >= 0, got ", in_features);
  const int64_t k = in_features;
  const int64_t n = masks.size(0);
  const int64_t n_chunks = group_count(k, 16);
  check_in_features(kPrefix, x, k);
  TORCH_CHECK(masks.size(1) == n_chunks, kPrefix, " masks has ", masks.size(1),
              " chunks per row but in_features ", k, " needs ceil(", k, " / 16) = ", n_chunks);
  TORCH_CHECK(
      row_offsets.scalar_type() == at::kLong && row_offsets.dim() == 1 && row_offsets.size(0) == n + 1,
      kPrefix, " row_offsets must be an int64 tensor of shape (N + 1,) = (", n + 1, ",), got ",
      py_dtype(row_offsets.scalar_type()), " of shape ", py_shape(row_offsets.sizes()));
  TORCH_CHECK(values.numel() >= kBitmap16Padding, kPrefix, " values must end with ", kBitmap16Padding,
              " elements of padding, got ", values.numel(), " elements");
  return sparse_contract::check_scales_and_bias(kPrefix, x, values, scales, bias, n, k, group_size, dtypes);
}

inline SparseLinearShape check_sparse_csr_linear(Backend backend, const at::Tensor& x,
                                                 const at::Tensor& values, const at::Tensor& column_indices,
                                                 const at::Tensor& row_offsets,
                                                 const std::optional<at::Tensor>& scales,
                                                 const std::optional<at::Tensor>& bias, int64_t in_features,
                                                 int64_t group_size) {
  constexpr const char* kPrefix = "fastquant.sparse_csr_linear:";
  const sparse_contract::SparseDTypes dtypes =
      sparse_contract::check_operands("fastquant.sparse_csr_linear", kPrefix, backend, x, values,
                                      "column_indices", column_indices, row_offsets, scales, bias);
  TORCH_CHECK(column_indices.scalar_type() == at::kShort && column_indices.sizes() == values.sizes(), kPrefix,
              " column_indices must be an int16 tensor of the values' shape ", py_shape(values.sizes()),
              ", got ", py_dtype(column_indices.scalar_type()), " of shape ",
              py_shape(column_indices.sizes()));
  TORCH_CHECK(row_offsets.scalar_type() == at::kLong && row_offsets.dim() == 1 && row_offsets.numel() >= 1,
              kPrefix, " row_offsets must be a non-empty 1-D int64 tensor (N + 1,), got ",
              py_dtype(row_offsets.scalar_type()), " of shape ", py_shape(row_offsets.sizes()));
  TORCH_CHECK(in_features >= 0 && in_features <= kSparseCsrMaxInFeatures, kPrefix,
              " in_features must be in [0, ", kSparseCsrMaxInFeatures, "] (16-bit column indices), got ",
              in_features);
  const int64_t k = in_features;
  const int64_t n = row_offsets.size(0) - 1;
  check_in_features(kPrefix, x, k);
  return sparse_contract::check_scales_and_bias(kPrefix, x, values, scales, bias, n, k, group_size, dtypes);
}

// One call of sparse_linear or sparse_csr_linear as a backend's glue gets it: the arguments as the op's
// schema passes them, with their checked shape.
struct SparseLinearCall {
  const at::Tensor& x;
  const at::Tensor& values;
  const at::Tensor& positions;  // where the kept values sit: masks (bitmap16) or column_indices (csr16)
  const at::Tensor& row_offsets;
  const std::optional<at::Tensor>& scales;
  const std::optional<at::Tensor>& bias;
  int64_t in_features;
  int64_t group_size;
  SparseLinearShape shape;
};

using SparseLinearCheck = SparseLinearShape (*)(Backend, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&,
                                                const std::optional<at::Tensor>&,
                                                const std::optional<at::Tensor>&, int64_t, int64_t);

// The kernel a backend registers for a sparse op, with the op's signature written once for every backend:
// the op's contract (Check: check_sparse_linear or check_sparse_csr_linear), then the backend's glue (Run)
// on the checked call.
template <SparseLinearCheck Check, Backend backend, at::Tensor (*Run)(const SparseLinearCall&)>
at::Tensor sparse_linear_kernel(const at::Tensor& x, const at::Tensor& values, const at::Tensor& positions,
                                const at::Tensor& row_offsets, const std::optional<at::Tensor>& scales,
                                const std::optional<at::Tensor>& bias, int64_t in_features,
                                int64_t group_size) {
  return Run({x, values, positions, row_offsets, scales, bias, in_features, group_size,
              Check(backend, x, values, positions, row_offsets, scales, bias, in_features, group_size)});
}

// Registers a backend's glue `Run` as its kernel of the op, under the op's signature above.
template <Backend backend, at::Tensor (*Run)(const SparseLinearCall&)>
void impl_sparse_linear(torch::Library& m) {
  m.impl("sparse_linear", &sparse_linear_kernel<check_sparse_linear, backend, Run>);
}

template <Backend backend, at::Tensor (*Run)(const SparseLinearCall&)>
void impl_sparse_csr_linear(torch::Library& m) {
  m.impl("sparse_csr_linear", &sparse_linear_kernel<check_sparse_csr_linear, backend, Run>);
}

}  // namespace fastquant
