// int8_activations.h's rounding of x for the AVX2 kernels (int8_activations_x.h). Compiled with the AVX2
// flags; no torch headers.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/int8_activations_x.h"
#include "cpu/x_block_avx2.h"

namespace fastquant::cpu {
namespace {

// One row of x rounded by int8_activations.h's rule, operation for operation: X = round(x * (127 / m)),
// step = m / 127, blocks below 2^-100 zero (step 0). kPlane: the int8x kernels' operands (plane over kp
// columns, steps, and group sums unless group_sums is null); otherwise x~ = X * step into rounded (k floats).
// False on NaN or inf.
template <bool kPlane>
bool int8x_row(const float* x, int64_t k, int64_t kp, int64_t group_size, int8_t* plane, float* steps,
               float* group_sums, float* rounded) {
  const int64_t n_blocks = (k + 31) / 32;
  const int64_t blocks_per_group = group_size / 32;
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  double group_sum = 0.0;
  int64_t group = 0, left_in_group = blocks_per_group;
  for (int64_t b = 0; b < (kPlane ? kp / 32 : n_blocks); ++b) {
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(32, k - 32 * b));
    __m256 v[4];
    float max_abs;
    if (!load_block(x + 32 * b, valid, v, &max_abs)) return false;
    const bool kept = max_abs >= kInt8XTiny;
    const float step = kept ? max_abs / 127.f : 0.f;
    const __m256 inv = _mm256_set1_ps(kept ? 127.f / max_abs : 0.f);
    __m256i q[4];
    for (int t = 0; t < 4; ++t) {
      // Rounded to nearest even (the MXCSR default, as torch.round); |X| <= 127.
      q[t] = _mm256_cvtps_epi32(_mm256_mul_ps(v[t], inv));
    }
    if constexpr (!kPlane) {
      alignas(32) float out[32];
      float* dst = valid == 32 ? rounded + 32 * b : out;
      for (int t = 0; t < 4; ++t) {
        _mm256_storeu_ps(dst + 8 * t, _mm256_mul_ps(_mm256_cvtepi32_ps(q[t]), _mm256_set1_ps(step)));
      }
      if (valid < 32) std::memcpy(rounded + 32 * b, out, valid * sizeof(float));
    } else {
      const __m256i bytes =
          _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(plane + 32 * b),
                          _mm256_permutevar8x32_epi32(bytes, order));  // packs works within 128-bit lanes
      steps[b] = step;
      if (group_sums != nullptr && b < n_blocks) {
        const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        group_sum += static_cast<double>(step) * hsum_epi32(total);
        if (--left_in_group == 0 || b + 1 == n_blocks) {
          group_sums[group++] = static_cast<float>(group_sum);
          group_sum = 0.0;
          left_in_group = blocks_per_group;
        }
      }
    }
  }
  return true;
}

}  // namespace

bool int8x_x_avx2(const float* x, int64_t k, int64_t kp, int64_t group_size, int8_t* plane, float* steps,
                  float* group_sums) {
  return int8x_row<true>(x, k, kp, group_size, plane, steps, group_sums, nullptr);
}

bool int8x_round_avx2(const float* x, int64_t k, float* rounded) {
  return int8x_row<false>(x, k, 0, 32, nullptr, nullptr, nullptr, rounded);
}

}  // namespace fastquant::cpu
