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

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/sparse_linear.h"
#include "static_count.h"

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

template <DType V>
struct Val;
template <>
struct Val<DType::kFloat32> {
  using T = float;
  static __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
};
template <>
struct Val<DType::kBFloat16> {
  using T = uint16_t;
  static __m256 load8(const T* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
};
template <>
struct Val<DType::kFloat16> {
  using T = uint16_t;
  static __m256 load8(const T* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};
template <>
struct Val<DType::kInt8> {
  using T = int8_t;
  static __m256 load8(const T* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};

// The 8 columns of one mask byte, from the packed stream at ptr (advanced past the kept ones).
template <DType V>
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
template <DType V, int MB, int NR, bool GROUPED>
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

// cpu_avx2_fixed, int8 values at M = 1 (per-channel, or groups of whole 64-column steps). The fp32 path above
// is bound by its two cross-lane vpermps per 16 columns (~6.6 cycles per 16 columns and row on Zen 3, as much
// as 4x the cost of dense int8's conversion), so it could not beat dense int8 where that is not memory-bound.
// Here x is 32-bit fixed point in two int16 planes, X = 65536 hi + lo, and q.X = 65536 q.hi + q.lo: per 16
// columns the 16 kept int8 values are placed by one in-lane vpshufb, each into the high byte of its 16-bit
// lane, vpsraw by 8 sign-extends them, and 2 vpmaddwd (16 x 16 -> 32 bits, adjacent pairs summed) multiply
// them with the planes. Sums are exact: a vpmaddwd lane is at most 2 * 128 * 32768 = 2^23, so int32 lanes
// hold 128 chunks (2^30) and are then widened into int64.
//
// vpshufb controls from kPerm's ranks: a set bit 7 makes vpshufb write zero, so flipping bit 7 of every
// kPerm byte gives, per column, its packed position when kept and 0x80 (zero) when pruned.
// kByteRank[b]: that control for the 8 columns of mask byte b at byte level (cpu_avx2_dense_int8's
// expansion). kHalfPlacement[b]: the same in the high byte of 16-bit lanes, the low bytes zeroed.
struct ByteRank {
  alignas(64) uint64_t entry[256];
  constexpr ByteRank() : entry{} {
    for (int b = 0; b < 256; ++b) entry[b] = kPerm.entry[b] ^ 0x8080808080808080ull;
  }
};
constexpr ByteRank kByteRank{};

struct HalfPlacement {
  alignas(16) uint8_t control[256][16];
  constexpr HalfPlacement() : control{} {
    for (int b = 0; b < 256; ++b) {
      for (int j = 0; j < 8; ++j) {
        control[b][2 * j] = 0x80;
        control[b][2 * j + 1] = static_cast<uint8_t>(kByteRank.entry[b] >> (8 * j));
      }
    }
  }
};
constexpr HalfPlacement kHalfPlacement{};

constexpr int64_t kFlushChunks = 128;  // chunks summed in int32 lanes before widening (2^30 at most)

inline int64_t sum_epi32_in_epi64(__m256i v) {
  const __m256i wide = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                        _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  const __m128i half = _mm_add_epi64(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
  return _mm_cvtsi128_si64(half) + _mm_extract_epi64(half, 1);
}

// Rows [j, j + R) (R rows share each chunk's plane loads). Returns the first row whose values did not end
// at the next row's offset, or -1; the caller guarantees that the rows cannot read past values. GROUPED:
// groups of a multiple of 4 chunks (checked by the caller); int32 lanes are flushed at every group's end
// too, and each flush's exact sum is scaled by its group's scale in double.
template <int R, bool GROUPED>
int64_t rows_fixed(const SparseLinearProblem& p, int64_t j) {
  const int8_t* values = static_cast<const int8_t*>(p.values);
  const int64_t nc = p.n_chunks;
  const int16_t* x_hi = reinterpret_cast<const int16_t*>(p.x_fixed);
  const int16_t* x_lo = x_hi + p.x_fixed_stride;
  const int8_t* vp[R];
  const uint16_t* mrow[R];
  int64_t sum_hi[R], sum_lo[R];
  double scaled[R];  // GROUPED: the flushed sums times their group's scale
  for (int r = 0; r < R; ++r) {
    vp[r] = values + p.row_offsets[j + r];
    mrow[r] = p.masks + (j + r) * nc;
    sum_hi[r] = sum_lo[r] = 0;
    scaled[r] = 0.0;
  }
  const uintptr_t ahead = values_ahead(p, j, R);
  const uintptr_t masks_ahead = sizeof(uint16_t) * R * nc + 64;
  for (int64_t c0 = 0, c1; c0 < nc; c0 = c1) {
    c1 = c0 + kFlushChunks < nc ? c0 + kFlushChunks : nc;
    if (GROUPED) c1 = std::min(c1, (c0 / p.group_chunks + 1) * p.group_chunks);
    __m256i acc_hi[R], acc_lo[R];
    for (int r = 0; r < R; ++r) acc_hi[r] = acc_lo[r] = _mm256_setzero_si256();
    const auto chunk = [&](int64_t c, int r, unsigned word) {
      const unsigned low = word & 0xffu, high = word >> 8;
      const unsigned low_kept = _mm_popcnt_u32(low);
      // Both 128-bit lanes index 16 bytes of values: the lower from the row's position, the upper from
      // past the lower half's low_kept values.
      const __m256i control = _mm256_inserti128_si256(
          _mm256_castsi128_si256(
              _mm_load_si128(reinterpret_cast<const __m128i*>(kHalfPlacement.control[low]))),
          _mm_load_si128(reinterpret_cast<const __m128i*>(kHalfPlacement.control[high])), 1);
      const __m256i packed = _mm256_inserti128_si256(
          _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vp[r]))),
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(vp[r] + low_kept)), 1);
      const __m256i q = _mm256_srai_epi16(_mm256_shuffle_epi8(packed, control), 8);
      vp[r] += low_kept + _mm_popcnt_u32(high);
      const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_hi + 16 * c));
      const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_lo + 16 * c));
      acc_hi[r] = _mm256_add_epi32(acc_hi[r], _mm256_madd_epi16(q, xh));
      acc_lo[r] = _mm256_add_epi32(acc_lo[r], _mm256_madd_epi16(q, xl));
    };
    int64_t c = c0;
    for (; c + 4 <= c1; c += 4) {  // kFlushChunks is a multiple of 4: one 64-bit load of 4 mask words
      uint64_t words[R];
      for (int r = 0; r < R; ++r) {
        std::memcpy(&words[r], mrow[r] + c, sizeof(words[r]));
        prefetch_at(vp[r], ahead);
        if (c % 32 == 0) prefetch_at(mrow[r] + c, masks_ahead);
      }
      for (int t = 0; t < 4; ++t) {
        for (int r = 0; r < R; ++r) chunk(c + t, r, static_cast<unsigned>(words[r] >> (16 * t)) & 0xffffu);
      }
    }
    for (; c < c1; ++c) {
      for (int r = 0; r < R; ++r) chunk(c, r, mrow[r][c]);
    }
    for (int r = 0; r < R; ++r) {
      if (GROUPED) {  // at most 2^38 in magnitude: exact in double
        const int64_t dot = sum_epi32_in_epi64(acc_hi[r]) * 65536 + sum_epi32_in_epi64(acc_lo[r]);
        scaled[r] += static_cast<double>(dot) * p.scales[(j + r) * p.n_groups + c0 / p.group_chunks];
      } else {
        sum_hi[r] += sum_epi32_in_epi64(acc_hi[r]);
        sum_lo[r] += sum_epi32_in_epi64(acc_lo[r]);
      }
    }
  }
  int64_t bad = -1;
  for (int r = 0; r < R; ++r) {
    if (bad < 0 && vp[r] != values + p.row_offsets[j + r + 1]) bad = j + r;
    const int64_t dot = sum_hi[r] * 65536 + sum_lo[r];  // |sum_hi| <= 2^22 K: exact for K < 2^24
    const double scaled_dot = GROUPED ? scaled[r] : static_cast<double>(dot) * p.scales[j + r];
    float v = static_cast<float>(scaled_dot * p.x_fixed_step);
    if (p.bias) v += p.bias[j + r];
    p.y[j + r] = v;
  }
  return bad;
}

int64_t run_fixed(const SparseLinearProblem& p, int64_t n_begin, int64_t n_end) {
  for (int64_t j = n_begin; j < n_end;) {
    const int64_t left = n_end - j;
    const int rows = left >= 4 ? 4 : left >= 2 ? 2 : 1;
    if (!rows_read_inside(p, j, rows)) {
      const int64_t bad = first_bad_row(p, j, j + rows);
      if (bad >= 0) return bad;
    }
    int64_t bad;
    if (p.group_chunks > 0) {
      bad = rows == 4   ? rows_fixed<4, true>(p, j)
            : rows == 2 ? rows_fixed<2, true>(p, j)
                        : rows_fixed<1, true>(p, j);
    } else {
      bad = rows == 4   ? rows_fixed<4, false>(p, j)
            : rows == 2 ? rows_fixed<2, false>(p, j)
                        : rows_fixed<1, false>(p, j);
    }
    if (bad >= 0) return bad;
    j += rows;
  }
  return -1;
}

constexpr int kRows1 = 4;       // weight rows interleaved at M = 1
constexpr int kMB = 4;          // rows of x per tile at M > 1
constexpr int kNR = 2;          // weight rows per tile at M > 1
constexpr int64_t kBlock = 32;  // weight rows whose values stay in L2 while x streams past (M > 1)

template <DType V, int NR, bool GROUPED>
void tile_m(const SparseLinearProblem& p, int64_t m0, int mb, int64_t j0) {
  with_count<4>(mb, [&](auto mr) { tile<V, decltype(mr)::value, NR, GROUPED>(p, m0, j0); });
}

template <DType V, bool GROUPED>
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

template <DType V>
int64_t run_values(const SparseLinearProblem& p, int64_t n_begin, int64_t n_end) {
  return p.group_chunks > 0 ? run<V, true>(p, n_begin, n_end) : run<V, false>(p, n_begin, n_end);
}

// Rows [j0, j1) of the weight as dense rows of k elements in rows_out: chunk(vp, mask_word, dst) writes the
// 16 columns of one chunk at dst and advances vp past its kept values. A row's last, partial chunk goes
// through a buffer: a full store would write into the next row (another thread's).
template <typename T, typename Out, typename Chunk>
inline void expand_rows(const SparseLinearProblem& p, Out* rows_out, int64_t j0, int64_t j1, Chunk chunk) {
  const int64_t nc = p.n_chunks;
  for (int64_t j = j0; j < j1; ++j) {
    const T* vp = static_cast<const T*>(p.values) + p.row_offsets[j];
    const uint16_t* row = p.masks + j * nc;
    Out* out = rows_out + (j - j0) * p.k;
    for (int64_t c = 0; c < nc; ++c) {
      if (16 * c + 16 <= p.k) {
        chunk(vp, row[c], out + 16 * c);
      } else {
        alignas(32) Out tail[16];
        chunk(vp, row[c], tail);
        std::memcpy(out + 16 * c, tail, sizeof(Out) * (p.k - 16 * c));
      }
    }
  }
}

}  // namespace

int64_t sparse_expand_int8_avx2(const SparseLinearProblem& p, int8_t* block, int64_t j0, int64_t j1) {
  const int64_t bad = first_bad_row(p, j0, j1);
  if (bad >= 0) return bad;
  expand_rows<int8_t>(p, block, j0, j1, [](const int8_t*& vp, unsigned word, int8_t* dst) {
    const unsigned low = word & 0xffu, high = word >> 8;
    const unsigned low_kept = _mm_popcnt_u32(low);
    const __m128i lower =
        _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(vp)),
                         _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kByteRank.entry + low)));
    const __m128i upper =
        _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(vp + low_kept)),
                         _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kByteRank.entry + high)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_unpacklo_epi64(lower, upper));
    vp += low_kept + _mm_popcnt_u32(high);
  });
  return -1;
}

namespace {

template <DType V>
void expand_float_rows(const SparseLinearProblem& p, float* rows_out, int64_t j0, int64_t j1) {
  using T = typename Val<V>::T;
  expand_rows<T>(p, rows_out, j0, j1, [](const T*& vp, unsigned word, float* dst) {
    _mm256_storeu_ps(dst, expand8<V>(vp, word & 0xffu));
    _mm256_storeu_ps(dst + 8, expand8<V>(vp, word >> 8));
  });
}

}  // namespace

int64_t sparse_expand_float_avx2(const SparseLinearProblem& p, float* rows_out, int64_t j0, int64_t j1) {
  const int64_t bad = first_bad_row(p, j0, j1);
  if (bad >= 0) return bad;
  switch (p.vtype) {
    case DType::kFloat32:
      expand_float_rows<DType::kFloat32>(p, rows_out, j0, j1);
      break;
    case DType::kBFloat16:
      expand_float_rows<DType::kBFloat16>(p, rows_out, j0, j1);
      break;
    case DType::kFloat16:
      expand_float_rows<DType::kFloat16>(p, rows_out, j0, j1);
      break;
    case DType::kInt8:
      break;
  }
  return -1;
}

int64_t sparse_linear_avx2(const SparseLinearProblem& p, int64_t n_begin, int64_t n_end) {
  if (p.x_fixed) return run_fixed(p, n_begin, n_end);
  switch (p.vtype) {
    case DType::kFloat32:
      return run_values<DType::kFloat32>(p, n_begin, n_end);
    case DType::kBFloat16:
      return run_values<DType::kBFloat16>(p, n_begin, n_end);
    case DType::kFloat16:
      return run_values<DType::kFloat16>(p, n_begin, n_end);
    case DType::kInt8:
      return run_values<DType::kInt8>(p, n_begin, n_end);
  }
  return -1;
}

}  // namespace fastquant::cpu
