#pragma once
// Raw-pointer interface between the torch glue (sparse_csr_linear.cpp) and the per-ISA kernels of
// sparse_csr_linear, the product of activations with a "csr16" sparse weight: bitmap16's packed values and
// row offsets, with a 16-bit column index per value instead of the mask words.
//
// Why a second format: without a vector expand (AVX2), a bitmap16 kernel spends a fixed ~2 ns per 16
// columns and row whatever the sparsity (two cross-lane permutes), so at 90% it is compute-bound far above
// its byte floor. A csr16 kernel does work per kept weight (three loads: index, activation, value) and
// reaches the byte floor at high sparsity; bitmap16 stays smaller and faster at moderate sparsity.
//
// Kernel paths (sparse_csr_linear_cpu_path):
//   cpu_csr_portable   any CPU, compiled for the baseline ISA.
//   cpu_csr_avx2       the same loops compiled with AVX2/FMA/F16C (vfmadd231ss, vcvtph2ps, and the row's
//                      index bound check vectorized) up to M = 7; from M = 8 the glue passes x transposed
//                      and each kept weight is one broadcast FMA into 16 rows of x at once.
// Both multiply and accumulate in fp32 like sparse_linear: grouped int8 scales multiply each value
// (q * s, as the reference dequantizes), per-channel scales the finished dot product.
#include <cstdint>

#include "cpu/sparse_linear.h"  // DType

namespace fastquant::cpu {

struct SparseCsrLinearProblem {
  const float* x;                  // m x k fp32 activations, row-major
  const void* values;              // kept weights, row after row
  const uint16_t* column_indices;  // column of each value
  const int64_t* row_offsets;      // n + 1: row j's entries are [row_offsets[j], row_offsets[j + 1])
  const float* scales;             // int8 values: n x n_groups fp32; nullptr for float values
  const float* bias;               // n fp32, or nullptr
  float* y;                        // m x n fp32 output
  const float* xt;  // AVX2 path with m >= 8: x transposed, k x ldxt fp32 (rows m.. ldxt zero); else nullptr
  int64_t ldxt;
  int64_t m, n, k;
  int64_t group_size;  // int8 with group-wise scales: columns per group; else 0
  int64_t n_groups;    // columns of scales (1 for per-channel)
  DType vtype;
};

// Computes output columns [n_begin, n_end) for every row of x. Called concurrently on disjoint ranges.
// Before reading a weight row, a kernel checks that it lies within [0, row_offsets[n]] (row_in_values) and
// that all its column indices are below k (the row's indices are then in L1 for the product); it returns
// the first row that fails, having computed only the rows before it, or -1. The glue checks that offsets
// start at 0 and that row_offsets[n] <= values.numel(), and looks for a decreasing offset only after a
// refusal (no serial O(N) pass over cold offsets before every call).
static inline bool row_in_values(const SparseCsrLinearProblem& p, int64_t j) {
  const int64_t begin = p.row_offsets[j], end = p.row_offsets[j + 1];
  return begin >= 0 && end >= begin && end <= p.row_offsets[p.n];
}

using SparseCsrLinearKernel = int64_t (*)(const SparseCsrLinearProblem& p, int64_t n_begin, int64_t n_end);

int64_t sparse_csr_linear_portable(const SparseCsrLinearProblem& p, int64_t n_begin, int64_t n_end);
#if defined(__x86_64__) || defined(_M_X64)
int64_t sparse_csr_linear_avx2(const SparseCsrLinearProblem& p, int64_t n_begin, int64_t n_end);
#endif

const char* sparse_csr_linear_cpu_path();

}  // namespace fastquant::cpu
