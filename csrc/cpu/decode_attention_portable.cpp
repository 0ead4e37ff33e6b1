// decode_attention for any CPU (baseline ISA), and the correctness baseline for the AVX2 and AVX-512 builds
// of the same loops (decode_attention_kernel.h): a one-lane Vec, plain fp32 multiply-adds.
#include <c10/util/Half.h>

#include <cstdint>

#include "cpu/bf16_bits.h"
#include "cpu/decode_attention.h"

namespace fastquant::cpu::attention_detail {
namespace {

inline float fp16_to_f32(uint16_t bits) { return c10::detail::fp16_ieee_to_fp32_value(bits); }

struct Vec {
  static constexpr int64_t kWidth = 1;
  static float zero() { return 0.f; }
  static float set1(float x) { return x; }
  static float load(const float* p) { return *p; }
  static float load(const Bf16* p) { return bf16_bits_to_f32(p->bits); }
  static float load(const F16* p) { return fp16_to_f32(p->bits); }
  static float fmadd(float a, float b, float c) { return a * b + c; }
  static float add(float a, float b) { return a + b; }
  static void store(float* p, float v) { *p = v; }
  static float reduce(float v) { return v; }
};

}  // namespace
}  // namespace fastquant::cpu::attention_detail

#include "cpu/decode_attention_kernel.h"

namespace fastquant::cpu {

void decode_attention_portable(const DecodeAttentionProblem& p, float* scratch, int64_t begin, int64_t end) {
  attention_detail::run_any(p, scratch, begin, end);
}

}  // namespace fastquant::cpu
