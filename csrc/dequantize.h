#pragma once
// The dense fp32 (N, K) weight each packed format stands for, as ATen ops on any device: the C++ twins of
// python/fastquant/kernels/reference.py's dequantizers. Used where a kernel cannot be: the ops' backward
// (frozen_weight_autograd.cpp; data-independent shapes, so torch.compile traces it) and the CPU glue's
// reference fallback for non-finite input (cpu/non_finite.h). Slow by design: never on a fast path.
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fastquant {

// codes * scales, per-channel (N,) or per group of group_size columns (N, ceil(K / group_size)) scales.
at::Tensor dequantize_int8(const at::Tensor& codes, const at::Tensor& scales, int64_t group_size);

// s * (q - 8) (symmetric, offsets absent) or s * q + o (asymmetric), packed two codes per byte.
at::Tensor dequantize_int4(const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& offsets, int64_t in_features, int64_t group_size);

// bitmap16 (values, mask words, row offsets): kept values in place, zero where pruned, int8 codes times
// scales.
at::Tensor dequantize_bitmap16(const at::Tensor& values, const at::Tensor& masks,
                               const at::Tensor& row_offsets, const std::optional<at::Tensor>& scales,
                               int64_t in_features, int64_t group_size);

// csr16 (values, column indices, row offsets): repeated columns of a row add up; int8 codes times scales.
at::Tensor dequantize_csr16(const at::Tensor& values, const at::Tensor& column_indices,
                            const at::Tensor& row_offsets, const std::optional<at::Tensor>& scales,
                            int64_t in_features, int64_t group_size);

}  // namespace fastquant
