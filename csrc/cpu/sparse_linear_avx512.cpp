// AVX-512 kernel for sparse_linear (compiled with -mavx512f/bw/vl/dq/vnni/bf16 -mfma; no torch headers).
// Needs only AVX-512F for the expansion (no VBMI2): per 16-column chunk the 16-bit mask word is a
// k-register, 16 packed values are loaded unaligned at the row's running position (the 64-element padding
// makes the over-read safe), widened to 32-bit lanes (vpmovsxbd for int8, vpmovzxwd + shift for bf16,
// vcvtph2ps for fp16) and vexpandps/vpexpandd moves the first popcount(mask) of them into the kept lanes,
// zeroing the rest; one FMA with x's 16 fp32 activations, and the pointer advances by popcnt(mask).
// The register form (load, then vexpandps) is used for fp32 values too; the memory form (vexpandps
// zmm{k}{z}, m512) is left for when it can be measured on an AVX-512 machine.
//
// Row tiles as in the AVX2 kernel: M = 1 interleaves 4 weight rows (independent pointer chains and memory
// streams, software prefetch ahead of each); M > 1 expands each chunk once and FMAs it into up to 8 rows
// of x, weight rows in blocks of 32 whose values stay in L2 while the x blocks stream past.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/sparse_linear.h"

namespace fastquant::cpu {
namespace {

#ifndef FQ_SPARSE_PF
#define FQ_SPARSE_PF 1024  // bytes of values prefetched ahead of each row pointer (0: none)
#endif

template <SparseValues V>
struct Val;
template <>
struct Val<SparseValues::kFloat32> {
  using T = float;
  static __m512 expand(const T* p, __mmask16 k) { return _mm512_maskz_expand_ps(k, _mm512_loadu_ps(p)); }
};
template <>
struct Val<SparseValues::kBFloat16> {
  using T = uint16_t;
  static __m512 expand(const T* p, __mmask16 k) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_maskz_expand_epi32(k, _mm512_slli_epi32(u, 16)));
  }
};
template <>
struct Val<SparseValues::kFloat16> {
  using T = uint16_t;
  static __m512 expand(const T* p, __mmask16 k) {
    return _mm512_maskz_expand_ps(k,
                                  _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  }
};
template <>
struct Val<SparseValues::kInt8> {
  using T = int8_t;
  static __m512 expand(const T* p, __mmask16 k) {
    const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtepi32_ps(_mm512_maskz_expand_epi32(k, q));
  }
};

template <SparseValues V, int MB, int NR, bool GROUPED>
void tile(const SparseLinearProblem& p, int64_t m0, int64_t j0) {
  using T = typename Val<V>::T;
  const T* vp[NR];
  const uint16_t* mrow[NR];
  for (int r = 0; r < NR; ++r) {
    vp[r] = static_cast<const T*>(p.values) + p.row_offsets[j0 + r];
    mrow[r] = p.masks + (j0 + r) * p.n_chunks;
  }
  __m512 acc[MB][NR];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  const float* x = p.x + m0 * p.ldx;
  const int64_t nc = p.n_chunks;
  const int64_t gc = GROUPED ? p.group_chunks : nc;
  for (int64_t c0 = 0; c0 < nc; c0 += gc) {
    const int64_t c1 = c0 + gc < nc ? c0 + gc : nc;
    __m512 s[NR];
    if (GROUPED) {
      for (int r = 0; r < NR; ++r) s[r] = _mm512_set1_ps(p.scales[(j0 + r) * p.n_groups + c0 / gc]);
    }
    for (int64_t c = c0; c < c1; ++c) {
      if (FQ_SPARSE_PF > 0 && (c & 3) == 0) {
        for (int r = 0; r < NR; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(vp[r]) + FQ_SPARSE_PF, _MM_HINT_T0);
        }
      }
      __m512 w[NR];
      for (int r = 0; r < NR; ++r) {
        const unsigned bits = mrow[r][c];
        w[r] = Val<V>::expand(vp[r], static_cast<__mmask16>(bits));
        vp[r] += _mm_popcnt_u32(bits);
        if (GROUPED) w[r] = _mm512_mul_ps(w[r], s[r]);
      }
      for (int i = 0; i < MB; ++i) {
        const __m512 xv = _mm512_loadu_ps(x + i * p.ldx + 16 * c);
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(xv, w[r], acc[i][r]);
      }
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int r = 0; r < NR; ++r) {
      float v = _mm512_reduce_add_ps(acc[i][r]);
      if (!GROUPED && p.scales) v *= p.scales[j0 + r];
      if (p.bias) v += p.bias[j0 + r];
      p.y[(m0 + i) * p.n + j0 + r] = v;
    }
  }
}

constexpr int kRows1 = 4;       // weight rows interleaved at M = 1
constexpr int kMB = 8;          // rows of x per tile at M > 1
constexpr int kNR = 2;          // weight rows per tile at M > 1
constexpr int64_t kBlock = 32;  // weight rows whose values stay in L2 while x streams past (M > 1)

// First row in [j0, j1) whose offset difference is not the popcount of its mask words, or -1.
int64_t first_bad_row(const SparseLinearProblem& p, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    const uint16_t* w = p.masks + j * p.n_chunks;
    int64_t count = 0, c = 0;
    for (; c + 4 <= p.n_chunks; c += 4) {
      uint64_t q;
      std::memcpy(&q, w + c, sizeof(q));
      count += _mm_popcnt_u64(q);
    }
    for (; c < p.n_chunks; ++c) count += _mm_popcnt_u32(w[c]);
    if (count != p.row_offsets[j + 1] - p.row_offsets[j]) return j;
  }
  return -1;
}

template <SparseValues V, int NR, bool GROUPED>
void tile_m(const SparseLinearProblem& p, int64_t m0, int mb, int64_t j0) {
  switch (mb) {
    case 1:
      return tile<V, 1, NR, GROUPED>(p, m0, j0);
    case 2:
      return tile<V, 2, NR, GROUPED>(p, m0, j0);
    case 3:
      return tile<V, 3, NR, GROUPED>(p, m0, j0);
    case 4:
      return tile<V, 4, NR, GROUPED>(p, m0, j0);
    case 5:
      return tile<V, 5, NR, GROUPED>(p, m0, j0);
    case 6:
      return tile<V, 6, NR, GROUPED>(p, m0, j0);
    case 7:
      return tile<V, 7, NR, GROUPED>(p, m0, j0);
    default:
      return tile<V, 8, NR, GROUPED>(p, m0, j0);
  }
}

template <SparseValues V, bool GROUPED>
int64_t run(const SparseLinearProblem& p, int64_t n_begin, int64_t n_end) {
  if (p.m == 1) {
    int64_t j = n_begin;
    for (; j + kRows1 <= n_end; j += kRows1) {
      const int64_t bad = first_bad_row(p, j, j + kRows1);
      if (bad >= 0) return bad;
      tile<V, 1, kRows1, GROUPED>(p, 0, j);
    }
    for (; j < n_end; ++j) {
      if (first_bad_row(p, j, j + 1) >= 0) return j;
      tile<V, 1, 1, GROUPED>(p, 0, j);
    }
    return -1;
  }
  for (int64_t b0 = n_begin; b0 < n_end; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < n_end ? b0 + kBlock : n_end;
    const int64_t bad = first_bad_row(p, b0, b1);
    if (bad >= 0) return bad;
    for (int64_t m0 = 0; m0 < p.m; m0 += kMB) {
      const int mb = static_cast<int>(p.m - m0 < kMB ? p.m - m0 : kMB);
      int64_t j = b0;
      for (; j + kNR <= b1; j += kNR) tile_m<V, kNR, GROUPED>(p, m0, mb, j);
      for (; j < b1; ++j) tile_m<V, 1, GROUPED>(p, m0, mb, j);
    }
  }
  return -1;
}

template <SparseValues V>
int64_t run_values(const SparseLinearProblem& p, int64_t n_begin, int64_t n_end) {
  return p.group_chunks > 0 ? run<V, true>(p, n_begin, n_end) : run<V, false>(p, n_begin, n_end);
}

}  // namespace

int64_t sparse_linear_avx512(const SparseLinearProblem& p, int64_t n_begin, int64_t n_end) {
  switch (p.vtype) {
    case SparseValues::kFloat32:
      return run_values<SparseValues::kFloat32>(p, n_begin, n_end);
    case SparseValues::kBFloat16:
      return run_values<SparseValues::kBFloat16>(p, n_begin, n_end);
    case SparseValues::kFloat16:
      return run_values<SparseValues::kFloat16>(p, n_begin, n_end);
    case SparseValues::kInt8:
      return run_values<SparseValues::kInt8>(p, n_begin, n_end);
  }
  return -1;
}

}  // namespace fastquant::cpu
