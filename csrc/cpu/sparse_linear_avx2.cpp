// AVX2 kernel for sparse_linear (compiled with -mavx2 -mfma -mf16c -mbmi2; no torch headers). AVX2 has no
// expand instruction: each 16-column chunk is handled as two 8-column halves, and a 256-entry table turns
// the half's mask byte into a vpermps index that moves the next popcount(byte) packed values into their
// columns. The sign bit of each index marks the kept lanes, so one vblendvps zeroes the rest (the lanes
// past the byte's popcount hold the next values of the stream, not zeros). Values are converted to fp32
// before the permute (vpmovsxbd + vcvtdq2ps, vpmovzxwd + shift for bf16, vcvtph2ps for fp16) and FMA'd
// with fp32 activations, so products and sums are fp32 as in the reference.
//
// Row tiles: M = 1 interleaves 4 weight rows (4 independent value pointers and accumulator chains; the
// pointer advance is a popcnt + add per half, off the FMA chain). M > 1 expands each chunk once and FMAs
// it into up to 4 rows of x; weight rows are visited in blocks of 32 so that the block's values stay in
// L2 while every 4-row block of x streams past them.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/sparse_linear.h"

namespace fastquant::cpu {
namespace {

#ifndef FQ_SPARSE_ASM_BLEND
#define FQ_SPARSE_ASM_BLEND 1
#endif
#ifndef FQ_SPARSE_PF
#define FQ_SPARSE_PF 1024  // bytes of values prefetched ahead of each row pointer (0: none)
#endif

// kPerm[b]: 8 bytes, byte j = 0x80 | (packed position of column j) when bit j of b is set, else 0. One
// vpmovsxbd with a scaled index loads and widens an entry: the sign bit of each 32-bit lane marks the
// kept lanes (for vblendvps) and the low 3 bits are the vpermps source lane.
struct PermTable {
  alignas(64) uint64_t entry[256];
  constexpr PermTable() : entry{} {
    for (int b = 0; b < 256; ++b) {
      uint64_t e = 0;
      int c = 0;
      for (int j = 0; j < 8; ++j) {
        if ((b >> j) & 1) {
          e |= static_cast<uint64_t>(0x80 | c) << (8 * j);
          ++c;
        }
      }
      entry[b] = e;
    }
  }
};
constexpr PermTable kPerm{};

template <SparseValues V>
struct Val;
template <>
struct Val<SparseValues::kFloat32> {
  using T = float;
  static __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
};
template <>
struct Val<SparseValues::kBFloat16> {
  using T = uint16_t;
  static __m256 load8(const T* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
};
template <>
struct Val<SparseValues::kFloat16> {
  using T = uint16_t;
  static __m256 load8(const T* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};
template <>
struct Val<SparseValues::kInt8> {
  using T = int8_t;
  static __m256 load8(const T* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};

// The 8 columns of one mask byte, from the packed stream at ptr (advanced past the kept ones).
template <SparseValues V>
inline __m256 expand8(const typename Val<V>::T*& ptr, unsigned byte) {
  const __m256i idx =
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kPerm.entry + byte)));
  const __m256 v = _mm256_permutevar8x32_ps(Val<V>::load8(ptr), idx);
  ptr += _mm_popcnt_u32(byte);
#if FQ_SPARSE_ASM_BLEND
  // One vblendvps instead of the vpcmpgtd + vandps GCC makes of a blend with zero.
  __m256 out;
  asm("vblendvps %3, %2, %1, %0" : "=x"(out) : "x"(_mm256_setzero_ps()), "x"(v), "x"(idx));
  return out;
#else
  return _mm256_blendv_ps(_mm256_setzero_ps(), v, _mm256_castsi256_ps(idx));
#endif
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m0 .. m0 + MB, j0 .. j0 + NR] over all chunks.
template <SparseValues V, int MB, int NR, bool GROUPED>
void tile(const SparseLinearProblem& p, int64_t m0, int64_t j0) {
  using T = typename Val<V>::T;
  const T* vp[NR];
  const uint16_t* mrow[NR];
  for (int r = 0; r < NR; ++r) {
    vp[r] = static_cast<const T*>(p.values) + p.row_offsets[j0 + r];
    mrow[r] = p.masks + (j0 + r) * p.n_chunks;
  }
  __m256 acc[MB][NR];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  const float* x = p.x + m0 * p.ldx;
  const int64_t nc = p.n_chunks;
  const int64_t gc = GROUPED ? p.group_chunks : nc;
  for (int64_t c0 = 0; c0 < nc; c0 += gc) {
    const int64_t c1 = c0 + gc < nc ? c0 + gc : nc;
    __m256 s[NR];
    if (GROUPED) {
      for (int r = 0; r < NR; ++r) s[r] = _mm256_set1_ps(p.scales[(j0 + r) * p.n_groups + c0 / gc]);
    }
    for (int64_t c = c0; c < c1; ++c) {
      if (FQ_SPARSE_PF > 0 && (c & 3) == 0) {
        for (int r = 0; r < NR; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(vp[r]) + FQ_SPARSE_PF, _MM_HINT_T0);
        }
      }
      __m256 wl[NR], wh[NR];
      for (int r = 0; r < NR; ++r) {
        const unsigned bits = mrow[r][c];
        wl[r] = expand8<V>(vp[r], bits & 0xffu);
        wh[r] = expand8<V>(vp[r], bits >> 8);
        if (GROUPED) {
          wl[r] = _mm256_mul_ps(wl[r], s[r]);
          wh[r] = _mm256_mul_ps(wh[r], s[r]);
        }
      }
      for (int i = 0; i < MB; ++i) {
        const __m256 xl = _mm256_loadu_ps(x + i * p.ldx + 16 * c);
        const __m256 xh = _mm256_loadu_ps(x + i * p.ldx + 16 * c + 8);
        for (int r = 0; r < NR; ++r) {
          acc[i][r] = _mm256_fmadd_ps(xl, wl[r], acc[i][r]);
          acc[i][r] = _mm256_fmadd_ps(xh, wh[r], acc[i][r]);
        }
      }
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int r = 0; r < NR; ++r) {
      float v = hsum8(acc[i][r]);
      if (!GROUPED && p.scales) v *= p.scales[j0 + r];
      if (p.bias) v += p.bias[j0 + r];
      p.y[(m0 + i) * p.n + j0 + r] = v;
    }
  }
}

constexpr int kRows1 = 4;       // weight rows interleaved at M = 1
constexpr int kMB = 4;          // rows of x per tile at M > 1
constexpr int kNR = 2;          // weight rows per tile at M > 1
constexpr int64_t kBlock = 32;  // weight rows whose values stay in L2 while x streams past (M > 1)

template <SparseValues V, int NR, bool GROUPED>
void tile_m(const SparseLinearProblem& p, int64_t m0, int mb, int64_t j0) {
  switch (mb) {
    case 1:
      return tile<V, 1, NR, GROUPED>(p, m0, j0);
    case 2:
      return tile<V, 2, NR, GROUPED>(p, m0, j0);
    case 3:
      return tile<V, 3, NR, GROUPED>(p, m0, j0);
    default:
      return tile<V, 4, NR, GROUPED>(p, m0, j0);
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

int64_t sparse_linear_avx2(const SparseLinearProblem& p, int64_t n_begin, int64_t n_end) {
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
