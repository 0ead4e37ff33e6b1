// AVX-512 kernels for int8_linear (compiled with -mavx512f/bw/vl/dq/vnni/bf16 -mfma; no torch headers:
// nothing here may be inlined into code that runs on a CPU without AVX-512).
//
// cpu_avx512_fp32 (decode, small M): K in the 16 lanes. Each weight row is read once from memory
// (int8 -> int32 -> fp32 in registers) and FMA'd with fp32 activations; several output columns at once
// share each activation load. Grouped scales multiply the converted weight (q * s in fp32, exactly as the
// reference dequantizes); per-channel scales multiply the reduced dot product. No activation rounding:
// products and sums are fp32, so small M matches the reference to fp32 rounding.
//
// cpu_avx512_bf16 (prefill, larger M): output columns are processed in tiles of 64; for each K chunk
// the tile's int8 weights are converted once to bf16 (exact) into a per-thread scratch that stays in L1/L2,
// then reused for every row of x. The activations were rounded to bf16 once per call by the glue and are
// transposed so that 16 rows of x fill the lanes of one vector: acc[col][rows] += dpbf16(x pairs,
// broadcast weight pair). Each group (or K chunk, per-channel) is accumulated from zero in fp32 and
// added to an fp32 output slab with its fp32 scale (C += acc * s). The slab is finally transposed
// into y with the bias.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/avx512_expand.h"
#include "cpu/int8_linear.h"
#include "static_count.h"

namespace fastquant::cpu {
namespace {

#ifndef FQ_PF_DIST
#define FQ_PF_DIST 4096
#endif
#ifndef FQ_PF_DIST_TILE
#define FQ_PF_DIST_TILE 1024
#endif

inline __m512 cvt_w16(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); }

// ---------------------------------------------------------------- fp32 path (K in lanes)

template <int MR, int NR, bool GROUPED>
void fp32_tile(const Int8LinearProblem& p, int64_t m0, int64_t j0) {
  const int64_t K = p.k;
  const float* x = p.x_f32 + m0 * K;
  const int8_t* w = p.w + (j0 - p.w_first_row) * K;
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t G = GROUPED ? p.group_size : K;
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, ++g) {
    const int64_t k1 = k0 + G < K ? k0 + G : K;
    __m512 s[NR];
    if (GROUPED) {
      for (int c = 0; c < NR; ++c) s[c] = _mm512_set1_ps(p.scales[(j0 + c) * p.n_groups + g]);
    }
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) {
      if ((k & 63) == 0) {
        for (int c = 0; c < NR; ++c) {
          _mm_prefetch(reinterpret_cast<const char*>(w + c * K + k + FQ_PF_DIST_TILE), _MM_HINT_NTA);
        }
      }
      __m512 wv[NR];
      for (int c = 0; c < NR; ++c) {
        wv[c] = cvt_w16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * K + k)));
        if (GROUPED) wv[c] = _mm512_mul_ps(wv[c], s[c]);
      }
      for (int r = 0; r < MR; ++r) {
        const __m512 xv = _mm512_loadu_ps(x + r * K + k);
        for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
      }
    }
    if (k < k1) {
      const __mmask16 mk = static_cast<__mmask16>((1u << (k1 - k)) - 1);
      __m512 wv[NR];
      for (int c = 0; c < NR; ++c) {
        wv[c] = cvt_w16(_mm_maskz_loadu_epi8(mk, w + c * K + k));
        if (GROUPED) wv[c] = _mm512_mul_ps(wv[c], s[c]);
      }
      for (int r = 0; r < MR; ++r) {
        const __m512 xv = _mm512_maskz_loadu_ps(mk, x + r * K + k);
        for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < NR; ++c) {
      float v = _mm512_reduce_add_ps(acc[r][c]);
      if (!GROUPED) v *= p.scales[j0 + c];
      if (p.bias_f32) v += p.bias_f32[j0 + c];
      p.y_f32[(m0 + r) * p.n + j0 + c] = v;
    }
  }
}

template <int MR, bool GROUPED>
void fp32_cols(const Int8LinearProblem& p, int64_t m0, int64_t j0, int64_t nc) {
  with_count<8>(nc, [&](auto nr) { fp32_tile<MR, decltype(nr)::value, GROUPED>(p, m0, j0); });
}

// M = 1: sum over k in [ka, kb) of x[k] * w[k] (* its group's scale when GROUPED), ka on a group start.
// Reads w sequentially with 4 accumulators, prefetching (non-temporal) the line that is read pf bytes
// later in the thread's access order.
template <bool GROUPED>
inline float dot_range(const int8_t* w, const float* x, int64_t ka, int64_t kb, int64_t G, const float* srow,
                       int64_t pf) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
         a3 = _mm512_setzero_ps();
  for (int64_t k0 = ka; k0 < kb; k0 += G) {
    const int64_t k1 = k0 + G < kb ? k0 + G : kb;
    const __m512 s = _mm512_set1_ps(GROUPED ? srow[k0 / G] : 1.f);
    auto wv = [&](int64_t kk) {
      const __m512 v = cvt_w16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kk)));
      return GROUPED ? _mm512_mul_ps(v, s) : v;
    };
    int64_t k = k0;
    for (; k + 64 <= k1; k += 64) {
      // One cache line per iteration. Non-temporal prefetch a few KiB ahead: the weight is used once,
      // and this keeps more misses in flight than the hardware prefetcher alone (~1.3-1.5x at M = 1).
      _mm_prefetch(reinterpret_cast<const char*>(w + k + pf), _MM_HINT_NTA);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), wv(k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), wv(k + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), wv(k + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), wv(k + 48), a3);
    }
    for (; k + 16 <= k1; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), wv(k), a0);
    if (k < k1) {
      const __mmask16 mk = static_cast<__mmask16>((1u << (k1 - k)) - 1);
      __m512 v = cvt_w16(_mm_maskz_loadu_epi8(mk, w + k));
      if (GROUPED) v = _mm512_mul_ps(v, s);
      a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x + k), v, a1);
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

constexpr int64_t kRow1Chunk = 4096;  // K elements of x per pass: 16 KiB of fp32, stays in L1
constexpr int64_t kRow1Rows = 8;      // rows sharing one x chunk

// M = 1. K <= kRow1Chunk: one weight row after the other, so each thread reads its slice of the weight as
// a single sequential stream. Larger K: blocks of 8 rows are read in K chunks of 4096 (row by row within a
// chunk), so the fp32 x chunk stays in L1 instead of being re-read from L2 for every weight row.
template <bool GROUPED>
void fp32_row1(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end) {
  const int64_t K = p.k;
  const int64_t G = GROUPED ? p.group_size : K;
  const bool chunked = K > kRow1Chunk && (!GROUPED || kRow1Chunk % G == 0);
  const int64_t chunk = chunked ? kRow1Chunk : K;
  const int64_t rows = chunked ? kRow1Rows : 1;
  const int64_t gstep = GROUPED ? G : chunk;
  for (int64_t j0 = n_begin; j0 < n_end; j0 += rows) {
    const int64_t nr = n_end - j0 < rows ? n_end - j0 : rows;
    float part[kRow1Rows] = {};
    for (int64_t kc = 0; kc < K; kc += chunk) {
      const int64_t kb = kc + chunk < K ? kc + chunk : K;
      for (int64_t r = 0; r < nr; ++r) {
        const int8_t* w = p.w + (j0 + r - p.w_first_row) * K;
        // Prefetch target: the same offset in the next row read (next row of the block, or the first row's
        // next chunk, or the next block); past the thread's slice it is harmless.
        const int64_t pf =
            !chunked ? FQ_PF_DIST : (r + 1 < nr ? K : (kb < K ? chunk - (nr - 1) * K : nr * K - kc));
        part[r] += dot_range<GROUPED>(w, p.x_f32, kc, kb, gstep,
                                      GROUPED ? p.scales + (j0 + r) * p.n_groups : nullptr, pf);
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      float v = part[r];
      if (!GROUPED) v *= p.scales[j0 + r];
      if (p.bias_f32) v += p.bias_f32[j0 + r];
      p.y_f32[j0 + r] = v;
    }
  }
}

template <bool GROUPED>
void fp32_run(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end) {
  // One row: 8 columns (8 independent FMA chains hide the FMA latency). More rows: 4 columns x 4 rows,
  // the 4 weight rows are re-read from L1/L2 for every 4 rows of x.
  if (p.m == 1) return fp32_row1<GROUPED>(p, n_begin, n_end);
  const int64_t nr = 4;
  for (int64_t j0 = n_begin; j0 < n_end; j0 += nr) {
    const int64_t nc = n_end - j0 < nr ? n_end - j0 : nr;
    int64_t m0 = 0;
    for (; m0 + 4 <= p.m; m0 += 4) fp32_cols<4, GROUPED>(p, m0, j0, nc);
    // A plain switch, not with_count: with with_count's lambda here, GCC's code for this function (which
    // also starts the M = 1 path) made M = 1 from DRAM 1.5x slower on one thread (1536 x 576 per channel,
    // 60 -> 90 us; the same inner loop, the weight hot in cache at parity). Measured, cause not found:
    // benchmarks/NOTES.md, "One contract per op".
    switch (p.m - m0) {
      case 1:
        fp32_cols<1, GROUPED>(p, m0, j0, nc);
        break;
      case 2:
        fp32_cols<2, GROUPED>(p, m0, j0, nc);
        break;
      case 3:
        fp32_cols<3, GROUPED>(p, m0, j0, nc);
        break;
      default:
        break;
    }
  }
}

// ---------------------------------------------------------------- fixed-point path (M = 1, VNNI)

// Rows [j, j + R) at M = 1 with x in fixed point. X = sum_b 2^(8b) x_b (bytes 0-2 unsigned, byte 3
// signed), so q.X = sum_b 2^(8b) q.x_b: vpdpbusd multiplies 64 unsigned bytes by 64 signed ones and sums
// each 4 into an int32 lane, so planes 0-2 take the weight bytes as they are; for the signed top byte the
// weights go in as the unsigned side, q + 128 (an XOR of the sign bit), which adds 128 times the group's
// sum of x_3 (x_fixed_top_sums), taken off at the group's end. Sums are exact: a plane's lanes hold at most
// 255 * 128 * K < 2^31 (K <= kFixedPointMaxK, checked by the glue), and the planes combine in int64. The R
// rows share each step's 4 plane loads.
struct PlaneSums {
  __m512i s0, s1, s2, s3;
};

// One row's 64 columns: 4 vpdpbusd into its plane sums.
template <bool FULL>
__attribute__((always_inline)) inline void dot_step(PlaneSums& a, const int8_t* w, __mmask64 in, __m512i x0,
                                                    __m512i x1, __m512i x2, __m512i x3, __m512i sign_bits) {
  // Non-temporal prefetch a few KiB ahead in the row's own stream: the weight is used once.
  _mm_prefetch(reinterpret_cast<const char*>(w + FQ_PF_DIST), _MM_HINT_NTA);
  // Whole steps load unmasked: a masked load streamed SmolLM2's small rows from DRAM at half the speed.
  const __m512i q = FULL ? _mm512_loadu_si512(w) : _mm512_maskz_loadu_epi8(in, w);
  a.s0 = dpbusd(a.s0, x0, q);
  a.s1 = dpbusd(a.s1, x1, q);
  a.s2 = dpbusd(a.s2, x2, q);
  a.s3 = dpbusd(a.s3, _mm512_xor_si512(q, sign_bits), x3);
}

// The R rows' step at column k: the 4 plane loads shared by the rows.
template <int R, bool FULL>
__attribute__((always_inline)) inline void rows_step(const uint8_t* planes, int64_t stride, int64_t k,
                                                     __mmask64 in, const int8_t* w0, const int8_t* w1,
                                                     const int8_t* w2, const int8_t* w3, PlaneSums& a0,
                                                     PlaneSums& a1, PlaneSums& a2, PlaneSums& a3,
                                                     __m512i sign_bits) {
  const __m512i x0 = _mm512_loadu_si512(planes + k);
  const __m512i x1 = _mm512_loadu_si512(planes + stride + k);
  const __m512i x2 = _mm512_loadu_si512(planes + 2 * stride + k);
  const __m512i x3 = _mm512_loadu_si512(planes + 3 * stride + k);
  dot_step<FULL>(a0, w0 + k, in, x0, x1, x2, x3, sign_bits);
  if (R > 1) dot_step<FULL>(a1, w1 + k, in, x0, x1, x2, x3, sign_bits);
  if (R > 2) dot_step<FULL>(a2, w2 + k, in, x0, x1, x2, x3, sign_bits);
  if (R > 2) dot_step<FULL>(a3, w3 + k, in, x0, x1, x2, x3, sign_bits);
}

inline int64_t plane_dot(const PlaneSums& a, int64_t top_bias) {
  return (int64_t{_mm512_reduce_add_epi32(a.s3)} - top_bias) * (int64_t{1} << 24) +
         int64_t{_mm512_reduce_add_epi32(a.s2)} * (1 << 16) +
         int64_t{_mm512_reduce_add_epi32(a.s1)} * (1 << 8) + _mm512_reduce_add_epi32(a.s0);
}

template <int R, bool GROUPED>
void fixed_rows(const Int8LinearProblem& p, int64_t j) {
  static_assert(R == 1 || R == 2 || R == 4, "rows per pass");
  const int64_t K = p.k;
  const int64_t G = GROUPED ? p.group_size : K;
  const uint8_t* planes = p.x_fixed;
  const int64_t stride = p.x_fixed_stride;
  const __m512i sign_bits = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* w0 = p.w + (j - p.w_first_row) * K;
  const int8_t* w1 = w0 + (R > 1 ? K : 0);
  const int8_t* w2 = w0 + (R > 2 ? 2 * K : 0);
  const int8_t* w3 = w0 + (R > 2 ? 3 * K : 0);
  double total[R] = {};
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, ++g) {
    const int64_t k1 = k0 + G < K ? k0 + G : K;
    const __m512i zero = _mm512_setzero_si512();
    PlaneSums a0{zero, zero, zero, zero}, a1 = a0, a2 = a0, a3 = a0;
    int64_t k = k0;
    for (; k + 64 <= k1; k += 64) {
      rows_step<R, true>(planes, stride, k, 0, w0, w1, w2, w3, a0, a1, a2, a3, sign_bits);
    }
    // Past k1 (only at K's end: groups are whole 64-column steps) the weight load is masked and the planes
    // are zero, so the masked-off lanes (q + 128 = 128 times a zero plane byte) add nothing.
    if (k < k1) {
      const __mmask64 in = (__mmask64{1} << (k1 - k)) - 1;
      rows_step<R, false>(planes, stride, k, in, w0, w1, w2, w3, a0, a1, a2, a3, sign_bits);
    }
    const int64_t top_bias = 128 * p.x_fixed_top_sums[g];
    const PlaneSums* sums[4] = {&a0, &a1, &a2, &a3};
    for (int r = 0; r < R; ++r) {
      const double dot = static_cast<double>(plane_dot(*sums[r], top_bias));
      total[r] += GROUPED ? dot * p.scales[(j + r) * p.n_groups + g] : dot;
    }
  }
  for (int r = 0; r < R; ++r) {
    double v = total[r] * p.x_fixed_step;
    if (!GROUPED) v *= p.scales[j + r];
    float y = static_cast<float>(v);
    if (p.bias_f32) y += p.bias_f32[j + r];
    p.y_f32[j + r] = y;
  }
}

template <bool GROUPED>
void fixed_run(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end) {
  // 4 rows per pass share the plane loads: one row per pass re-read the planes (4K bytes, past L1 at large K)
  // for every row, 2.5x slower at K = 11008.
  int64_t j = n_begin;
  for (; j + 4 <= n_end; j += 4) fixed_rows<4, GROUPED>(p, j);
  for (; j + 2 <= n_end; j += 2) fixed_rows<2, GROUPED>(p, j);
  for (; j < n_end; ++j) fixed_rows<1, GROUPED>(p, j);
}

// ---------------------------------------------------------------- bf16 path (rows in lanes)

constexpr int kNR = 8;  // columns per micro tile (broadcast operands)

// acc[c][v] over pairs [q0, q1) of the chunk, then C[c][v] += acc * s[c].
template <int MV>
inline void bf16_micro(const uint32_t* xt, int64_t xs, const uint32_t* wb, int64_t wstride, int64_t q0,
                       int64_t q1, float* C, int64_t cstride, const float* s) {
  __m512 acc[kNR][MV];
  for (int c = 0; c < kNR; ++c)
    for (int v = 0; v < MV; ++v) acc[c][v] = _mm512_setzero_ps();
  for (int64_t q = q0; q < q1; ++q) {
    __m512bh xv[MV];
    for (int v = 0; v < MV; ++v) xv[v] = (__m512bh)_mm512_loadu_si512(xt + q * xs + 16 * v);
    for (int c = 0; c < kNR; ++c) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(wb[c * wstride + q]));
      for (int v = 0; v < MV; ++v) acc[c][v] = _mm512_dpbf16_ps(acc[c][v], xv[v], b);
    }
  }
  for (int c = 0; c < kNR; ++c) {
    const __m512 sc = _mm512_set1_ps(s[c]);
    for (int v = 0; v < MV; ++v) {
      float* cp = C + c * cstride + 16 * v;
      _mm512_storeu_ps(cp, _mm512_fmadd_ps(acc[c][v], sc, _mm512_loadu_ps(cp)));
    }
  }
}

// Converts int8 w[0..len) to bf16 (exact) at dst, zero-filled up to len16 (a multiple of 16).
inline void convert_row_bf16(const int8_t* w, int64_t len, int64_t len16, uint16_t* dst) {
  int64_t k = 0;
  for (; k + 16 <= len; k += 16) {
    const __m512 f = cvt_w16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), (__m256i)_mm512_cvtneps_pbh(f));
  }
  for (; k < len16; k += 16) {
    const int64_t rem = len - k;
    const __mmask16 mk = rem <= 0 ? 0 : static_cast<__mmask16>((1u << (rem < 16 ? rem : 16)) - 1);
    const __m512 f = cvt_w16(_mm_maskz_loadu_epi8(mk, w + k));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), (__m256i)_mm512_cvtneps_pbh(f));
  }
}

// Columns [kc0, kc0 + klen16) of a bitmap16 row (kc0 on a chunk boundary; the masks are zero past K) as
// bf16 (exact: int8 codes) at dst. vp is the row's value pointer at column kc0 and moves past them; its
// 16-byte loads stay inside values (the row's popcounts were checked against its offsets by the glue).
inline void expand_row_bf16(const Bitmap16Int8& b, int64_t row, int64_t kc0, int64_t klen16,
                            const int8_t*& vp, uint16_t* dst) {
  const uint16_t* masks = b.masks + row * b.n_chunks + kc0 / 16;
  for (int64_t c = 0; c < klen16 / 16; ++c) {
    const unsigned bits = masks[c];
    const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vp)));
    vp += _mm_popcnt_u32(bits);
    const __m512 f = _mm512_cvtepi32_ps(expand_epi32(static_cast<__mmask16>(bits), q));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c), (__m256i)_mm512_cvtneps_pbh(f));
  }
}

}  // namespace

void int8_linear_avx512_vnni_fixed(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end, void*) {
  if (p.group_size < p.k) {
    fixed_run<true>(p, n_begin, n_end);
  } else {
    fixed_run<false>(p, n_begin, n_end);
  }
}

void int8_linear_avx512_fp32(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end, void*) {
  if (p.group_size < p.k) {
    fp32_run<true>(p, n_begin, n_end);
  } else {
    fp32_run<false>(p, n_begin, n_end);
  }
}

// in[c] holds column c's 16 rows; out[i] gets row i's 16 columns. Three rounds of in-lane unpacks and
// 128-bit shuffles (64 instructions for 256 floats).
inline void transpose16x16(const __m512 in[16], __m512 out[16]) {
  __m512 t[16], u[16];
  for (int c = 0; c < 16; c += 2) {
    t[c] = _mm512_unpacklo_ps(in[c], in[c + 1]);  // per 128-bit lane L: rows 4L, 4L + 1 of columns c, c + 1
    t[c + 1] = _mm512_unpackhi_ps(in[c], in[c + 1]);  // rows 4L + 2, 4L + 3
  }
  for (int g = 0; g < 4; ++g) {  // u[4g + k], lane L: columns 4g..4g+3 of row 4L + k
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int k = 0; k < 4; ++k) {  // row 4L + k gathers lane L of u[k], u[4 + k], u[8 + k], u[12 + k]
    const __m512 v0 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xdd);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xdd);
    out[k] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    out[4 + k] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    out[8 + k] = _mm512_shuffle_f32x4(v0, w0, 0xdd);
    out[12 + k] = _mm512_shuffle_f32x4(v1, w1, 0xdd);
  }
}

void int8_linear_avx512_bf16_x(const float* x, int64_t m, int64_t k, int64_t mp, int64_t xt_stride,
                               uint32_t* xt) {
  const int64_t kp2 = (k + 1) / 2;
  for (int64_t i0 = 0; i0 < mp; i0 += 16) {
    for (int64_t p0 = 0; p0 < kp2; p0 += 16) {
      // 16 rows x 32 columns of x -> 16 rows x 16 bf16 pairs (vcvtne2ps2bf16 puts its second operand's
      // conversions in the low half, so each 32-bit lane holds the pair (x[2q], x[2q + 1])), then
      // transposed to 16 pairs x 16 rows. Masked loads stop at k (the odd column's partner is zero).
      const int64_t left = k - 2 * p0;
      const __mmask16 lo = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
      const __mmask16 hi = left >= 32  ? 0xFFFF
                           : left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1)
                                       : 0;
      __m512 in[16], out[16];
      for (int r = 0; r < 16; ++r) {
        if (i0 + r < m) {
          const float* row = x + (i0 + r) * k + 2 * p0;
          const __m512bh pairs =
              _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, row + 16), _mm512_maskz_loadu_ps(lo, row));
          in[r] = _mm512_castsi512_ps(reinterpret_cast<__m512i>(pairs));
        } else {
          in[r] = _mm512_setzero_ps();
        }
      }
      transpose16x16(in, out);
      const int64_t np = kp2 - p0 < 16 ? kp2 - p0 : 16;
      for (int64_t q = 0; q < np; ++q) {
        _mm512_storeu_ps(reinterpret_cast<float*>(xt + (p0 + q) * xt_stride + i0), out[q]);
      }
    }
  }
}

// scratch: kBf16TileCols x kcs bf16 weight tile, then kBf16TileCols x mp fp32 output slab.
void int8_linear_avx512_bf16(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end, void* scratch) {
  const int64_t K = p.k, mp = p.mp, KC = p.kc;
  const bool grouped = p.group_size < K;
  const int64_t kcs = (KC + 31) / 32 * 32;  // bf16 elements per tile column (even: whole pairs)
  uint16_t* wtile = static_cast<uint16_t*>(scratch);
  float* slab = reinterpret_cast<float*>(wtile + kBf16TileCols * kcs);
  const int64_t wstride = kcs / 2;  // in pairs
  const uint32_t* wpairs = reinterpret_cast<const uint32_t*>(wtile);
  float s[kBf16TileCols];

  for (int64_t j0 = n_begin; j0 < n_end; j0 += kBf16TileCols) {
    const int64_t nc = n_end - j0 < kBf16TileCols ? n_end - j0 : kBf16TileCols;
    const int64_t nc8 = (nc + kNR - 1) / kNR * kNR;
    std::memset(slab, 0, sizeof(float) * nc8 * mp);
    const int8_t* row_values[kBf16TileCols];  // bitmap16: each column's value pointer at kc0
    for (int64_t c = 0; p.bitmap && c < nc; ++c)
      row_values[c] = p.bitmap->values + p.bitmap->row_offsets[j0 + c];
    for (int64_t kc0 = 0; kc0 < K; kc0 += KC) {
      const int64_t klen = K - kc0 < KC ? K - kc0 : KC;
      const int64_t klen16 = (klen + 15) / 16 * 16;
      for (int64_t c = 0; c < nc8; ++c) {
        uint16_t* dst = wtile + c * kcs;
        if (c < nc && p.bitmap) {
          expand_row_bf16(*p.bitmap, j0 + c, kc0, klen16, row_values[c], dst);
        } else if (c < nc) {
          convert_row_bf16(p.w + (j0 + c - p.w_first_row) * K + kc0, klen, klen16, dst);
        } else {
          std::memset(dst, 0, sizeof(uint16_t) * klen16);
        }
      }
      const int64_t G = grouped ? p.group_size : klen;  // even when grouped (checked by the glue)
      for (int64_t g0 = 0; g0 < klen; g0 += G) {
        const int64_t g1 = g0 + G < klen ? g0 + G : klen;
        const int64_t q0 = g0 / 2, q1 = (g1 + 1) / 2;  // pairs; an odd K ends on a zero-padded pair
        const int64_t gi = grouped ? (kc0 + g0) / p.group_size : 0;
        const uint32_t* xg = p.xt + (kc0 / 2) * p.xt_stride;
        for (int64_t c = 0; c < nc8; ++c) s[c] = c < nc ? p.scales[(j0 + c) * p.n_groups + gi] : 0.f;
        // Rows outer, columns inner: a block of 48 rows of x (the chunk's pairs, 24 KiB at KC = 256) stays in
        // L1 while every 8-column block of the tile passes over it.
        for (int64_t m0 = 0; m0 < mp; m0 += 48) {
          for (int64_t cb = 0; cb < nc8; cb += kNR) {
            const uint32_t* wb = wpairs + cb * wstride;
            float* C = slab + cb * mp + m0;
            if (mp - m0 >= 48) {
              bf16_micro<3>(xg + m0, p.xt_stride, wb, wstride, q0, q1, C, mp, s + cb);
            } else if (mp - m0 == 32) {
              bf16_micro<2>(xg + m0, p.xt_stride, wb, wstride, q0, q1, C, mp, s + cb);
            } else {
              bf16_micro<1>(xg + m0, p.xt_stride, wb, wstride, q0, q1, C, mp, s + cb);
            }
          }
        }
      }
    }
    // Transpose the slab into y (m x n, fp32) with the bias, 16 x 16 at a time: GCC's code for the plain
    // loop (one float per slab column, gathered) took a third of the kernel's time at SmolLM2's shapes.
    for (int64_t c0 = 0; c0 < nc; c0 += 16) {
      const int64_t cw = nc - c0 < 16 ? nc - c0 : 16;
      const __mmask16 cols = static_cast<__mmask16>((1u << cw) - 1);
      const __m512 bias =
          p.bias_f32 ? _mm512_maskz_loadu_ps(cols, p.bias_f32 + j0 + c0) : _mm512_setzero_ps();
      for (int64_t i0 = 0; i0 < p.m; i0 += 16) {
        __m512 in[16], out[16];
        // Columns past the tile's end: zeros in, masked off on the way out.
        for (int c = 0; c < 16; ++c) {
          in[c] = c < cw ? _mm512_loadu_ps(slab + (c0 + c) * mp + i0) : _mm512_setzero_ps();
        }
        transpose16x16(in, out);
        const int64_t rows = p.m - i0 < 16 ? p.m - i0 : 16;
        for (int64_t i = 0; i < rows; ++i) {
          _mm512_mask_storeu_ps(p.y_f32 + (i0 + i) * p.n + j0 + c0, cols, _mm512_add_ps(out[i], bias));
        }
      }
    }
  }
}

}  // namespace fastquant::cpu
