// fixed_point_x.h for AVX2 (compiled with the AVX2 flags; no torch headers).
#include <immintrin.h>

#include <cstdint>

#include "cpu/fixed_point_x.h"

namespace fastquant::cpu {

XRange x_range_avx2(const float* x, int64_t k) {
  const __m256 zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
  __m256 non_finite = zero, largest = zero, total = zero;
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 times_zero = _mm256_mul_ps(v, zero);  // NaN exactly for NaN and infinities
    non_finite = _mm256_or_ps(non_finite, _mm256_cmp_ps(times_zero, times_zero, _CMP_UNORD_Q));
    const __m256 a = _mm256_andnot_ps(sign, v);
    largest = _mm256_max_ps(largest, a);
    total = _mm256_add_ps(total, a);
  }
  alignas(32) float lanes[8], sums[8];
  _mm256_store_ps(lanes, largest);
  _mm256_store_ps(sums, total);
  bool finite = _mm256_movemask_ps(non_finite) == 0;
  float max_abs = 0.f, sum = 0.f;
  for (int l = 0; l < 8; ++l) {
    max_abs = lanes[l] > max_abs ? lanes[l] : max_abs;
    sum += sums[l];
  }
  for (; i < k; ++i) {
    const float a = x[i] < 0 ? -x[i] : x[i];
    finite = finite && a - a == 0.f;
    max_abs = a > max_abs ? a : max_abs;
    sum += a;
  }
  return {finite, max_abs, k > 1 ? (sum - max_abs) / static_cast<float>(k - 1) : 0.f};
}

void fixed_point_x_avx2(const float* x, int64_t ldx, float max_abs, int16_t* planes, double* step) {
  constexpr double kFixedMax = 2147418112.0;  // 2^31 - 2^16
  const double inv = max_abs > 0 ? kFixedMax / max_abs : 0.0;
  *step = max_abs > 0 ? max_abs / kFixedMax : 0.0;
  const __m256d vinv = _mm256_set1_pd(inv);
  int16_t* hi_plane = planes;
  int16_t* lo_plane = planes + ldx;
  for (int64_t i = 0; i < ldx; i += 16) {
    __m256i hi[2], lo[2];
    for (int h = 0; h < 2; ++h) {
      const __m256 v = _mm256_loadu_ps(x + i + 8 * h);
      // x * inv in double, rounded to nearest (the MXCSR default): X is x / step to within half a step,
      // and |X| <= 2^31 - 2^16, so hi = (X - lo) / 65536 fits int16.
      const __m128i a = _mm256_cvtpd_epi32(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), vinv));
      const __m128i b = _mm256_cvtpd_epi32(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), vinv));
      const __m256i fixed = _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
      lo[h] = _mm256_srai_epi32(_mm256_slli_epi32(fixed, 16), 16);
      hi[h] = _mm256_srai_epi32(_mm256_sub_epi32(fixed, lo[h]), 16);
    }
    // packs works per 128-bit lane: [0-3, 8-11, 4-7, 12-15] -> element order by 64-bit lanes 0, 2, 1, 3.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi_plane + i),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(hi[0], hi[1]), 0xD8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo_plane + i),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(lo[0], lo[1]), 0xD8));
  }
}

}  // namespace fastquant::cpu
