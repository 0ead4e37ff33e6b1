// Portable int4 kernel: any CPU, and the correctness baseline for the vector kernels. Each weight is
// dequantized exactly as the reference does it (fp32 multiply, then add), the products are summed in fp32.
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "cpu/int4_linear.h"

namespace fastquant::cpu {

float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

void int4_linear_portable(const Int4LinearProblem& p, int64_t n_begin, int64_t n_end) {
  std::vector<float> w(p.k);
  for (int64_t j = n_begin; j < n_end; ++j) {
    const uint8_t* row = p.w + j * p.row_bytes;
    for (int64_t kk = 0; kk < p.k; ++kk) {
      const uint8_t byte = row[kk / 64 * 32 + kk % 32];
      const int code = kk % 64 < 32 ? byte & 0xF : byte >> 4;
      const int64_t g = kk / p.group_size;
      const float s = half_to_float(p.scales[j * p.n_groups + g]);
      w[kk] = p.offsets ? s * static_cast<float>(code) + half_to_float(p.offsets[j * p.n_groups + g])
                        : s * static_cast<float>(code - 8);
    }
    for (int64_t i = 0; i < p.m; ++i) {
      const float* xi = p.x + i * p.k;
      float acc = 0.f;
      for (int64_t kk = 0; kk < p.k; ++kk) acc += xi[kk] * w[kk];
      p.y[i * p.n + j] = acc + (p.bias ? p.bias[j] : 0.f);
    }
  }
}

}  // namespace fastquant::cpu
