// decode_attention compiled with AVX-512 (no torch headers): the loops of decode_attention_kernel.h on zmm
// registers, 16 fp32 lanes; bf16 and fp16 rows widened on load (a shift, vcvtph2ps).
#include <immintrin.h>

#include <cstdint>

#include "cpu/decode_attention.h"

namespace fastquant::cpu::attention_detail {
namespace {

inline float fp16_to_f32(uint16_t bits) { return _cvtsh_ss(bits); }

struct Vec {
  static constexpr int64_t kWidth = 16;
  static __m512 zero() { return _mm512_setzero_ps(); }
  static __m512 set1(float x) { return _mm512_set1_ps(x); }
  static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 load(const Bf16* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static __m512 load(const F16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __m512 fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
  static __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
  static void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
  static float reduce(__m512 v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace
}  // namespace fastquant::cpu::attention_detail

#include "cpu/decode_attention_kernel.h"

namespace fastquant::cpu {

void decode_attention_avx512(const DecodeAttentionProblem& p, float* scratch, int64_t begin, int64_t end) {
  attention_detail::run_any(p, scratch, begin, end);
}

}  // namespace fastquant::cpu
