#pragma once
// int8_activations on AVX2 CPUs: x rounded per row and 32-column block by int8_activations.h's rule,
// operation for operation (the same x~ bit for bit), in one pass instead of torch's ~10, either as the int8x
// decode kernels' operands or as x~ for the kernels that take x itself. Used by int8_linear's and
// int4_linear's CPU glue; defined in int8_activations_avx2.cpp (AVX2 flags). No torch headers.
#include <cstdint>

namespace fastquant::cpu {

// Blocks of x below this magnitude round to zero (int8_activations.h's kInt8ActivationTiny).
constexpr float kInt8XTiny = 0x1p-100f;

#if defined(__x86_64__) || defined(_M_X64)
// One row of x (k floats) as the int8x kernels take it: one int8 plane of kp bytes (kp a multiple of 32 and
// >= k; zero past k), the step of each 32-column block (kp / 32 floats: x~ = X * step), and, unless
// group_sums is null, per group of group_size columns (a multiple of 32) the sum of x~ over the group
// (ceil(k / group_size) floats; int4's zero-point multiplier). Returns false when x has NaN or an infinity
// (the caller then runs a float kernel on x as it is, as the reference does).
bool int8x_x_avx2(const float* x, int64_t k, int64_t kp, int64_t group_size, int8_t* plane, float* steps,
                  float* group_sums);
// One row of x rounded the same way, as x~ = X * step (k floats: the reference's int8_activation_round), for
// the kernels that take x~ itself. False on NaN or inf, as above.
bool int8x_round_avx2(const float* x, int64_t k, float* rounded);
#endif

}  // namespace fastquant::cpu
