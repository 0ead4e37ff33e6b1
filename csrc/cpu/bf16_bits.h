#pragma once
// A bf16 value's bits widened to fp32 (bf16 is the high half of an fp32). No torch header, so the per-ISA
// kernel files include it; static: each file compiles its own copy with its own flags.
#include <cstdint>
#include <cstring>

namespace fastquant::cpu {

static inline float bf16_bits_to_f32(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace fastquant::cpu
