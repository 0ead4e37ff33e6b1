#pragma once
// The argument rules of fastquant::decode_attention, in one place for its CPU glue
// (csrc/cpu/decode_attention.cpp) and its CUDA glue (csrc/cuda/decode_attention_cuda.cpp, torch's SDPA after
// these checks). Worded exactly as check_decode_attention_args in python/fastquant/kernels/ops.py (which the
// fake kernel and the reference run), so every path refuses the same input with the same message.
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "op_contract.h"

namespace fastquant {

// q (b, h, r, d) against k and v (b, h, s, d).
struct DecodeAttentionShape {
  int64_t b = 0, h = 0, r = 0, s = 0, d = 0;
};

inline DecodeAttentionShape check_decode_attention(Backend backend, const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                                   double scale) {
  constexpr const char* kPrefix = "fastquant.decode_attention:";
  for (const NamedTensor& t : {NamedTensor{"q", &q}, NamedTensor{"k", &k}, NamedTensor{"v", &v}}) {
    const at::ScalarType st = t.tensor->scalar_type();
    TORCH_CHECK((st == at::kFloat || st == at::kBFloat16 || st == at::kHalf) && t.tensor->dim() == 4, kPrefix,
                " ", t.name, " must be a 4-D float32, bfloat16 or float16 tensor, got ", py_dtype(st),
                " of shape ", py_shape(t.tensor->sizes()));
  }
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), kPrefix,
              " k and v must have q's dtype ", py_dtype(q.scalar_type()), ", got ", py_dtype(k.scalar_type()),
              " and ", py_dtype(v.scalar_type()));
  const int64_t b = q.size(0), h = q.size(1), d = q.size(3);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == b && k.size(1) == h && k.size(3) == d, kPrefix,
              " k and v must both have shape (B, H, S, D) = (", b, ", ", h, ", S, ", d, ") for q of shape ",
              py_shape(q.sizes()), ", got ", py_shape(k.sizes()), " and ", py_shape(v.sizes()));
  if (mask.has_value()) {
    const at::ScalarType mt = mask->scalar_type();
    TORCH_CHECK((mt == at::kBool || mt == q.scalar_type()) && mask->dim() == 4, kPrefix,
                " mask must be a 4-D bool or ", py_dtype(q.scalar_type()), " tensor, got ", py_dtype(mt),
                " of shape ", py_shape(mask->sizes()));
    const int64_t target[4] = {b, h, q.size(2), k.size(2)};
    bool broadcasts = true;
    for (int i = 0; i < 4; ++i) broadcasts = broadcasts && (mask->size(i) == 1 || mask->size(i) == target[i]);
    TORCH_CHECK(broadcasts, kPrefix, " mask of shape ", py_shape(mask->sizes()),
                " does not broadcast to (B, H, R, S) = ", py_shape(target));
  }
  TORCH_CHECK(std::isfinite(scale), kPrefix, " scale must be finite, got ", scale);
  check_devices(kPrefix, backend, {{"q", &q}, {"k", &k}, {"v", &v}, {"mask", optional_arg(mask)}});
  return {b, h, q.size(2), k.size(2), d};
}

}  // namespace fastquant
