// See non_finite.h.
#include "cpu/non_finite.h"

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cpu/parallel.h"

namespace fastquant::cpu {
namespace {

// A float is not finite when its exponent bits are all ones. Bit tests on the raw words, OR-reduced without
// an early exit, so that the compiler vectorizes the loop (a few elements per cycle at SSE2).
template <typename Word>
bool words_finite(const Word* w, int64_t n, Word exponent) {
  Word bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<Word>((w[i] & exponent) == exponent);
  return bad == 0;
}

// Large tensors (prefill: M x (K + N) elements, megabytes) are scanned by torch's threads, each its own
// slice: one thread reads ~20 GB/s, so a single-threaded scan cost ~8% of a 512-row call of a 1536 x 576
// layer.
constexpr int64_t kScanChunk = 1 << 16;

template <typename Word>
bool all_words_finite(const void* data, int64_t n, Word exponent) {
  const auto* w = static_cast<const Word*>(data);
  if (n <= kScanChunk) return words_finite(w, n, exponent);
  std::atomic<bool> finite{true};
  parallel_ranges((n + kScanChunk - 1) / kScanChunk, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * kScanChunk, last = std::min(end * kScanChunk, n);
    if (!words_finite(w + first, last - first, exponent)) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

}  // namespace

bool all_finite(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return all_words_finite<uint32_t>(t.data_ptr(), t.numel(), 0x7f800000u);
  if (t.scalar_type() == at::kBFloat16) return all_words_finite<uint16_t>(t.data_ptr(), t.numel(), 0x7f80u);
  return all_words_finite<uint16_t>(t.data_ptr(), t.numel(), 0x7c00u);  // float16
}

bool finite_call(const at::Tensor& x, const at::Tensor& y) {
  return all_finite(y) && all_finite(x.contiguous());
}

void reference_linear_into(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  const int64_t k = weight.size(1), n = weight.size(0);
  at::Tensor y32 = at::linear(x.reshape({-1, k}).to(at::kFloat), weight);
  if (bias.has_value()) y32 = y32 + bias->to(at::kFloat);
  y.view({-1, n}).copy_(y32);
}

}  // namespace fastquant::cpu
