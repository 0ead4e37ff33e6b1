// AVX2 int4 kernels (int4_linear.h has the paths and their numerical rules). Compiled with the AVX2 flags;
// no torch headers. AVX-512 CPUs run the tiled kernel too (prefill, and x with NaN/inf).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/int4_linear.h"
#include "cpu/prefetch.h"
#include "cpu/x_block_avx2.h"

namespace fastquant::cpu {
namespace {

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 32 codes of 32-column block b of a row (b even: low nibbles of its 64-column block, odd: high).
inline __m256i block_codes(const uint8_t* row, int64_t b) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (b >> 1) * 32));
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  return _mm256_and_si256(b & 1 ? _mm256_srli_epi16(v, 4) : v, nibble);
}

// codes . X for one 32-column block, exactly, in 8 int32 lanes: vpmaddubsw takes the codes (0..15) as its
// unsigned operand and a byte plane of X as the signed one; a pair sums to at most 2 * 15 * 128 = 3840, far
// from int16 saturation. vpmaddwd by 1 (lo) and by 256 (hi) widens the pairs and applies X = 256 hi + lo;
// a lane's total is at most 4 * 15 * 32640 < 2^21, so its conversion to fp32 is exact too.
// kInt8X (cpu_avx2_int8x): X is one int8 plane (lo; hi is not read), one vpmaddubsw (a pair sums to at most
// 2 * 15 * 127, no saturation) and one vpmaddwd: half the multiplies of the 16-bit form.
template <bool kInt8X>
inline __m256i block_dot(__m256i codes, const int8_t* lo, const int8_t* hi) {
  const __m256i pl = _mm256_maddubs_epi16(codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo)));
  if constexpr (kInt8X) return _mm256_madd_epi16(pl, _mm256_set1_epi16(1));
  const __m256i ph = _mm256_maddubs_epi16(codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi)));
  return _mm256_add_epi32(_mm256_madd_epi16(pl, _mm256_set1_epi16(1)),
                          _mm256_madd_epi16(ph, _mm256_set1_epi16(256)));
}

// Output column j for row i of x. Per 32-column block: 2 vpmaddubsw, 2 vpmaddwd, one add, one conversion
// and one FMA by s * step, into two accumulators (even and odd blocks) to hide the FMA latency. Named
// variables, not arrays indexed by the block's parity: GCC keeps those in memory. For M > 1 the weight row
// comes from memory once and from L1 for the other rows. kInt8X: x as cpu_avx2_int8x's one int8 plane.
template <bool kInt8X>
void fixed16_dot(const Int4LinearProblem& p, int64_t i, int64_t j) {
  const uint8_t* row = p.w + j * p.row_bytes;
  const uint16_t* srow = p.scales + j * p.n_groups;
  const uint16_t* orow = p.offsets ? p.offsets + j * p.n_groups : nullptr;
  const int64_t n_blocks = (p.k + 31) / 32;  // a block past k (the padding half of the last 64) holds zeros
  const int64_t blocks_per_group = p.group_size / 32;
  const int8_t* lo = p.x_planes + i * 2 * p.kp;
  const int8_t* hi = lo + p.kp;
  const float* steps = p.x_steps + i * (p.kp / 32);
  const float* group_sums = p.x_group_sums + i * p.n_groups;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  float zero_term = 0.f;
  for (int64_t g = 0; g < p.n_groups; ++g) {
    const float s = h2f(srow[g]);
    // The zero point multiplies the group's sum of rounded x: -8 s (symmetric) or the offset.
    zero_term += (orow ? h2f(orow[g]) : -8.f * s) * group_sums[g];
    int64_t b = g * blocks_per_group;
    const int64_t b1 = std::min(n_blocks, b + blocks_per_group);
    if (b & 1) {  // a group that starts in the high half of a 64-column block
      const __m256 d = _mm256_cvtepi32_ps(block_dot<kInt8X>(block_codes(row, b), lo + 32 * b, hi + 32 * b));
      acc1 = _mm256_fmadd_ps(d, _mm256_set1_ps(s * steps[b]), acc1);
      ++b;
    }
    for (; b + 2 <= b1; b += 2) {  // both halves of one 64-column block: one load of 32 bytes
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * 16));
      const __m256i c0 = _mm256_and_si256(v, nibble);
      const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      const __m256 d0 = _mm256_cvtepi32_ps(block_dot<kInt8X>(c0, lo + 32 * b, hi + 32 * b));
      const __m256 d1 = _mm256_cvtepi32_ps(block_dot<kInt8X>(c1, lo + 32 * b + 32, hi + 32 * b + 32));
      acc0 = _mm256_fmadd_ps(d0, _mm256_set1_ps(s * steps[b]), acc0);
      acc1 = _mm256_fmadd_ps(d1, _mm256_set1_ps(s * steps[b + 1]), acc1);
    }
    if (b < b1) {  // a group that ends in the low half
      const __m256 d = _mm256_cvtepi32_ps(block_dot<kInt8X>(block_codes(row, b), lo + 32 * b, hi + 32 * b));
      acc0 = _mm256_fmadd_ps(d, _mm256_set1_ps(s * steps[b]), acc0);
    }
  }
  const float v = hsum(_mm256_add_ps(acc0, acc1)) + zero_term;
  p.y[i * p.n + j] = v + (p.bias ? p.bias[j] : 0.f);
}

// fixed16_dot for groups of 32 (one group per block, the common case): per 8 blocks one conversion of 8 fp16
// scales, one multiply by the 8 steps and one FMA of the zero points into a vector, instead of scalar work
// per group; then per 64 columns one load of 32 bytes and the two blocks' integer dot products.
template <bool kInt8X>
void fixed16_dot_g32(const Int4LinearProblem& p, int64_t i, int64_t j) {
  const uint8_t* row = p.w + j * p.row_bytes;
  const uint16_t* srow = p.scales + j * p.n_groups;
  const uint16_t* orow = p.offsets ? p.offsets + j * p.n_groups : nullptr;
  const uint16_t* scales_end = p.scales + p.n * p.n_groups;
  const int64_t n_blocks = p.n_groups;  // ceil(k / 32)
  const int8_t* lo = p.x_planes + i * 2 * p.kp;
  const int8_t* hi = lo + p.kp;
  const float* steps = p.x_steps + i * (p.kp / 32);
  const float* group_sums = p.x_group_sums + i * p.n_groups;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), zero_acc = _mm256_setzero_ps();
  alignas(32) float f[8];
  for (int64_t b0 = 0; b0 < n_blocks; b0 += 8) {
    const int64_t nb = std::min<int64_t>(8, n_blocks - b0);
    __m256 s8, zp8, st8, gs8;
    if (nb == 8 || srow + b0 + 8 <= scales_end) {
      // Full vector loads even for the row's last blocks (K = 576 ends on 2 of 8: SmolLM2's common K):
      // copying a short tail into zeroed buffers cost more than the tail's arithmetic (its 256-bit reloads
      // of fresh scalar stores miss store forwarding). Lanes past the row's end read the next row's scales
      // and the x buffers' padding (x_steps and x_group_sums have 8 floats past the last row); the mask
      // zeroes them after the load, so whatever they hold (a NaN included) contributes nothing.
      const __m256 valid =
          _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nb)), lane));
      s8 =
          _mm256_and_ps(valid, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(srow + b0))));
      zp8 = orow ? _mm256_and_ps(
                       valid, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(orow + b0))))
                 : _mm256_mul_ps(s8, _mm256_set1_ps(-8.f));
      st8 = _mm256_and_ps(valid, _mm256_loadu_ps(steps + b0));
      gs8 = _mm256_and_ps(valid, _mm256_loadu_ps(group_sums + b0));
    } else {  // the last row's last blocks: zero-padded copies (nothing may be read past the scales)
      alignas(16) uint16_t sh[8] = {}, oh[8] = {};
      alignas(32) float st[8] = {}, gs[8] = {};
      for (int64_t t = 0; t < nb; ++t) {
        sh[t] = srow[b0 + t];
        oh[t] = orow ? orow[b0 + t] : 0;
        st[t] = steps[b0 + t];
        gs[t] = group_sums[b0 + t];
      }
      s8 = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(sh)));
      zp8 = orow ? _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(oh)))
                 : _mm256_mul_ps(s8, _mm256_set1_ps(-8.f));
      st8 = _mm256_load_ps(st);
      gs8 = _mm256_load_ps(gs);
    }
    zero_acc = _mm256_fmadd_ps(zp8, gs8, zero_acc);
    _mm256_store_ps(f, _mm256_mul_ps(s8, st8));
    for (int64_t t = 0; t < nb; t += 2) {
      const int64_t b = b0 + t;
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * 16));
      const __m256i c0 = _mm256_and_si256(v, nibble);
      const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      const __m256 d0 = _mm256_cvtepi32_ps(block_dot<kInt8X>(c0, lo + 32 * b, hi + 32 * b));
      const __m256 d1 = _mm256_cvtepi32_ps(block_dot<kInt8X>(c1, lo + 32 * b + 32, hi + 32 * b + 32));
      acc0 = _mm256_fmadd_ps(d0, _mm256_broadcast_ss(f + t), acc0);
      acc1 = _mm256_fmadd_ps(d1, _mm256_broadcast_ss(f + t + 1), acc1);
    }
  }
  const float v = hsum(_mm256_add_ps(acc0, acc1)) + hsum(zero_acc);
  p.y[i * p.n + j] = v + (p.bias ? p.bias[j] : 0.f);
}

// Dequantizes columns [k0, k0 + 64 * n64) of weight row j into out (fp32), as the reference: s * (q - 8)
// or s * q + o, multiply then add.
void dequantize_row(const Int4LinearProblem& p, int64_t j, int64_t k0, int64_t n64, float* out) {
  const uint8_t* row = p.w + j * p.row_bytes + k0 / 2;
  const uint16_t* srow = p.scales + j * p.n_groups;
  const uint16_t* orow = p.offsets ? p.offsets + j * p.n_groups : nullptr;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256 eight = _mm256_set1_ps(8.f);
  for (int64_t bb = 0; bb < n64; ++bb) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + bb * 32));
    for (int h = 0; h < 2; ++h) {
      const __m256i codes = _mm256_and_si256(h ? _mm256_srli_epi16(v, 4) : v, nibble);
      const int64_t c0 = k0 + bb * 64 + h * 32;
      // A padding half past k has no group of its own; its values are never used.
      const int64_t g = std::min(c0 / p.group_size, p.n_groups - 1);
      const __m256 s = _mm256_set1_ps(h2f(srow[g]));
      const __m256 o = orow ? _mm256_set1_ps(h2f(orow[g])) : _mm256_setzero_ps();
      const __m128i halves[2] = {_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1)};
      float* dst = out + bb * 64 + h * 32;
      for (int t = 0; t < 4; ++t) {
        const __m128i bytes = t & 1 ? _mm_srli_si128(halves[t >> 1], 8) : halves[t >> 1];
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
        const __m256 w =
            orow ? _mm256_add_ps(_mm256_mul_ps(s, q), o) : _mm256_mul_ps(s, _mm256_sub_ps(q, eight));
        _mm256_store_ps(dst + 8 * t, w);
      }
    }
  }
}

constexpr int64_t kMicroRows = 6;

// 8 x 8 transpose: rows src[r * lds + c] -> dst[c * ldd + r].
inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_load_ps(src + i * lds);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    for (int h = 0; h < 2; ++h) {
      const __m256 a = t[4 * i + h], b = t[4 * i + 2 + h];
      r[4 * i + 2 * h] = _mm256_shuffle_ps(a, b, 0x44);
      r[4 * i + 2 * h + 1] = _mm256_shuffle_ps(a, b, 0xEE);
    }
  }
  // r[0..3]: columns 0, 1, 2, 3 of rows 0-3 (low lane) and columns 4-7 (high lane); r[4..7] rows 4-7.
  for (int c = 0; c < 4; ++c) {
    _mm256_store_ps(dst + c * ldd, _mm256_permute2f128_ps(r[c], r[4 + c], 0x20));
    _mm256_store_ps(dst + (c + 4) * ldd, _mm256_permute2f128_ps(r[c], r[4 + c], 0x31));
  }
}

// y[i0 .. i0 + mr, j0 .. j0 + nr) (+)= x[i0 .. i0 + mr, k0 .. k0 + kc) . tile, tile[kk * 16 + c] the weight
// of column j0 + c at k0 + kk; mr <= 6. 12 named accumulators (arrays of vectors end up in memory with GCC);
// rows past mr repeat the last row and are not stored. The first K chunk starts from the bias (or 0), later
// ones add to y.
void micro_kernel(const Int4LinearProblem& p, const float* tile, int64_t i0, int64_t mr, int64_t j0,
                  int64_t k0, int64_t kc, int64_t nr) {
  const float* x[kMicroRows];
  for (int r = 0; r < kMicroRows; ++r) x[r] = p.x + (i0 + std::min<int64_t>(r, mr - 1)) * p.k + k0;
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3], *x4 = x[4], *x5 = x[5];
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
         c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t kk = 0; kk < kc; ++kk) {
    const __m256 b0 = _mm256_load_ps(tile + kk * kInt4TileRows);
    const __m256 b1 = _mm256_load_ps(tile + kk * kInt4TileRows + 8);
    __m256 a = _mm256_broadcast_ss(x0 + kk);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(x1 + kk);
    c10 = _mm256_fmadd_ps(a, b0, c10);
    c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(x2 + kk);
    c20 = _mm256_fmadd_ps(a, b0, c20);
    c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(x3 + kk);
    c30 = _mm256_fmadd_ps(a, b0, c30);
    c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(x4 + kk);
    c40 = _mm256_fmadd_ps(a, b0, c40);
    c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(x5 + kk);
    c50 = _mm256_fmadd_ps(a, b0, c50);
    c51 = _mm256_fmadd_ps(a, b1, c51);
  }
  alignas(32) float out[kMicroRows][16];
  const __m256 c[kMicroRows][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < kMicroRows; ++r) {
    _mm256_store_ps(out[r], c[r][0]);
    _mm256_store_ps(out[r] + 8, c[r][1]);
  }
  for (int64_t r = 0; r < mr; ++r) {
    float* y = p.y + (i0 + r) * p.n + j0;
    for (int64_t t = 0; t < nr; ++t) y[t] = out[r][t] + (k0 > 0 ? y[t] : p.bias ? p.bias[j0 + t] : 0.f);
  }
}

// Output columns the decode kernels prefetch ahead: a SmolLM2 row (K = 576) is 288 bytes of codes, too short
// a stream for the hardware prefetcher (int8_linear's kernels prefetch alike; benchmarks/NOTES.md).
constexpr int64_t kPrefetchColumns = 8;

template <bool kInt8X>
void fixed_point_columns(const Int4LinearProblem& p, int64_t n_begin, int64_t n_end) {
  const auto prefetch_column = [&p](int64_t j) {
    prefetch_bytes(p.w + j * p.row_bytes, p.row_bytes);
    prefetch_bytes(p.scales + j * p.n_groups, p.n_groups * 2);
    if (p.offsets) prefetch_bytes(p.offsets + j * p.n_groups, p.n_groups * 2);
  };
  for (int64_t j = n_begin; j < std::min(n_end, n_begin + kPrefetchColumns); ++j) prefetch_column(j);
  for (int64_t j = n_begin; j < n_end; ++j) {
    if (j + kPrefetchColumns < n_end) prefetch_column(j + kPrefetchColumns);
    for (int64_t i = 0; i < p.m; ++i) {
      if (p.group_size == 32) {
        fixed16_dot_g32<kInt8X>(p, i, j);
      } else {
        fixed16_dot<kInt8X>(p, i, j);
      }
    }
  }
}

}  // namespace

void int4_linear_avx2_fixed16(const Int4LinearProblem& p, int64_t n_begin, int64_t n_end) {
  fixed_point_columns<false>(p, n_begin, n_end);
}

void int4_linear_avx2_int8x(const Int4LinearProblem& p, int64_t n_begin, int64_t n_end) {
  fixed_point_columns<true>(p, n_begin, n_end);
}

void int4_linear_avx2_tiled_fp32(const Int4LinearProblem& p, int64_t n_begin, int64_t n_end, float* scratch) {
  float* rows = scratch;                                  // kInt4TileRows x kInt4TileCols, dequantized rows
  float* tile = scratch + kInt4TileRows * kInt4TileCols;  // kInt4TileCols x kInt4TileRows, transposed
  for (int64_t j0 = n_begin; j0 < n_end; j0 += kInt4TileRows) {
    const int64_t nr = std::min(kInt4TileRows, n_end - j0);
    for (int64_t k0 = 0; k0 < p.k; k0 += kInt4TileCols) {
      const int64_t kc = std::min(kInt4TileCols, p.k - k0);
      const int64_t n64 = (kc + 63) / 64;
      for (int64_t r = 0; r < kInt4TileRows; ++r) {
        if (r < nr) {
          dequantize_row(p, j0 + r, k0, n64, rows + r * kInt4TileCols);
        } else {
          std::memset(rows + r * kInt4TileCols, 0, n64 * 64 * sizeof(float));
        }
      }
      for (int64_t c = 0; c < n64 * 64; c += 8) {
        for (int64_t r = 0; r < kInt4TileRows; r += 8) {
          transpose8(rows + r * kInt4TileCols + c, kInt4TileCols, tile + c * kInt4TileRows + r,
                     kInt4TileRows);
        }
      }
      // Every row of x runs over the tile while it is in L1: the weight is dequantized once per call.
      for (int64_t i0 = 0; i0 < p.m; i0 += kMicroRows) {
        micro_kernel(p, tile, i0, std::min(kMicroRows, p.m - i0), j0, k0, kc, nr);
      }
    }
  }
}

bool int4_fixed16_x_avx2(const float* x, int64_t k, int64_t kp, int64_t group_size, int8_t* planes,
                         float* steps, float* group_sums) {
  int8_t* lo_plane = planes;
  int8_t* hi_plane = planes + kp;
  const int64_t n_blocks = (k + 31) / 32;
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  double group_sum = 0.0;
  for (int64_t b = 0; b < kp / 32; ++b) {
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(32, k - 32 * b));
    __m256 v[4];
    float max_abs;
    if (!load_block(x + 32 * b, valid, v, &max_abs)) return false;
    // Blocks of tiny magnitude would need a step below fp32's normal range: the caller takes the fp32 kernel.
    if (max_abs != 0.f && max_abs < 0x1p-100f) return false;
    const float step = max_abs / kFixed16Max;
    const __m256 inv = _mm256_set1_ps(max_abs > 0.f ? kFixed16Max / max_abs : 0.f);
    __m256i lo[4], hi[4], total = _mm256_setzero_si256();
    for (int t = 0; t < 4; ++t) {
      // Rounded to nearest (the MXCSR default); |X| <= 32512 (+1 from the rounding of inv), so the signed
      // low byte lo and hi = (X - lo) / 256 both fit int8.
      const __m256i fixed = _mm256_cvtps_epi32(_mm256_mul_ps(v[t], inv));
      lo[t] = _mm256_srai_epi32(_mm256_slli_epi32(fixed, 24), 24);
      hi[t] = _mm256_srai_epi32(_mm256_sub_epi32(fixed, lo[t]), 8);
      total = _mm256_add_epi32(total, fixed);
    }
    const auto pack = [&](const __m256i* q) {
      const __m256i bytes =
          _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      return _mm256_permutevar8x32_epi32(bytes, order);  // packs works within 128-bit lanes
    };
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo_plane + 32 * b), pack(lo));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi_plane + 32 * b), pack(hi));
    steps[b] = step;
    if (b < n_blocks) {
      group_sum += static_cast<double>(step) * hsum_epi32(total);
      const int64_t g = 32 * b / group_size;
      if (b + 1 == n_blocks || 32 * (b + 1) / group_size != g) {
        group_sums[g] = static_cast<float>(group_sum);
        group_sum = 0.0;
      }
    }
  }
  return true;
}

}  // namespace fastquant::cpu
