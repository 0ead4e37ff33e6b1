// decode_attention compiled with AVX2/FMA/F16C (no torch headers): the loops of decode_attention_kernel.h on
// ymm registers, 8 fp32 lanes; bf16 and fp16 rows widened on load (a shift, vcvtph2ps).
#include <immintrin.h>

#include <cstdint>

#include "cpu/decode_attention.h"

namespace fastquant::cpu::attention_detail {
namespace {

inline float fp16_to_f32(uint16_t bits) { return _cvtsh_ss(bits); }

struct Vec {
  static constexpr int64_t kWidth = 8;
  static __m256 zero() { return _mm256_setzero_ps(); }
  static __m256 set1(float x) { return _mm256_set1_ps(x); }
  static __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static __m256 load(const Bf16* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static __m256 load(const F16* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static __m256 fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
  static __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
  static void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
  static float reduce(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
};

}  // namespace
}  // namespace fastquant::cpu::attention_detail

#include "cpu/decode_attention_kernel.h"

namespace fastquant::cpu {

void decode_attention_avx2(const DecodeAttentionProblem& p, float* scratch, int64_t begin, int64_t end) {
  attention_detail::run_any(p, scratch, begin, end);
}

}  // namespace fastquant::cpu
