#pragma once
// In-place expands for the AVX-512 kernels (include only from files compiled with AVX-512 flags).
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

}  // namespace fastquant::cpu
