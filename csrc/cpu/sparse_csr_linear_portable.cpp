// csr16 kernel for any CPU (baseline ISA), and the correctness baseline for the AVX2 build of the same loops.
#include <c10/util/Half.h>

#include <cstdint>

namespace fastquant::cpu::csr_detail {
namespace {
inline float fp16_to_f32(uint16_t bits) { return c10::detail::fp16_ieee_to_fp32_value(bits); }
}  // namespace
}  // namespace fastquant::cpu::csr_detail

#include "cpu/sparse_csr_linear_kernel.h"

namespace fastquant::cpu {

int64_t sparse_csr_linear_portable(const SparseCsrLinearProblem& p, int64_t n_begin, int64_t n_end) {
  return csr_detail::run_any(p, n_begin, n_end);
}

}  // namespace fastquant::cpu
