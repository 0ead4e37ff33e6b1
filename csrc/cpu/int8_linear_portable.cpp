// Portable kernel: any CPU, and the correctness baseline for the vector kernels. Accumulates each group
// in fp32 and applies its scale in fp32, so fp16 activations never overflow an intermediate.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/int8_linear.h"

namespace fastquant::cpu {
namespace {

template <typename T>
void run(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end) {
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  for (int64_t i = 0; i < p.m; ++i) {
    const T* xi = x + i * p.k;
    for (int64_t j = n_begin; j < n_end; ++j) {
      const int8_t* wj = p.w + (j - p.w_first_row) * p.k;
      const float* sj = p.scales + j * p.n_groups;
      float acc = 0.f;
      for (int64_t g = 0; g < p.n_groups; ++g) {
        const int64_t k0 = g * p.group_size;
        const int64_t k1 = std::min(p.k, k0 + p.group_size);
        float part = 0.f;
        for (int64_t kk = k0; kk < k1; ++kk) part += static_cast<float>(xi[kk]) * static_cast<float>(wj[kk]);
        acc += part * sj[g];
      }
      if (bias) acc += static_cast<float>(bias[j]);
      y[i * p.n + j] = static_cast<T>(acc);
    }
  }
}

}  // namespace

void int8_linear_portable(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end, void*) {
  switch (p.dtype) {
    case DType::kFloat32:
      return run<float>(p, n_begin, n_end);
    case DType::kBFloat16:
      return run<c10::BFloat16>(p, n_begin, n_end);
    case DType::kFloat16:
      return run<c10::Half>(p, n_begin, n_end);
  }
}

}  // namespace fastquant::cpu
