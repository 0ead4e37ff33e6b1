#pragma once
// Per-block reading of fp32 activations shared by the AVX2 routines that round x per 32 columns
// (int4_linear's 16-bit fixed point, int8_activations' int8). Included only by files compiled with the AVX2
// flags (*_avx2.cpp); no torch headers.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace fastquant::cpu {

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Loads a 32-column block of x whose first `valid` columns exist (0..32; zeros past them: x is never read
// past k) and its largest magnitude. False when the block holds NaN or an infinity.
inline bool load_block(const float* xb, int64_t valid, __m256 v[4], float* max_abs) {
  alignas(32) float buf[32];
  if (valid < 32) {
    std::memset(buf, 0, sizeof(buf));
    if (valid > 0) std::memcpy(buf, xb, valid * sizeof(float));
    xb = buf;
  }
  const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
  __m256 largest = zero, non_finite = zero;
  for (int t = 0; t < 4; ++t) {
    v[t] = _mm256_loadu_ps(xb + 8 * t);
    const __m256 times_zero = _mm256_mul_ps(v[t], zero);  // NaN exactly for NaN and infinities
    non_finite = _mm256_or_ps(non_finite, _mm256_cmp_ps(times_zero, times_zero, _CMP_UNORD_Q));
    largest = _mm256_max_ps(largest, _mm256_andnot_ps(sign, v[t]));
  }
  if (_mm256_movemask_ps(non_finite)) return false;
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  *max_abs = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  return true;
}

}  // namespace fastquant::cpu
