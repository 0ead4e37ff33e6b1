// AVX-512 VNNI int4 decode kernel, cpu_avx512_vnni_fixed16 (int4_linear.h has the paths and their numerical
// rules). Compiled with the AVX-512 flags; no torch headers.
//
// x is cpu_avx2_fixed16's: 16-bit fixed point per 32-column block (X = 256 hi + lo, two signed byte planes,
// step = block max / 32512), rounded by int4_fixed16_x_avx2 and then put in this kernel's lane order by
// int4_fixed16_interleave_avx512. Per 64 columns and output column the kernel loads the weight's 32 bytes
// once, widened to 64 codes in one zmm, and per row of x runs 2 vpdpbusd (codes unsigned, a plane of X
// signed), one shift, one conversion and one FMA by scale x step.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu/avx512_expand.h"
#include "cpu/int4_linear.h"
#include "static_count.h"

namespace fastquant::cpu {
namespace {

constexpr int64_t kInt4PrefetchBytes = 4096;

// The 64 codes of one 64-column block (32 bytes at w) with the low nibbles of bytes 4i..4i+3 (columns
// 4i..4i+3) in int32 lane 2i and their high nibbles (columns 32 + 4i..) in lane 2i + 1: each dword of w is
// zero-extended to a qword, the qword ORed with itself shifted left by 28 (its high dword is then the dword
// shifted right by 4, bits past 31 being zero) and masked to nibbles. Even lanes thus hold the block's first
// 32 columns and odd lanes its last 32, so one scale x step pair (vbroadcastsd) covers a whole zmm for any
// group of 32 or more.
inline __m512i block_codes(const uint8_t* w) {
  const __m512i q = _mm512_cvtepu32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  // (q | q << 28) & 0x0F..: ternary logic 0xA8 is (A | B) & C.
  return _mm512_ternarylogic_epi64(q, _mm512_slli_epi64(q, 28), _mm512_set1_epi8(0x0F), 0xA8);
}

// codes . X over one 64-column block, exactly, in 16 int32 lanes (4 columns each): vpdpbusd sums 4 products
// of a code (0..15, the unsigned operand) and a plane byte (signed); the high plane's sum is shifted by 8
// before the low plane's is added, so a lane holds at most 4 * 15 * 32640 < 2^21 and converts to fp32
// exactly.
inline __m512i block_dot(__m512i codes, __m512i lo, __m512i hi) {
  return dpbusd(_mm512_slli_epi32(dpbusd(_mm512_setzero_si512(), codes, hi), 8), codes, lo);
}

inline __m512 pair(const float* f) {
  return _mm512_castpd_ps(_mm512_set1_pd(*reinterpret_cast<const double*>(f)));
}

inline __mmask16 first_lanes(int64_t count) {
  return static_cast<__mmask16>(count >= 16 ? 0xFFFF : count <= 0 ? 0 : (1u << count) - 1);
}

// The scales of the 16 32-column blocks from b0 of weight row srow, zero from block used_blocks on (the
// padding half of a last 64-column block: its dot product is 0, and a zero factor keeps an infinite scale
// from making it NaN). 16 consecutive blocks span at most 16 groups, from the first block's on.
inline __m512 block_scales16(const Int4LinearProblem& p, const int32_t* group_of, const uint16_t* srow,
                             int64_t b0, int64_t used_blocks) {
  const int32_t g0 = group_of[b0];
  __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(p.n_groups - g0), srow + g0));
  if (p.group_size != 32) {  // groups of 32: block b is group b
    s = _mm512_permutexvar_ps(_mm512_sub_epi32(_mm512_loadu_si512(group_of + b0), _mm512_set1_epi32(g0)), s);
  }
  return _mm512_maskz_mov_ps(first_lanes(used_blocks - b0), s);
}

// Per pass, for each row r of x and weight row c: the scale x step factor of every 32-column block (f, RT x
// NR runs of kp / 32 floats) and the zero-point term, the zero point (-8 s, or the offset) of each group
// times the group's sum of rounded x (zero_terms). Each weight row's scales are converted once for the RT
// rows of x.
template <int RT, int NR>
void pass_factors(const Int4LinearProblem& p, const int32_t* group_of, int64_t i0, int64_t j0, float* f,
                  float (&zero_terms)[RT][NR]) {
  const int64_t n_blocks = p.kp / 32, used_blocks = (p.k + 31) / 32;
  for (int64_t b0 = 0; b0 < n_blocks; b0 += 16) {
    const __mmask16 in = first_lanes(n_blocks - b0);
    __m512 steps[RT];
    for (int r = 0; r < RT; ++r)
      steps[r] = _mm512_maskz_loadu_ps(in, p.x_steps + (i0 + r) * (p.kp / 32) + b0);
    for (int c = 0; c < NR; ++c) {
      const __m512 s = block_scales16(p, group_of, p.scales + (j0 + c) * p.n_groups, b0, used_blocks);
      for (int r = 0; r < RT; ++r)
        _mm512_mask_storeu_ps(f + (r * NR + c) * n_blocks + b0, in, _mm512_mul_ps(s, steps[r]));
    }
  }
  __m512 zero_acc[RT][NR];
  for (int r = 0; r < RT; ++r) {
    for (int c = 0; c < NR; ++c) zero_acc[r][c] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < p.n_groups; g += 16) {
    const __mmask16 in = first_lanes(p.n_groups - g);
    __m512 sums[RT];
    for (int r = 0; r < RT; ++r)
      sums[r] = _mm512_maskz_loadu_ps(in, p.x_group_sums + (i0 + r) * p.n_groups + g);
    for (int c = 0; c < NR; ++c) {
      const int64_t row = (j0 + c) * p.n_groups + g;
      const __m512 zp = p.offsets
                            ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in, p.offsets + row))
                            : _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in, p.scales + row)),
                                            _mm512_set1_ps(-8.f));
      for (int r = 0; r < RT; ++r) zero_acc[r][c] = _mm512_fmadd_ps(zp, sums[r], zero_acc[r][c]);
    }
  }
  for (int r = 0; r < RT; ++r) {
    for (int c = 0; c < NR; ++c) zero_terms[r][c] = _mm512_reduce_add_ps(zero_acc[r][c]);
  }
}

// Rows [i0, i0 + RT) of x against weight rows [j0, j0 + NR): the NR weight rows' 32 bytes per 64 columns are
// loaded once and serve the RT rows of x, whose planes serve the NR weight rows. f: RT * NR * kp / 32 floats.
template <int RT, int NR>
void fixed16_pass(const Int4LinearProblem& p, const int32_t* group_of, int64_t i0, int64_t j0, int64_t pf,
                  float* f) {
  const int64_t n_blocks = p.kp / 32;
  float zero_terms[RT][NR];
  pass_factors<RT, NR>(p, group_of, i0, j0, f, zero_terms);
  __m512 acc[RT][NR];
  for (int r = 0; r < RT; ++r) {
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
  }
  const uint8_t* w = p.w + j0 * p.row_bytes;
  for (int64_t b = 0; b < p.kp / 64; ++b) {
    __m512i codes[NR];
    for (int c = 0; c < NR; ++c) {
      const uint8_t* wb = w + c * p.row_bytes + 32 * b;
      // Non-temporal prefetch of the line read pf bytes later in the weight slice (the same offset, later
      // rows): the weight is used once, and the hardware prefetcher alone keeps too few misses in flight.
      if ((b & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(wb + pf), _MM_HINT_NTA);
      codes[c] = block_codes(wb);
    }
    for (int r = 0; r < RT; ++r) {
      const int8_t* lo = p.x_planes + (i0 + r) * 2 * p.kp + 64 * b;
      const __m512i xl = _mm512_loadu_si512(lo), xh = _mm512_loadu_si512(lo + p.kp);
      for (int c = 0; c < NR; ++c) {
        const __m512 d = _mm512_cvtepi32_ps(block_dot(codes[c], xl, xh));
        acc[r][c] = _mm512_fmadd_ps(d, pair(f + (r * NR + c) * n_blocks + 2 * b), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < RT; ++r) {
    for (int c = 0; c < NR; ++c) {
      const int64_t j = j0 + c;
      p.y[(i0 + r) * p.n + j] =
          _mm512_reduce_add_ps(acc[r][c]) + zero_terms[r][c] + (p.bias ? p.bias[j] : 0.f);
    }
  }
}

template <int NR>
void fixed16_rows(const Int4LinearProblem& p, const int32_t* group_of, int64_t j0, int64_t pf, float* f) {
  // Tiles of 4 rows of x: 16 accumulators with 4 weight rows. The first tile streams the weight rows from
  // memory, the others find them in L1/L2.
  int64_t i0 = 0;
  for (; i0 + 4 <= p.m; i0 += 4) fixed16_pass<4, NR>(p, group_of, i0, j0, pf, f);
  with_count<3>(p.m - i0,
                [&](auto mr) { fixed16_pass<decltype(mr)::value, NR>(p, group_of, i0, j0, pf, f); });
}

}  // namespace

void int4_linear_avx512_fixed16(const Int4LinearProblem& p, int64_t n_begin, int64_t n_end, float* scratch) {
  const int64_t n_blocks = p.kp / 32;
  // The group of each 32-column block, for every pass of this thread (clamped: the padding half of a last
  // 64-column block has no group of its own; its factor is 0).
  int32_t* group_of = reinterpret_cast<int32_t*>(scratch);
  for (int64_t b = 0; b < n_blocks; ++b) {
    group_of[b] = static_cast<int32_t>(std::min<int64_t>(32 * b / p.group_size, p.n_groups - 1));
  }
  for (int64_t b = n_blocks; b < n_blocks + 16; ++b) group_of[b] = group_of[n_blocks - 1];
  float* f = scratch + n_blocks + 16;
  // Prefetch distance: whole passes of kInt4Avx512Rows rows ahead (the same offset in a later row), at least
  // kInt4PrefetchBytes.
  const int64_t pass_bytes = kInt4Avx512Rows * p.row_bytes;
  const int64_t pf = (kInt4PrefetchBytes + pass_bytes - 1) / pass_bytes * pass_bytes;
  int64_t j = n_begin;
  for (; j + kInt4Avx512Rows <= n_end; j += kInt4Avx512Rows)
    fixed16_rows<kInt4Avx512Rows>(p, group_of, j, pf, f);
  for (; j < n_end; ++j) fixed16_rows<1>(p, group_of, j, pf, f);
}

void int4_codes_to_int8_avx512(const Int4LinearProblem& p, int64_t n_begin, int64_t n_end, int8_t* out) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
  for (int64_t j = n_begin; j < n_end; ++j) {
    const uint8_t* row = p.w + j * p.row_bytes;
    int8_t* dst = out + j * p.k;
    for (int64_t b = 0; b < p.row_bytes / 32; ++b) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * b));
      const __m256i lo = _mm256_sub_epi8(_mm256_and_si256(v, nibble), eight);
      const __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), eight);
      // Columns past k are not stored: the rows of out are k bytes long.
      const int64_t c = 64 * b;
      const auto mask = [&](int64_t first) {
        const int64_t left = p.k - first;
        return static_cast<__mmask32>(left >= 32 ? 0xFFFFFFFFu : left <= 0 ? 0u : (1u << left) - 1);
      };
      _mm256_mask_storeu_epi8(dst + c, mask(c), lo);
      _mm256_mask_storeu_epi8(dst + c + 32, mask(c + 32), hi);
    }
  }
}

void int4_fixed16_interleave_avx512(int8_t* planes, int64_t bytes) {
  // Per 64 bytes: dword i of the first 32 bytes to dword 2i, dword i of the last 32 to dword 2i + 1.
  const __m512i order = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  for (int64_t o = 0; o < bytes; o += 64) {
    const __m512i v = _mm512_loadu_si512(planes + o);
    _mm512_storeu_si512(planes + o, _mm512_permutexvar_epi32(order, v));
  }
}

}  // namespace fastquant::cpu
