#pragma once
// The csr16 kernel loops, included by one file per ISA (sparse_csr_linear_portable.cpp,
// sparse_csr_linear_avx2.cpp), each compiled with its own -m flags, so this header includes no torch
// headers. The including file defines `float fp16_to_f32(uint16_t)` in csr_detail's anonymous namespace
// before including it. Internal linkage throughout: with external linkage the linker keeps one copy of each
// inline function for both files (same names), so the portable path could run the AVX2 build's code on a CPU
// without AVX2, or the AVX2 path the baseline build's.
//
// M = 1 (decode): each kept weight costs three loads (index, activation, value) and one FMA; four
// accumulators break the FMA latency chain, so the loop runs at the load ports' rate (~1 weight per cycle)
// with x in L1. M > 1: each (index, value) pair is loaded once per tile of up to 8 rows of x, and the tile's
// activations for that column are 8 independent loads and FMAs.
#include <cstdint>
#include <cstring>

#include "cpu/bf16_bits.h"
#include "cpu/sparse_csr_linear.h"

namespace fastquant::cpu::csr_detail {
namespace {

struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

inline float to_f32(float v) { return v; }
inline float to_f32(int8_t v) { return static_cast<float>(v); }
inline float to_f32(Bf16 v) { return bf16_bits_to_f32(v.bits); }
inline float to_f32(F16 v) { return fp16_to_f32(v.bits); }

// col / group_size without a division: for col < 2^16 and group_size <= 2^16, col * ceil(2^32 / group_size)
// / 2^32 is off from col / group_size by less than col / 2^32 < 2^-16 <= 1 / group_size, which never crosses
// an integer, so the floor is exact.
struct GroupOf {
  uint64_t magic;
  explicit GroupOf(int64_t group_size)
      : magic(group_size > 0 ? ((uint64_t{1} << 32) + group_size - 1) / group_size : 0) {}
  int64_t operator()(uint32_t col) const { return static_cast<int64_t>((col * magic) >> 32); }
};

inline uint32_t max_index(const uint16_t* idx, int64_t len) {
  uint16_t hi = 0;
  for (int64_t i = 0; i < len; ++i) hi = idx[i] > hi ? idx[i] : hi;
  return hi;
}

// Weight of entry i of a row, whose column is col: the value, times its group's scale for group-wise int8.
template <typename T, bool GROUPED>
inline float weight(const T* v, int64_t i, uint32_t col, const float* srow, const GroupOf& group_of) {
  const float w = to_f32(v[i]);
  return GROUPED ? w * srow[group_of(col)] : w;
}

// Entries checked (column < k) at a time before they are used: checking a whole row first stalls on its
// indices arriving from memory before any product starts (~30% slower at 70% sparsity on Zen 3); a block of
// 256 (512 bytes of indices) is checked and then used from L1 while the next block streams in.
constexpr int64_t kCheckBlock = 256;

// Row dot product at M = 1, or false (and nothing computed past the block) if a column index is >= k.
template <typename T, bool GROUPED>
bool dot1(const float* x, int64_t k, const T* v, const uint16_t* idx, int64_t len, const float* srow,
          const GroupOf& g, float* out) {
  // Four indices per 64-bit load, split with shifts: the loop is bound by the load ports (index, activation,
  // value per kept weight), and the ALUs that do the split are idle (~10-25% faster on Zen 3 at 70-90%).
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  for (int64_t b = 0; b < len; b += kCheckBlock) {
    const int64_t e = b + kCheckBlock < len ? b + kCheckBlock : len;
    if (max_index(idx + b, e - b) >= k) return false;
    int64_t i = b;
    for (; i + 4 <= e; i += 4) {
      uint64_t four;
      std::memcpy(&four, idx + i, sizeof(four));
      const uint32_t c0 = four & 0xffffu, c1 = (four >> 16) & 0xffffu, c2 = (four >> 32) & 0xffffu,
                     c3 = four >> 48;
      a0 += x[c0] * weight<T, GROUPED>(v, i, c0, srow, g);
      a1 += x[c1] * weight<T, GROUPED>(v, i + 1, c1, srow, g);
      a2 += x[c2] * weight<T, GROUPED>(v, i + 2, c2, srow, g);
      a3 += x[c3] * weight<T, GROUPED>(v, i + 3, c3, srow, g);
    }
    for (; i < e; ++i) a0 += x[idx[i]] * weight<T, GROUPED>(v, i, idx[i], srow, g);
  }
  *out = (a0 + a1) + (a2 + a3);
  return true;
}

template <typename T, bool GROUPED, int MB>
void dot_tile(const SparseCsrLinearProblem& p, int64_t m0, const T* v, const uint16_t* idx, int64_t len,
              const float* srow, const GroupOf& g, float* out) {
  // Two sets of accumulators (even and odd entries): with few rows in the tile, one FMA chain per row would
  // wait on the FMA latency at every entry.
  float even[MB] = {}, odd[MB] = {};
  const float* x = p.x + m0 * p.k;
  int64_t i = 0;
  for (; i + 2 <= len; i += 2) {
    const uint32_t c0 = idx[i], c1 = idx[i + 1];
    const float w0 = weight<T, GROUPED>(v, i, c0, srow, g);
    const float w1 = weight<T, GROUPED>(v, i + 1, c1, srow, g);
    for (int t = 0; t < MB; ++t) {
      even[t] += x[t * p.k + c0] * w0;
      odd[t] += x[t * p.k + c1] * w1;
    }
  }
  if (i < len) {
    const uint32_t c0 = idx[i];
    const float w0 = weight<T, GROUPED>(v, i, c0, srow, g);
    for (int t = 0; t < MB; ++t) even[t] += x[t * p.k + c0] * w0;
  }
  for (int t = 0; t < MB; ++t) out[t] = even[t] + odd[t];
}

template <typename T, bool GROUPED>
void dot_rows(const SparseCsrLinearProblem& p, int64_t m0, int mb, const T* v, const uint16_t* idx,
              int64_t len, const float* srow, const GroupOf& g, float* out) {
  switch (mb) {
#define FQ_CSR_TILE(MB) \
  case MB:              \
    return dot_tile<T, GROUPED, MB>(p, m0, v, idx, len, srow, g, out);
    FQ_CSR_TILE(1)
    FQ_CSR_TILE(2)
    FQ_CSR_TILE(3)
    FQ_CSR_TILE(4)
    FQ_CSR_TILE(5)
    FQ_CSR_TILE(6)
    FQ_CSR_TILE(7)
    FQ_CSR_TILE(8)
#undef FQ_CSR_TILE
  }
}

constexpr int kTileM = 8;

template <typename T, bool GROUPED>
int64_t run(const SparseCsrLinearProblem& p, int64_t n_begin, int64_t n_end) {
  const T* values = static_cast<const T*>(p.values);
  const GroupOf group_of(p.group_size);
  for (int64_t j = n_begin; j < n_end; ++j) {
    if (!row_in_values(p, j)) return j;
    const int64_t begin = p.row_offsets[j];
    const int64_t len = p.row_offsets[j + 1] - begin;
    const uint16_t* idx = p.column_indices + begin;
    const T* v = values + begin;
    const float* srow = p.scales ? p.scales + j * p.n_groups : nullptr;
    const float post = !GROUPED && srow ? srow[0] : 1.f;
    const float bias = p.bias ? p.bias[j] : 0.f;
    if (p.m == 1) {
      float dot;
      if (!dot1<T, GROUPED>(p.x, p.k, v, idx, len, srow, group_of, &dot)) return j;
      p.y[j] = dot * post + bias;
      continue;
    }
    if (len > 0 && max_index(idx, len) >= p.k) return j;
    for (int64_t m0 = 0; m0 < p.m; m0 += kTileM) {
      const int mb = static_cast<int>(p.m - m0 < kTileM ? p.m - m0 : kTileM);
      float out[kTileM];
      dot_rows<T, GROUPED>(p, m0, mb, v, idx, len, srow, group_of, out);
      for (int t = 0; t < mb; ++t) p.y[(m0 + t) * p.n + j] = out[t] * post + bias;
    }
  }
  return -1;
}

template <typename T>
int64_t run_values(const SparseCsrLinearProblem& p, int64_t n_begin, int64_t n_end) {
  return p.group_size > 0 ? run<T, true>(p, n_begin, n_end) : run<T, false>(p, n_begin, n_end);
}

inline int64_t run_any(const SparseCsrLinearProblem& p, int64_t n_begin, int64_t n_end) {
  switch (p.vtype) {
    case DType::kFloat32:
      return run_values<float>(p, n_begin, n_end);
    case DType::kBFloat16:
      return run_values<Bf16>(p, n_begin, n_end);
    case DType::kFloat16:
      return run_values<F16>(p, n_begin, n_end);
    case DType::kInt8:
      return run_values<int8_t>(p, n_begin, n_end);
  }
  return -1;
}

}  // namespace
}  // namespace fastquant::cpu::csr_detail
