#pragma once
// The int8_activations option of int8_linear and int4_linear, by torch ops: x rounded to int8 per block of
// 32 columns of each row, as reference.int8_activation_round (the oracle) rounds it, with the same fp32
// operations in the same order: m = max|x| of the block, X = round(x * (127 / m)) half to even, x~ = X * (m /
// 127); blocks with m < 2^-100 become 0. The CUDA glue runs it always, the CPU glue on CPUs without AVX2;
// AVX2 CPUs round x with the decode kernels' own routines (cpu/int8_activations_x.h), which give the same x~
// bit for bit (tests/test_int4_linear.py, tests/test_int8_linear.py). Torch glue only.
#include <ATen/ATen.h>

namespace fastquant {

constexpr int64_t kInt8ActivationBlock = 32;
constexpr float kInt8ActivationMax = 127.f;
constexpr float kInt8ActivationTiny = 0x1p-100f;

// x~ of a 2-D fp32 x (m x k), fp32, contiguous.
inline at::Tensor int8_activation_round(const at::Tensor& x32) {
  const int64_t m = x32.size(0), k = x32.size(1);
  const int64_t blocks = (k + kInt8ActivationBlock - 1) / kInt8ActivationBlock;
  const at::Tensor padded = at::constant_pad_nd(x32, {0, blocks * kInt8ActivationBlock - k})
                                .view({m, blocks, kInt8ActivationBlock});
  const at::Tensor largest = padded.abs().amax(-1, /*keepdim=*/true);
  // Tensor / tensor divisions: torch may multiply by a reciprocal when dividing by a scalar, which would
  // round differently from the kernels' IEEE divisions.
  const at::Tensor limit = at::full_like(largest, kInt8ActivationMax);
  const at::Tensor inv = at::where(largest >= kInt8ActivationTiny, limit / largest, at::zeros_like(largest));
  const at::Tensor rounded = at::round(padded * inv) * (largest / limit);
  return rounded.view({m, blocks * kInt8ActivationBlock}).narrow(1, 0, k).contiguous();
}

}  // namespace fastquant
