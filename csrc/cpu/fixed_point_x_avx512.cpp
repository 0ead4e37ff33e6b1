// fixed_point_x.h for AVX-512 (compiled with the AVX-512 flags; no torch headers).
#include <immintrin.h>

#include <cstdint>

#include "cpu/fixed_point_x.h"

namespace fastquant::cpu {

XRange x_range_avx512(const float* x, int64_t k) {
  // 0x99: quiet NaN, signalling NaN, +infinity, -infinity.
  __mmask16 bad = 0;
  __m512 largest = _mm512_setzero_ps(), total = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 in = k - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(in, x + i);
    bad |= _mm512_fpclass_ps_mask(v, 0x99);
    const __m512 a = _mm512_abs_ps(v);
    largest = _mm512_max_ps(largest, a);
    total = _mm512_add_ps(total, a);
  }
  XRange range;
  range.finite = bad == 0;
  range.max_abs = _mm512_reduce_max_ps(largest);
  range.others_mean = k > 1 ? (_mm512_reduce_add_ps(total) - range.max_abs) / static_cast<float>(k - 1) : 0.f;
  return range;
}

void fixed_point_x_avx512(const float* x, int64_t k, float max_abs, int64_t stride, int64_t group,
                          uint8_t* planes, int64_t* top_sums, double* step) {
  // X in [-(2^31 - 1), 2^31 - 1]: x * inv rounds to at most that (the product is within an ulp of it).
  const double inv = max_abs > 0 ? 2147483647.0 / max_abs : 0.0;
  *step = max_abs > 0 ? max_abs / 2147483647.0 : 0.0;
  const __m512d vinv = _mm512_set1_pd(inv);
  __m512i top = _mm512_setzero_si512();
  for (int64_t i = 0; i < stride; i += 16) {
    const __mmask16 in = i >= k ? 0 : k - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(in, x + (i < k ? i : 0));
    // x * inv in double (53 bits) and rounded to nearest (the MXCSR default): X is x / step to within
    // half a step.
    const __m256i lo = _mm512_cvtpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), vinv));
    const __m256i hi = _mm512_cvtpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)), vinv));
    const __m512i fixed = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    for (int b = 0; b < 4; ++b) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(planes + b * stride + i),
                       _mm512_cvtepi32_epi8(_mm512_srai_epi32(fixed, 8 * b)));
    }
    top = _mm512_add_epi32(top, _mm512_srai_epi32(fixed, 24));
    if ((i + 16) % group == 0 || i + 16 >= stride) {
      top_sums[i / group] = _mm512_reduce_add_epi32(top);
      top = _mm512_setzero_si512();
    }
  }
}

}  // namespace fastquant::cpu
