// Torch glue for fastquant::sparse_csr_linear on CPU (csr16 weights, notes in sparse_csr_linear.h): checks
// arguments and row_offsets, splits output columns (weight rows) across torch's intra-op threads and runs
// the kernel for the active ISA.
//
// A column index >= K would read past the activations, so every call checks them: here that offsets start
// at 0 and end within values; in the kernels, just before a row is read, that it lies within the values
// and that its indices are below K (a vectorized max over indices the product loads next anyway). A failing
// row stops its thread and raises after the parallel region (the output is discarded), naming the first
// decreasing offset if there is one.
#include "cpu/sparse_csr_linear.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/non_finite.h"
#include "cpu/parallel.h"
#include "cpu/sparse_glue.h"
#include "dequantize.h"
#include "sparse_linear_contract.h"

namespace fastquant::cpu {
namespace {

constexpr const char* kPrefix = "fastquant.sparse_csr_linear:";
constexpr int64_t kCsrTransposedMinRows = 8;

bool use_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  return active_isa() >= Isa::kAvx2;
#else
  return false;
#endif
}

void check_offsets_ends(const int64_t* offsets, int64_t n, int64_t numel) {
  TORCH_CHECK(offsets[0] == 0, kPrefix, " row_offsets[0] must be 0, got ", offsets[0]);
  TORCH_CHECK(offsets[n] <= numel, kPrefix, " row_offsets[N] = ", offsets[n], " kept weights but values has ",
              numel, " elements");
}

// After a kernel refused row `bad`: the first decreasing offset if there is one, else the row's index.
[[noreturn]] void raise_refused(const SparseCsrLinearProblem& p, int64_t bad) {
  for (int64_t j = 0; j < p.n; ++j) {
    TORCH_CHECK(p.row_offsets[j + 1] >= p.row_offsets[j], kPrefix, " row_offsets must not decrease: row ", j,
                " goes from ", p.row_offsets[j], " to ", p.row_offsets[j + 1]);
  }
  const auto* cols = p.column_indices + p.row_offsets[bad];
  const int64_t len = p.row_offsets[bad + 1] - p.row_offsets[bad];
  TORCH_CHECK(false, kPrefix, " row ", bad, " has column index ", *std::max_element(cols, cols + len),
              ", not below in_features (", p.k, ")");
}

}  // namespace

const char* sparse_csr_linear_cpu_path() { return use_avx2() ? "cpu_csr_avx2" : "cpu_csr_portable"; }

namespace {

at::Tensor run_kernels(const SparseLinearCall& c) {
  const int64_t m = c.shape.m, n = c.shape.n, k = c.shape.k;
  const DType dtype = c.shape.x_dtype;

  const at::Tensor vals = c.values.contiguous();
  const at::Tensor idx = c.positions.contiguous();
  const at::Tensor offs = c.row_offsets.contiguous();
  const int64_t* offsets = offs.data_ptr<int64_t>();
  check_offsets_ends(offsets, n, vals.numel());

  at::Tensor y = empty_output(c.x, n);
  if (output_without_kernel(y, k, c.bias)) return y;

  const at::Tensor x32 = c.x.reshape({m, k}).to(at::kFloat).contiguous();
  const SparseFp32Operands o = sparse_fp32_operands(c, y);

  // From 8 rows of x the AVX2 kernel takes x transposed and zero-padded to whole 16-row tiles (notes in
  // sparse_csr_linear_avx2.cpp); the copy is K x M floats, against M x (kept weights) FMAs. Below 8 rows the
  // padding would waste most of each tile: the scalar row tiles are faster there (measured in NOTES).
  at::Tensor xt;
  if (use_avx2() && m >= kCsrTransposedMinRows) {
    xt = at::zeros({k, (m + 15) / 16 * 16}, x32.options());
    xt.narrow(1, 0, m).copy_(x32.t());
  }

  SparseCsrLinearProblem p{};
  set_sparse_operands(p, c.shape, vals, offsets, o);
  p.x = x32.data_ptr<float>();
  p.xt = xt.defined() ? xt.data_ptr<float>() : nullptr;
  p.ldxt = xt.defined() ? xt.size(1) : 0;
  p.column_indices = reinterpret_cast<const uint16_t*>(idx.data_ptr<int16_t>());
  p.group_size = p.vtype == DType::kInt8 && c.group_size != -1 ? c.group_size : 0;

  SparseCsrLinearKernel kernel = sparse_csr_linear_portable;
#if defined(__x86_64__) || defined(_M_X64)
  if (use_avx2()) kernel = sparse_csr_linear_avx2;
#endif
  // Rows are split evenly, not by their kept counts: pruning per output row (Wanda, SparseGPT, 2:4, per-layer
  // magnitude at moderate sparsity) keeps the counts close, and an even split needs no scan of the offsets.
  constexpr int64_t grain = 8;
  const int64_t bad = parallel_rows_first_refused(
      n, grain, [&](int64_t begin, int64_t end) { return kernel(p, begin, end); });
  if (bad != n) raise_refused(p, bad);
  if (dtype != DType::kFloat32) y.view({m, n}).copy_(o.y32);
  return y;
}

// c.positions: the column indices.
at::Tensor sparse_csr_linear_cpu(const SparseLinearCall& c) {
  at::Tensor y = run_kernels(c);
  if (!finite_call(c.x, y)) {
    const at::Tensor weight =
        dequantize_csr16(c.values, c.positions, c.row_offsets, c.scales, c.in_features, c.group_size);
    reference_linear_into(y, c.x, weight, c.bias);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastquant, CPU, m) { impl_sparse_csr_linear<Backend::kCpu, sparse_csr_linear_cpu>(m); }

}  // namespace fastquant::cpu
