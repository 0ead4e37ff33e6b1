// See non_finite.h.
#include "cpu/non_finite.h"

#include <algorithm>
#include <cstdint>

namespace fastquant::cpu {
namespace {

// A float is not finite when its exponent bits are all ones. Bit tests on the raw words, OR-reduced without
// an early exit, so that the compiler vectorizes the loop (a few elements per cycle at SSE2).
template <typename Word>
bool words_finite(const void* data, int64_t n, Word exponent) {
  const auto* w = static_cast<const Word*>(data);
  Word bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<Word>((w[i] & exponent) == exponent);
  return bad == 0;
}

}  // namespace

bool all_finite(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return words_finite<uint32_t>(t.data_ptr(), t.numel(), 0x7f800000u);
  if (t.scalar_type() == at::kBFloat16) return words_finite<uint16_t>(t.data_ptr(), t.numel(), 0x7f80u);
  return words_finite<uint16_t>(t.data_ptr(), t.numel(), 0x7c00u);  // float16
}

bool finite_call(const at::Tensor& x, const at::Tensor& y) {
  return all_finite(y) && all_finite(x.contiguous());
}

at::Tensor dequantize_int8(const at::Tensor& codes, const at::Tensor& scales, int64_t group_size) {
  const at::Tensor w = codes.to(at::kFloat);
  const at::Tensor s = scales.to(at::kFloat);
  if (group_size == -1) return w * s.unsqueeze(1);
  const int64_t k = w.size(1);
  // A group wider than K is one group (reference.expand_group_scales).
  return w * s.repeat_interleave(std::min(group_size, k), 1).narrow(1, 0, k);
}

void reference_linear_into(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  const int64_t k = weight.size(1), n = weight.size(0);
  at::Tensor y32 = at::linear(x.reshape({-1, k}).to(at::kFloat), weight);
  if (bias.has_value()) y32 = y32 + bias->to(at::kFloat);
  y.view({-1, n}).copy_(y32);
}

}  // namespace fastquant::cpu
