// Portable sparse_linear kernel: any CPU, and the correctness baseline for the vector kernels. Walks the
// set bits of each mask word; each row's value pointer starts at its own offset, so a row never depends
// on the previous row's count. Int8 groups are accumulated in fp32 and scaled in fp32 at the group end.
#include <c10/util/Half.h>

#include <cstring>

#include "cpu/sparse_linear.h"

namespace fastquant::cpu {
namespace {

inline float value_f32(const float* v, int64_t i) { return v[i]; }
inline float value_f32(const int8_t* v, int64_t i) { return static_cast<float>(v[i]); }
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};
inline float value_f32(const Bf16* v, int64_t i) {
  const uint32_t u = static_cast<uint32_t>(v[i].bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float value_f32(const F16* v, int64_t i) { return c10::detail::fp16_ieee_to_fp32_value(v[i].bits); }

template <typename T>
int64_t run(const SparseLinearProblem& p, int64_t n_begin, int64_t n_end) {
  const T* values = static_cast<const T*>(p.values);
  const int64_t gc = p.group_chunks;
  for (int64_t j = n_begin; j < n_end; ++j) {
    const uint16_t* mrow = p.masks + j * p.n_chunks;
    if (first_bad_row(p, j, j + 1) >= 0) return j;
    const float* srow = p.scales ? p.scales + j * p.n_groups : nullptr;
    for (int64_t i = 0; i < p.m; ++i) {
      const float* xi = p.x + i * p.ldx;
      int64_t v = p.row_offsets[j];
      float acc = 0.f, part = 0.f;
      for (int64_t c = 0; c < p.n_chunks; ++c) {
        const float* xc = xi + 16 * c;
        for (unsigned bits = mrow[c]; bits != 0; bits &= bits - 1) {
          part += xc[__builtin_ctz(bits)] * value_f32(values, v++);
        }
        if (gc > 0 && ((c + 1) % gc == 0 || c + 1 == p.n_chunks)) {
          acc += part * srow[c / gc];
          part = 0.f;
        }
      }
      if (gc == 0) acc = srow ? part * srow[0] : part;
      if (p.bias) acc += p.bias[j];
      p.y[i * p.n + j] = acc;
    }
  }
  return -1;
}

}  // namespace

int64_t sparse_linear_portable(const SparseLinearProblem& p, int64_t n_begin, int64_t n_end) {
  switch (p.vtype) {
    case DType::kFloat32:
      return run<float>(p, n_begin, n_end);
    case DType::kBFloat16:
      return run<Bf16>(p, n_begin, n_end);
    case DType::kFloat16:
      return run<F16>(p, n_begin, n_end);
    case DType::kInt8:
      return run<int8_t>(p, n_begin, n_end);
  }
  return -1;
}

}  // namespace fastquant::cpu
