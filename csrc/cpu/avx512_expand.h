#pragma once
// Instructions the AVX-512 kernels write as inline asm because GCC 12 allocates their intrinsics badly
// (include only from files compiled with AVX-512 flags).
//
// vpexpandd / vexpandps with zero-masking still wait for the previous value of their destination register
// on Zen 5: a loop whose expands all wrote one register (as GCC allocates them) ran 3-4x slower than the
// same loop with the expand done in place. In place, that dependency is on the source, which the expand
// reads anyway.
#include <immintrin.h>

namespace fastquant::cpu {

inline __m512i expand_epi32(__mmask16 k, __m512i v) {
  asm("vpexpandd %0, %0%{%1%}%{z%}" : "+v"(v) : "Yk"(k));
  return v;
}

inline __m512 expand_ps(__mmask16 k, __m512 v) {
  asm("vexpandps %0, %0%{%1%}%{z%}" : "+v"(v) : "Yk"(k));
  return v;
}

// acc + (unsigned bytes of a) . (signed bytes of b), per 4 bytes (vpdpbusd) with the accumulator tied to the
// destination: GCC 12 gives the intrinsic an untied destination and, with 16 accumulators live, copied each
// of them every step and kept two on the stack (a store and a reload in their dependency chains).
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %[b], %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(a), [b] "v"(b));
  return acc;
}

}  // namespace fastquant::cpu
