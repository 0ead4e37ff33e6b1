#pragma once
// Activations in 32-bit fixed point for the integer dot products of the M = 1 int8 kernels
// (int8_linear's cpu_avx512_vnni_fixed; sparse_linear's cpu_avx512_vnni_fixed and cpu_avx2_fixed): x is
// rounded once per call to X = round(x / step) with step = max|x| / (2^31 - 1) (AVX2: 2^31 - 2^16), and
// q . X is summed exactly in integers. The only rounding is x's, to 2^-31 of max|x|: below fp32's rounding
// of the products for the x it takes (see fixed_point_takes). ISA files; no torch headers.
#include <cstdint>

namespace fastquant::cpu {

// The magnitudes of x (k fp32) that decide whether fixed point applies: finite x with max_abs <=
// kFixedPointRange * others_mean, the mean magnitude of the other elements (beyond that, rounding typical
// elements to 2^-31 max|x| could cost more than fp32's rounding); other x takes an fp32 kernel, which also
// propagates NaN and infinities as the reference does.
struct XRange {
  bool finite;
  float max_abs;
  float others_mean;
};
constexpr float kFixedPointRange = 1024.f;
// Largest K of the 4-plane VNNI kernels: a plane's int32 sum of 255 * 128 * K must not overflow.
constexpr int64_t kFixedPointMaxK = 65536;

static inline bool fixed_point_takes(const XRange& range) {
  return range.finite && (range.max_abs == 0 || range.max_abs <= kFixedPointRange * range.others_mean);
}

#if defined(__x86_64__) || defined(_M_X64)
XRange x_range_avx512(const float* x, int64_t k);
// Writes the 4 byte planes of X = round(x / step), step = max_abs / (2^31 - 1), into planes (4 x stride
// bytes, stride a multiple of 16 and >= k, zero past k), bytes 0-2 unsigned and byte 3 signed, so that
// X = sum_b 2^(8b) x_b. top_sums[g] is the sum of byte 3 over columns [g * group, (g + 1) * group) for
// g < ceil(stride / group) (group a multiple of 16): the VNNI kernels feed byte 3 as the signed operand of
// vpdpbusd against q + 128 and take 128 times this sum off each group's dot product.
void fixed_point_x_avx512(const float* x, int64_t k, float max_abs, int64_t stride, int64_t group,
                          uint8_t* planes, int64_t* top_sums, double* step);

XRange x_range_avx2(const float* x, int64_t k);
// X = round(x / step), step = max_abs / (2^31 - 2^16), written as two int16 planes of ldx elements, hi then
// lo, with X = 65536 hi + lo (lo the signed low half; the margin of 2^16 keeps hi within int16). x has ldx
// elements (a multiple of 16), zero past k.
void fixed_point_x_avx2(const float* x, int64_t ldx, float max_abs, int16_t* planes, double* step);
#endif

}  // namespace fastquant::cpu
