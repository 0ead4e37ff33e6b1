// AVX-512 kernel for sparse_linear (compiled with -mavx512f/bw/vl/dq/vnni/bf16 -mfma; no torch headers).
// Needs only AVX-512F for the expansion (no VBMI2): per 16-column chunk the 16-bit mask word is a
// k-register, 16 packed values are loaded unaligned at the row's running position (the 64-element padding
// makes the over-read safe), widened to 32-bit lanes (vpmovsxbd for int8, vpmovzxwd + shift for bf16,
// vcvtph2ps for fp16) and vexpandps/vpexpandd moves the first popcount(mask) of them into the kept lanes,
// zeroing the rest; one FMA with x's 16 fp32 activations, and the pointer advances by popcnt(mask).
// The register form (load, then vexpandps) is used for fp32 values too: the memory form (vexpandps
// zmm{k}{z}, m512) measured no faster on Zen 5. With VBMI/VBMI2, int8 values at M = 1 take rows_bytes.
//
// M = 1 reads one weight row at a time (row1); M > 1 expands each chunk once and FMAs it into up to 8 rows
// of x, weight rows in blocks of 32 whose values stay in L2 while the x blocks stream past.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/avx512_expand.h"
#include "cpu/sparse_linear.h"
#include "static_count.h"

namespace fastquant::cpu {
namespace {

#ifndef FQ_SPARSE_PF
#define FQ_SPARSE_PF 1024  // bytes of values prefetched ahead of each row pointer (0: none)
#endif

template <DType V>
struct Val;
template <>
struct Val<DType::kFloat32> {
  using T = float;
  static __m512 expand(const T* p, __mmask16 k) { return expand_ps(k, _mm512_loadu_ps(p)); }
};
template <>
struct Val<DType::kBFloat16> {
  using T = uint16_t;
  static __m512 expand(const T* p, __mmask16 k) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(expand_epi32(k, _mm512_slli_epi32(u, 16)));
  }
};
template <>
struct Val<DType::kFloat16> {
  using T = uint16_t;
  static __m512 expand(const T* p, __mmask16 k) {
    return expand_ps(k, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  }
};
template <>
struct Val<DType::kInt8> {
  using T = int8_t;
  static __m512 expand(const T* p, __mmask16 k) {
    const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtepi32_ps(expand_epi32(k, q));
  }
};

template <DType V, int MB, int NR, bool GROUPED>
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

constexpr int kMB = 8;          // rows of x per tile at M > 1
constexpr int kNR = 2;          // weight rows per tile at M > 1
constexpr int64_t kBlock = 32;  // weight rows whose values stay in L2 while x streams past (M > 1)
constexpr int kUnroll = 4;      // chunks per step at M = 1: one 64-bit load of 4 mask words

// M = 1: one weight row at a time, so each thread reads its slice of values as one sequential stream,
// 4 chunks per step into 4 accumulators (independent FMA chains; the pointer chain is one add per chunk).
// Interleaving 4 rows (4 streams, one accumulator each) was 1.3-1.8x slower on Zen 5 (4096 x 4096).
template <DType V, bool GROUPED>
void row1(const SparseLinearProblem& p, int64_t j) {
  using T = typename Val<V>::T;
  const T* vp = static_cast<const T*>(p.values) + p.row_offsets[j];
  const uint16_t* mrow = p.masks + j * p.n_chunks;
  const float* x = p.x;
  __m512 acc[kUnroll];
  for (int u = 0; u < kUnroll; ++u) acc[u] = _mm512_setzero_ps();
  const int64_t nc = p.n_chunks;
  const int64_t gc = GROUPED ? p.group_chunks : nc;
  auto chunk = [&](int64_t c, __m512 s, __m512& a) {
    const unsigned bits = mrow[c];
    __m512 w = Val<V>::expand(vp, static_cast<__mmask16>(bits));
    vp += _mm_popcnt_u32(bits);
    if (GROUPED) w = _mm512_mul_ps(w, s);
    a = _mm512_fmadd_ps(_mm512_loadu_ps(x + 16 * c), w, a);
  };
  for (int64_t c0 = 0; c0 < nc; c0 += gc) {
    const int64_t c1 = c0 + gc < nc ? c0 + gc : nc;
    const __m512 s = _mm512_set1_ps(GROUPED ? p.scales[j * p.n_groups + c0 / gc] : 1.f);
    int64_t c = c0;
    for (; c + kUnroll <= c1; c += kUnroll) {
      // 4 chunks of fp32 values at 50% are two cache lines: prefetch both.
      for (int l = 0; FQ_SPARSE_PF > 0 && l < (sizeof(T) == 4 ? 2 : 1); ++l) {
        _mm_prefetch(reinterpret_cast<const char*>(vp) + FQ_SPARSE_PF + 64 * l, _MM_HINT_T0);
      }
      for (int u = 0; u < kUnroll; ++u) chunk(c + u, s, acc[u]);
    }
    for (; c < c1; ++c) chunk(c, s, acc[0]);
  }
  float v = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  if (!GROUPED && p.scales) v *= p.scales[j];
  if (p.bias) v += p.bias[j];
  p.y[j] = v;
}

// M = 1, int8 values, CPUs with VBMI2 and VBMI (Isa::kAvx512Vbmi; the target attribute keeps these
// instructions out of the rest of the file). Per 64 columns: one vpexpandb moves the kept bytes into their
// columns (the 64-bit mask is 4 mask words), then per 16 of them one vpermb puts byte i into the top byte of
// 32-bit lane i and zeroes the rest, i.e. q << 24, which vcvtdq2ps converts exactly. The row's sum is
// scaled by 2^-24 at the end, a power of two, so the result is that of the unscaled sums. Against row1
// (per 16 columns: vpmovsxbd, vpexpandd, vcvtdq2ps), 1 expand and 4 permutes replace 4 sign extensions
// and 4 expands: 1.1-1.3x at 50% sparsity on Zen 5 (benchmarks/NOTES.md).
// The vpermb indices: for chunk t of a step, byte 4i + 3 of the result takes byte 16t + i (the other bytes
// are zeroed by the mask). A constant table rather than one built on every call.
struct BytePlacement {
  alignas(64) uint8_t index[kUnroll][64];
};

constexpr BytePlacement make_byte_placement() {
  BytePlacement b{};
  for (int t = 0; t < kUnroll; ++t) {
    for (int i = 0; i < 64; ++i) b.index[t][i] = static_cast<uint8_t>(16 * t + i / 4);
  }
  return b;
}

constexpr BytePlacement kBytePlacement = make_byte_placement();

__attribute__((target("avx512vbmi,avx512vbmi2"))) inline __m512i expand_bytes(__mmask64 k, __m512i v) {
  asm("vpexpandb %0, %0%{%1%}%{z%}" : "+v"(v) : "Yk"(k));  // in place: see avx512_expand.h
  return v;
}

// Rows [j, j + R) at M = 1 with int8 values, VBMI2/VBMI (Isa::kAvx512Vbmi). R = 2 rows share each x load
// and overlap their per-row costs (~80 cycles per row of setup, reduction and loop exits: at K = 576 that
// was as much as the row's 9 steps of 64 columns). Returns the first of the rows whose values did not end
// at the next row's offset (its output is then garbage, and the caller raises), or -1. The caller
// guarantees that the rows cannot read past the end of values whatever their masks (see run).
template <bool GROUPED, int R>
__attribute__((target("avx512vbmi,avx512vbmi2"))) int64_t rows_bytes(const SparseLinearProblem& p,
                                                                     int64_t j) {
  constexpr __mmask64 kTopBytes = 0x8888888888888888ull;
  __m512i place[kUnroll];
  for (int t = 0; t < kUnroll; ++t) place[t] = _mm512_load_si512(kBytePlacement.index[t]);
  const int8_t* values = static_cast<const int8_t*>(p.values);
  const int64_t nc = p.n_chunks;
  const int8_t* vp[R];
  const uint16_t* mrow[R];
  const float* srow[R];
  __m512 acc[R][kUnroll];
  for (int r = 0; r < R; ++r) {
    vp[r] = values + p.row_offsets[j + r];
    mrow[r] = p.masks + (j + r) * nc;
    srow[r] = GROUPED ? p.scales + (j + r) * p.n_groups : nullptr;
    for (int t = 0; t < kUnroll; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  const uintptr_t ahead = values_ahead(p, j, R);
  const uintptr_t masks_ahead = sizeof(uint16_t) * R * nc + 64;
  // Group of the next chunk and the chunks left in it (a counter instead of a division per chunk).
  int64_t group = 0, group_left = p.group_chunks;
  int64_t c = 0;
  // Chunks [c, c + chunks) of every row: one expand per row places them; chunk t accumulates into
  // acc[r][t] (acc[r][0] for the last 1-3 chunks of a row, whose missing mask words read as zero).
  auto step = [&](int chunks, bool tail) __attribute__((target("avx512vbmi,avx512vbmi2"))) {
    __m512i kept[R];
    for (int r = 0; r < R; ++r) {
      uint64_t bits = 0;
      std::memcpy(&bits, mrow[r] + c, sizeof(uint16_t) * chunks);
      prefetch_at(vp[r], ahead);
      if (c % 32 == 0) prefetch_at(mrow[r] + c, masks_ahead);
      kept[r] = expand_bytes(bits, _mm512_loadu_si512(vp[r]));
      vp[r] += _mm_popcnt_u64(bits);
    }
    for (int t = 0; t < chunks; ++t) {
      const __m512 xv = _mm512_loadu_ps(p.x + 16 * (c + t));
      for (int r = 0; r < R; ++r) {
        __m512 w = _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(kTopBytes, place[t], kept[r]));
        if (GROUPED) w = _mm512_mul_ps(w, _mm512_set1_ps(srow[r][group]));
        __m512& a = acc[r][tail ? 0 : t];
        a = _mm512_fmadd_ps(xv, w, a);
      }
      if (GROUPED && --group_left == 0) {
        ++group;
        group_left = p.group_chunks;
      }
    }
  };
  for (; c + kUnroll <= nc; c += kUnroll) step(kUnroll, false);
  if (c < nc) step(static_cast<int>(nc - c), true);
  int64_t bad = -1;
  for (int r = 0; r < R; ++r) {
    if (bad < 0 && vp[r] != values + p.row_offsets[j + r + 1]) bad = j + r;
    float v = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));
    v *= 1.0f / 16777216.0f;  // the q << 24 of the placement: a power of two, exact
    if (!GROUPED && p.scales) v *= p.scales[j + r];
    if (p.bias) v += p.bias[j + r];
    p.y[j + r] = v;
  }
  return bad;
}

// [sum of a's lanes, b's, c's, d's]: one transposing reduction, 13 vector ops instead of four reductions'
// ~30.
inline __m128i reduce_add_4x_epi32(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}

// Rows [j, j + R) at M = 1, per-channel int8 values, x in fixed point (cpu_avx512_vnni_fixed). With
// X = sum_b 2^(8b) x_b (bytes x_0..x_2 unsigned, x_3 signed), q.X = sum_b 2^(8b) q.x_b: vpdpbusd multiplies
// 64 unsigned bytes by 64 signed ones and sums each 4 into a 32-bit lane, so planes 0-2 take the expanded
// values as they are. For the signed top byte the values go in as the unsigned side, q + 128 (an XOR of the
// sign bit; pruned columns read 128), which adds 128 sum_k x_3 over all columns, a per-call constant taken
// off at the end. Per 64 columns and row that is 1 expand, 1 XOR and 4 vpdpbusd (against 4 vpermb, 4
// vcvtdq2ps and 4 FMAs in rows_bytes): the fp32 paths cost as much per column as dense int8 does, so they
// could not beat it where dense int8 is not memory-bound. Sums are exact: each plane's is at most
// 255 * 128 * K < 2^31 (K <= 65536, checked by the caller), and the planes combine in int64. Up to R = 4 rows
// share each step's 4 plane loads (1.15-1.2x over R = 2, single thread, weights in L2 or L3).
template <int R>
__attribute__((target("avx512vbmi,avx512vbmi2"))) int64_t rows_fixed(const SparseLinearProblem& p,
                                                                     int64_t j) {
  const int8_t* values = static_cast<const int8_t*>(p.values);
  const int64_t nc = p.n_chunks;
  const uint8_t* planes = p.x_fixed;
  const int64_t stride = p.x_fixed_stride;
  const __m512i sign_bits = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* vp[R];
  const uint16_t* mrow[R];
  __m512i acc[R][4];
  for (int r = 0; r < R; ++r) {
    vp[r] = values + p.row_offsets[j + r];
    mrow[r] = p.masks + (j + r) * nc;
    for (int b = 0; b < 4; ++b) acc[r][b] = _mm512_setzero_si512();
  }
  const uintptr_t ahead = values_ahead(p, j, R);
  const uintptr_t masks_ahead = sizeof(uint16_t) * R * nc + 64;
  // Chunks [c, c + chunks): missing mask words of a short last step read as zero, as do the planes past k.
  auto step = [&](int64_t c, int chunks) __attribute__((target("avx512vbmi,avx512vbmi2"))) {
    __m512i x[4];
    for (int b = 0; b < 4; ++b) x[b] = _mm512_loadu_si512(planes + b * stride + 16 * c);
    for (int r = 0; r < R; ++r) {
      uint64_t bits = 0;
      std::memcpy(&bits, mrow[r] + c, sizeof(uint16_t) * chunks);
      prefetch_at(vp[r], ahead);
      if (c % 32 == 0) prefetch_at(mrow[r] + c, masks_ahead);
      const __m512i q = expand_bytes(bits, _mm512_loadu_si512(vp[r]));
      vp[r] += _mm_popcnt_u64(bits);
      acc[r][0] = dpbusd(acc[r][0], x[0], q);
      acc[r][1] = dpbusd(acc[r][1], x[1], q);
      acc[r][2] = dpbusd(acc[r][2], x[2], q);
      acc[r][3] = dpbusd(acc[r][3], _mm512_xor_si512(q, sign_bits), x[3]);
    }
  };
  int64_t c = 0;
  for (; c + kUnroll <= nc; c += kUnroll) step(c, kUnroll);
  if (c < nc) step(c, static_cast<int>(nc - c));
  int64_t bad = -1;
  for (int r = 0; r < R; ++r) {
    if (bad < 0 && vp[r] != values + p.row_offsets[j + r + 1]) bad = j + r;
    alignas(16) int32_t sums[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(sums),
                    reduce_add_4x_epi32(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    const int64_t top = int64_t{sums[3]} - 128 * p.x_fixed_top_sum;
    const int64_t dot =
        top * (int64_t{1} << 24) + int64_t{sums[2]} * (1 << 16) + int64_t{sums[1]} * (1 << 8) + sums[0];
    float v = static_cast<float>(static_cast<double>(dot) * p.x_fixed_step * p.scales[j + r]);
    if (p.bias) v += p.bias[j + r];
    p.y[j + r] = v;
  }
  return bad;
}

template <DType V, int NR, bool GROUPED>
void tile_m(const SparseLinearProblem& p, int64_t m0, int mb, int64_t j0) {
  with_count<8>(mb, [&](auto mr) { tile<V, decltype(mr)::value, NR, GROUPED>(p, m0, j0); });
}

template <DType V, bool GROUPED>
int64_t run(const SparseLinearProblem& p, int64_t n_begin, int64_t n_end) {
  if (p.m == 1) {
    if constexpr (V == DType::kInt8) {
      if (p.byte_expand) {
        const bool fixed = !GROUPED && p.x_fixed;
        for (int64_t j = n_begin; j < n_end;) {
          const int64_t left = n_end - j;
          const int rows = fixed && left >= 4 ? 4 : left >= 2 ? 2 : 1;
          if (!rows_read_inside(p, j, rows)) {
            const int64_t bad = first_bad_row(p, j, j + rows);
            if (bad >= 0) return bad;
          }
          int64_t bad;
          if (fixed) {
            bad = rows == 4 ? rows_fixed<4>(p, j) : rows == 2 ? rows_fixed<2>(p, j) : rows_fixed<1>(p, j);
          } else {
            bad = rows == 2 ? rows_bytes<GROUPED, 2>(p, j) : rows_bytes<GROUPED, 1>(p, j);
          }
          if (bad >= 0) return bad;
          j += rows;
        }
        return -1;
      }
    }
    for (int64_t j = n_begin; j < n_end; ++j) {
      if (first_bad_row(p, j, j + 1) >= 0) return j;
      row1<V, GROUPED>(p, j);
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

}  // namespace

int64_t sparse_first_bad_row_avx512(const SparseLinearProblem& p, int64_t j0, int64_t j1) {
  return first_bad_row(p, j0, j1);
}

int64_t sparse_linear_avx512(const SparseLinearProblem& p, int64_t n_begin, int64_t n_end) {
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
