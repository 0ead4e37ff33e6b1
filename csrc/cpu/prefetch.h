#pragma once
// Software prefetch of a weight range into the cache hierarchy, for decode kernels whose rows are too short
// for the hardware prefetcher to ramp up (SmolLM2's K = 576: 9 cache lines per int8 row). x86 ISA files only.
#include <xmmintrin.h>

#include <cstdint>

namespace fastquant::cpu {

inline void prefetch_bytes(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

}  // namespace fastquant::cpu
