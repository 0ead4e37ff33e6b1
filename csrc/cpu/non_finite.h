#pragma once
// The numerical contract for non-finite values (README, "Numerical contract"): every layout gives what the
// dense reference y = x @ W.T + b gives in IEEE fp32, W = q * s with q = 0 where pruned. An infinity in x
// times a pruned weight is NaN there, and an infinite scale makes W infinite, or NaN where q = 0. Kernels
// that visit only kept weights (csr16, the portable bitmap16 kernel) or apply a per-channel scale after the
// dot product (and the fixed-point paths) agree with that for finite x and scales only. Rather than slowing
// every kernel down, the glue checks x and the output after the kernel, O(M (K + N)) against the kernel's O(M
// N K), and computes a call that met a non-finite value again by the reference formula (torch ops on the
// dense weight: slow, but only for inputs that are already broken). Torch glue only: includes ATen.
#include <ATen/ATen.h>

#include <optional>

namespace fastquant::cpu {

// Whether every element of t (contiguous fp32, bf16 or fp16) is finite; one pass, no allocation.
bool all_finite(const at::Tensor& t);

// Whether activations x and the kernel's output y (contiguous, as empty_output makes it) are all finite.
bool finite_call(const at::Tensor& x, const at::Tensor& y);

// y = x @ weight.T + bias in fp32 (reference._linear_fp32), rounded once to y's dtype; y has x's leading
// dimensions and N columns.
void reference_linear_into(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias);

}  // namespace fastquant::cpu
