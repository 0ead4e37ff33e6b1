// csr16 kernel compiled with AVX2/FMA/F16C (no torch headers): scalar FMAs and vcvtph2ps per kept weight,
// the row's index bound check vectorized by the compiler (vpmaxuw).
#include <immintrin.h>

#include <cstdint>

namespace fastquant::cpu::csr_detail {
inline float fp16_to_f32(uint16_t bits) { return _cvtsh_ss(bits); }
}  // namespace fastquant::cpu::csr_detail

#include "cpu/sparse_csr_linear_kernel.h"

namespace fastquant::cpu {

int64_t sparse_csr_linear_avx2(const SparseCsrLinearProblem& p, int64_t n_begin, int64_t n_end) {
  return csr_detail::run_any(p, n_begin, n_end);
}

}  // namespace fastquant::cpu
