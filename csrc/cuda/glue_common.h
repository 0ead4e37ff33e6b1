#pragma once
// Torch-side helpers the CUDA glue of every op shares (int8_linear_cuda.cpp, int4_linear_cuda.cpp,
// sparse_linear_cuda.cpp, sparse_csr_linear_cuda.cpp): operands laid out for the kernels' 16-byte loads,
// split-K scratch, and the cuBLAS product on a dense weight. Glue files only: includes ATen.
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>

#include "cuda/quant_linear_args.h"
#include "sparse_linear_contract.h"

namespace fastquant::cuda {

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// t contiguous and 16-byte aligned, for the kernels' 16-byte loads: a fresh allocation of the caching
// allocator is; a view that starts mid-buffer is copied.
inline at::Tensor contiguous_aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c.data_ptr()) ? c : c.clone();
}

// An optional operand made contiguous; an undefined tensor for None.
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// Split-K scratch of `slices` M x N fp32 slices (undefined for 0), fresh per call from the caching allocator
// so that concurrent calls on other streams and CUDA-graph replays never share it.
inline at::Tensor split_k_workspace(int slices, int64_t m, int64_t n, const at::Tensor& x) {
  return slices > 0 ? at::empty({slices, m, n}, x.options().dtype(at::kFloat)) : at::Tensor();
}

// y (x's leading dimensions, N columns) = x2 (M x K) @ weight (N x K)^T (+ b), by cuBLAS in x's dtype.
inline void dense_linear_into(at::Tensor& y, const at::Tensor& x2, const at::Tensor& weight,
                              const at::Tensor& b) {
  at::Tensor y2 = y.view({x2.size(0), weight.size(0)});
  if (b.defined()) {
    at::addmm_out(y2, b, x2, weight.t());
  } else {
    at::mm_out(y2, x2, weight.t());
  }
}

// The launch arguments both dense quantized ops share (QuantLinearArgs) from the glue's contiguous operands:
// the device's SMs and torch's deterministic-algorithms switch decide the split-K scratch, which
// `slices(num_sms, deterministic)` (the op's rule, 0 for none) sizes and `workspace` keeps alive for the
// launch.
template <typename Slices>
QuantLinearArgs quant_linear_args(const cudaDeviceProp& props, const at::Tensor& x2, const at::Tensor& b,
                                  at::Tensor& y, at::Tensor& workspace, int64_t m, int64_t n, int64_t k,
                                  int64_t group, int64_t n_groups, bool x_vector, DType dtype,
                                  const Slices& slices) {
  QuantLinearArgs a;
  a.num_sms = props.multiProcessorCount;
  a.deterministic = at::globalContext().deterministicAlgorithms();
  workspace = split_k_workspace(slices(a.num_sms, a.deterministic), m, n, x2);
  a.x = x2.data_ptr();
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.workspace = workspace.defined() ? workspace.data_ptr<float>() : nullptr;
  a.m = static_cast<int>(m);
  a.n = static_cast<int>(n);
  a.k = static_cast<int>(k);
  a.group_size = static_cast<int>(group);
  a.n_groups = static_cast<int>(n_groups);
  a.x_vector = x_vector;
  a.dtype = dtype;
  return a;
}

// What both sparse launches (SparseLinearArgs, SparseCsrLinearArgs) read, laid out for the kernels: x as a
// contiguous (M, K) matrix, values 16-byte aligned (16-byte loads), row offsets, scales and bias contiguous
// (scales and bias undefined for None).
struct SparseOperands {
  at::Tensor x2, values, row_offsets, scales, bias;
};

inline SparseOperands sparse_operands(const SparseLinearCall& c) {
  return {c.x.reshape({c.shape.m, c.shape.k}).contiguous(), contiguous_aligned16(c.values),
          c.row_offsets.contiguous(), contiguous_or_undefined(c.scales), contiguous_or_undefined(c.bias)};
}

// The fields both sparse launches share: the operands, y, the shape and the device's limits; group_size
// clamped by the glue to fit an int.
template <typename Args>
void set_sparse_args(Args& a, const SparseLinearShape& shape, const SparseOperands& o, at::Tensor& y,
                     int64_t group_size, int64_t max_smem_bytes, int num_sms) {
  a.x = o.x2.data_ptr();
  a.values = o.values.data_ptr();
  a.values_numel = o.values.numel();
  a.row_offsets = o.row_offsets.data_ptr<int64_t>();
  a.scales = o.scales.defined() ? o.scales.data_ptr<float>() : nullptr;
  a.bias = o.bias.defined() ? o.bias.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.m = static_cast<int>(shape.m);
  a.n = static_cast<int>(shape.n);
  a.k = static_cast<int>(shape.k);
  a.group_size = static_cast<int>(group_size);
  a.n_groups = static_cast<int>(shape.n_groups);
  a.max_smem_bytes = static_cast<int>(max_smem_bytes);
  a.num_sms = num_sms;
  a.x_dtype = shape.x_dtype;
  a.values_dtype = shape.values_dtype;
}

}  // namespace fastquant::cuda
