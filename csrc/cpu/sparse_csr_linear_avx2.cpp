// csr16 kernel compiled with AVX2/FMA/F16C (no torch headers). M < 8: the shared scalar loops of
// sparse_csr_linear_kernel.h (vfmadd231ss, vcvtph2ps, the index bound check vectorized by the compiler).
// M >= 8: the glue passes x transposed (k x ldxt, ldxt a multiple of 16), so the 16 activations of one column
// for a tile of 16 rows of x are two contiguous vectors: each kept weight is one broadcast and two FMAs for
// 16 rows, instead of 16 scalar loads and FMAs. Rows of the weight are walked in blocks so that a block's
// values and indices stay in L2 while the tiles of x pass over them; a tile of xT (k x 16 fp32, 256 KiB at
// k = 4096) is read from L2 / L3.
#include <immintrin.h>

#include <cstdint>

namespace fastquant::cpu::csr_detail {
namespace {
inline float fp16_to_f32(uint16_t bits) { return _cvtsh_ss(bits); }
}  // namespace
}  // namespace fastquant::cpu::csr_detail

#include "cpu/sparse_csr_linear_kernel.h"

namespace fastquant::cpu {
namespace {

using csr_detail::GroupOf;
using csr_detail::max_index;
using csr_detail::weight;

constexpr int64_t kTileRows = 16;   // rows of x per tile: two ymm of accumulators per entry stream
constexpr int64_t kBlockRows = 32;  // weight rows whose entries stay in L2 while the x tiles pass

template <typename T, bool GROUPED>
void row_tile(const SparseCsrLinearProblem& p, int64_t j, int64_t m0) {
  const int64_t begin = p.row_offsets[j];
  const int64_t len = p.row_offsets[j + 1] - begin;
  const uint16_t* idx = p.column_indices + begin;
  const T* v = static_cast<const T*>(p.values) + begin;
  const float* srow = p.scales ? p.scales + j * p.n_groups : nullptr;
  const GroupOf g(p.group_size);
  const float* xt = p.xt + m0;
  // Two entries per step, each with its own accumulators: four independent FMA chains hide the FMA latency.
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
  int64_t i = 0;
  for (; i + 2 <= len; i += 2) {
    const uint32_t c0 = idx[i], c1 = idx[i + 1];
    const float* r0 = xt + static_cast<int64_t>(c0) * p.ldxt;
    const float* r1 = xt + static_cast<int64_t>(c1) * p.ldxt;
    const __m256 w0 = _mm256_set1_ps(weight<T, GROUPED>(v, i, c0, srow, g));
    const __m256 w1 = _mm256_set1_ps(weight<T, GROUPED>(v, i + 1, c1, srow, g));
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0), w0, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + 8), w0, a1);
    b0 = _mm256_fmadd_ps(_mm256_loadu_ps(r1), w1, b0);
    b1 = _mm256_fmadd_ps(_mm256_loadu_ps(r1 + 8), w1, b1);
  }
  if (i < len) {
    const float* r0 = xt + static_cast<int64_t>(idx[i]) * p.ldxt;
    const __m256 w0 = _mm256_set1_ps(weight<T, GROUPED>(v, i, idx[i], srow, g));
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0), w0, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + 8), w0, a1);
  }
  alignas(32) float out[kTileRows];
  _mm256_store_ps(out, _mm256_add_ps(a0, b0));
  _mm256_store_ps(out + 8, _mm256_add_ps(a1, b1));
  const float post = !GROUPED && srow ? srow[0] : 1.f;
  const float bias = p.bias ? p.bias[j] : 0.f;
  const int64_t rows = p.m - m0 < kTileRows ? p.m - m0 : kTileRows;
  for (int64_t t = 0; t < rows; ++t) p.y[(m0 + t) * p.n + j] = out[t] * post + bias;
}

template <typename T, bool GROUPED>
int64_t run_transposed(const SparseCsrLinearProblem& p, int64_t n_begin, int64_t n_end) {
  for (int64_t b0 = n_begin; b0 < n_end; b0 += kBlockRows) {
    const int64_t b1 = b0 + kBlockRows < n_end ? b0 + kBlockRows : n_end;
    for (int64_t j = b0; j < b1; ++j) {
      if (!row_in_values(p, j)) return j;
      const int64_t len = p.row_offsets[j + 1] - p.row_offsets[j];
      if (len > 0 && max_index(p.column_indices + p.row_offsets[j], len) >= p.k) return j;
    }
    for (int64_t m0 = 0; m0 < p.m; m0 += kTileRows) {
      for (int64_t j = b0; j < b1; ++j) row_tile<T, GROUPED>(p, j, m0);
    }
  }
  return -1;
}

template <typename T>
int64_t run_transposed_values(const SparseCsrLinearProblem& p, int64_t n_begin, int64_t n_end) {
  return p.group_size > 0 ? run_transposed<T, true>(p, n_begin, n_end)
                          : run_transposed<T, false>(p, n_begin, n_end);
}

}  // namespace

int64_t sparse_csr_linear_avx2(const SparseCsrLinearProblem& p, int64_t n_begin, int64_t n_end) {
  if (p.xt == nullptr) return csr_detail::run_any(p, n_begin, n_end);
  switch (p.vtype) {
    case DType::kFloat32:
      return run_transposed_values<float>(p, n_begin, n_end);
    case DType::kBFloat16:
      return run_transposed_values<csr_detail::Bf16>(p, n_begin, n_end);
    case DType::kFloat16:
      return run_transposed_values<csr_detail::F16>(p, n_begin, n_end);
    case DType::kInt8:
      return run_transposed_values<int8_t>(p, n_begin, n_end);
  }
  return -1;
}

}  // namespace fastquant::cpu
