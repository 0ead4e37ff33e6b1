#pragma once
// Torch glue both sparse CPU ops share (sparse_linear.cpp, sparse_csr_linear.cpp): the fp32 operands their
// kernels read and write besides x and the positions of the kept values. Torch glue only: includes ATen.
#include <ATen/ATen.h>

#include <cstdint>

#include "sparse_linear_contract.h"

namespace fastquant::cpu {

// Scales (int8 values) and bias as the kernels read them, and the fp32 output they write: y itself for fp32
// x, else an (M, N) buffer that the glue rounds into y at the end.
struct SparseFp32Operands {
  at::Tensor scales, bias32, y32;
};

inline SparseFp32Operands sparse_fp32_operands(const SparseLinearCall& c, const at::Tensor& y) {
  return {c.scales.has_value() ? c.scales->contiguous() : at::Tensor(),
          c.bias.has_value() ? c.bias->to(at::kFloat).contiguous() : at::Tensor(),
          c.shape.x_dtype == DType::kFloat32
              ? y
              : at::empty({c.shape.m, c.shape.n}, c.x.options().dtype(at::kFloat))};
}

// The fields both sparse problems (SparseLinearProblem, SparseCsrLinearProblem) share. values: contiguous.
template <typename Problem>
void set_sparse_operands(Problem& p, const SparseLinearShape& shape, const at::Tensor& values,
                         const int64_t* row_offsets, const SparseFp32Operands& o) {
  p.values = values.data_ptr();
  p.row_offsets = row_offsets;
  p.scales = o.scales.defined() ? o.scales.data_ptr<float>() : nullptr;
  p.bias = o.bias32.defined() ? o.bias32.data_ptr<float>() : nullptr;
  p.y = o.y32.data_ptr<float>();
  p.m = shape.m;
  p.n = shape.n;
  p.k = shape.k;
  p.n_groups = shape.n_groups;
  p.vtype = shape.values_dtype;
}

}  // namespace fastquant::cpu
