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

// Whether activations of dtype x may be rounded to bf16 (8 significant bits) by the bf16 path, read at
// dispatch time so that every call and every "which path" query agree with torch's own switch. fp32 follows
// torch.get_float32_matmul_precision(): only "medium" allows bf16; "high" promises TF32 or better and
// "highest" fp32, so both keep fp32. bf16 x is rounded exactly. fp16 x has no torch switch and is rounded
// (2^-9 against its 2^-11) for the prefill speed.
inline bool bf16_activations_allowed(DType x) {
  return x != DType::kFloat32 ||
         at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::MEDIUM;
}

// x~ of an m x k fp32 x (contiguous) by int8_activations.h's rule, fp32, or x32 itself when it holds NaN or
// inf (int8_activations leaves such x as it is). AVX2 CPUs round it with the decode kernels' own routine in
// one pass over threads (torch ops cost ~10 passes over x per prefill call).
at::Tensor int8_rounded_activations(const at::Tensor& x32, int64_t m, int64_t k);

#if defined(__x86_64__) || defined(_M_X64)
// Rounds x2 (m x k, contiguous, activation dtype) to bf16 pairs transposed so 16 rows fill a vector, then
// runs int8_linear_avx512_bf16 over blocks of output columns on torch's threads. p carries the weight
// (w or bitmap), scales, group_size (<= k), n_groups, bias_f32 and y_f32 (m x n fp32), which it fills.
void int8_linear_run_bf16(Int8LinearProblem& p, const at::Tensor& x2);
#endif

}  // namespace fastquant::cpu
