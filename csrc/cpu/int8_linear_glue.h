#pragma once
// The AVX-512 bf16 prefill path of int8_linear as a whole, for the glue of another op whose weight it can
// read (sparse_linear with int8 values, through Int8LinearProblem::bitmap). Torch glue only: includes ATen.
#include <ATen/ATen.h>

#include "cpu/int8_linear.h"

namespace fastquant::cpu {

// Rows of x from which the bf16 path is taken, and the K chunk of its weight tiles for this K and group
// size (0: the path does not apply to this group size).
constexpr int64_t kBf16MinRows = 16;
int64_t bf16_chunk(int64_t k, int64_t group);

#if defined(__x86_64__) || defined(_M_X64)
// Rounds x2 (m x k, contiguous, activation dtype) to bf16 pairs transposed so 16 rows fill a vector, then
// runs int8_linear_avx512_bf16 over blocks of output columns on torch's threads. p carries the weight
// (w or bitmap), scales, group_size (<= k), n_groups, bias_f32 and y_f32 (m x n fp32), which it fills.
void int8_linear_run_bf16(Int8LinearProblem& p, const at::Tensor& x2);
#endif

}  // namespace fastquant::cpu
