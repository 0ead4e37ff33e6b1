#pragma once
// decode_attention's loops, included by one file per ISA (decode_attention_portable.cpp, _avx2.cpp,
// _avx512.cpp), each compiled with its own -m flags, so this header includes no torch headers. The including
// file defines, in fastquant::cpu::attention_detail, `float fp16_to_f32(uint16_t)` and `struct Vec` (below)
// before including it, both in an anonymous namespace.
//
// One work item is one query row of one (batch, head): its scores against every kept position (a 16-lane dot
// product each), their softmax, and the weighted sum of the value rows (vectorized over D). A row's keys and
// values (2 x S x D elements, 96 KiB at S = 192, D = 64 in fp32) stay in L2 for the other rows of its head.
#include <cstdint>
#include <cstring>

#include "cpu/bf16_bits.h"
#include "cpu/decode_attention.h"

namespace fastquant::cpu::attention_detail {
// Internal linkage: each ISA's file compiles these loops with its own flags and Vec; with external linkage
// the linker would keep one copy of each inline function for all three files (they have the same names).
namespace {

inline float to_f32(float v) { return v; }
inline float to_f32(Bf16 v) { return bf16_bits_to_f32(v.bits); }
inline float to_f32(F16 v) { return fp16_to_f32(v.bits); }

constexpr float kMinusInf = -__builtin_inff();

// The vector operations come from the including file, as `struct Vec`: kWidth floats per register, zero(),
// load(const float*), load(const Bf16*), load(const F16*) (widened to fp32), fmadd(a, b, c) = a * b + c,
// add, set1, store(float*, v) and reduce(v) (the sum of the lanes). The portable build's Vec has one lane.

// Two accumulators: at D = 64 that is two independent FMA chains per dot product.
template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  auto a0 = Vec::zero(), a1 = Vec::zero();
  int64_t i = 0;
  for (; i + 2 * Vec::kWidth <= d; i += 2 * Vec::kWidth) {
    a0 = Vec::fmadd(Vec::load(q + i), Vec::load(k + i), a0);
    a1 = Vec::fmadd(Vec::load(q + i + Vec::kWidth), Vec::load(k + i + Vec::kWidth), a1);
  }
  for (; i + Vec::kWidth <= d; i += Vec::kWidth) a0 = Vec::fmadd(Vec::load(q + i), Vec::load(k + i), a0);
  float tail = 0.f;
  for (; i < d; ++i) tail += q[i] * to_f32(k[i]);
  return Vec::reduce(Vec::add(a0, a1)) + tail;
}

// out[0, d) = sum over s of w[s] * rows[s][0, d), positions of weight 0 skipped. Four vector accumulators
// stay in registers across the positions (D = 64 is one such block on AVX-512): an accumulator in memory
// would put a store-to-load forwarding on every position's path.
template <typename T>
inline void weighted_sum(float* out, const float* w, const T* rows, int64_t s_len, int64_t d) {
  constexpr int64_t W = Vec::kWidth;
  int64_t i = 0;
  for (; i + 4 * W <= d; i += 4 * W) {
    auto a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
    for (int64_t s = 0; s < s_len; ++s) {
      if (w[s] == 0.f) continue;  // dropped or negligible: its value row is not read
      const auto ws = Vec::set1(w[s]);
      const T* row = rows + s * d + i;
      a0 = Vec::fmadd(ws, Vec::load(row), a0);
      a1 = Vec::fmadd(ws, Vec::load(row + W), a1);
      a2 = Vec::fmadd(ws, Vec::load(row + 2 * W), a2);
      a3 = Vec::fmadd(ws, Vec::load(row + 3 * W), a3);
    }
    Vec::store(out + i, a0);
    Vec::store(out + i + W, a1);
    Vec::store(out + i + 2 * W, a2);
    Vec::store(out + i + 3 * W, a3);
  }
  for (; i + W <= d; i += W) {
    auto a = Vec::zero();
    for (int64_t s = 0; s < s_len; ++s) {
      if (w[s] != 0.f) a = Vec::fmadd(Vec::set1(w[s]), Vec::load(rows + s * d + i), a);
    }
    Vec::store(out + i, a);
  }
  for (; i < d; ++i) {
    float a = 0.f;
    for (int64_t s = 0; s < s_len; ++s) a += w[s] * to_f32(rows[s * d + i]);
    out[i] = a;
  }
}

inline float sum(const float* x, int64_t n) {
  auto a = Vec::zero();
  int64_t i = 0;
  for (; i + Vec::kWidth <= n; i += Vec::kWidth) a = Vec::add(a, Vec::load(x + i));
  float tail = 0.f;
  for (; i < n; ++i) tail += x[i];
  return Vec::reduce(a) + tail;
}

// e^x for x <= 0 (a score minus the row's maximum), within ~2 ulp: x = n ln2 + f with |f| <= ln2 / 2, Cephes'
// expf polynomial for e^f, and 2^n written into the exponent bits. Branch-free, so the loop over positions
// vectorizes (libm's expf is a call per element). Below -87 e^x would be subnormal: it is flushed to 0, which
// is below 1e-38 of the row's largest weight (1). NaN stays NaN.
inline float exp_nonpositive(float x) {
  const bool tiny = x < -87.f;
  const float xc = tiny ? -87.f : x;
  // n = round(x / ln2): adding 1.5 * 2^23 leaves the integer part in the low mantissa bits.
  const float t = xc * 1.44269504088896341f + 12582912.f;
  const float n = t - 12582912.f;
  // ln2 in two parts, so that n * ln2_hi is exact and f keeps its low bits.
  const float f = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.f;
  int32_t e = static_cast<int32_t>(t) - 12582912 + 127;  // n in [-126, 0]: a normal power of two
  e = e < 1 ? 1 : e;
  const uint32_t bits = static_cast<uint32_t>(e) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return tiny ? 0.f : p * two_n;
}

template <typename T, AttentionMask MASK>
void row(const DecodeAttentionProblem& p, float* scratch, int64_t item) {
  const int64_t unit = item / p.r, r = item % p.r;
  const int64_t bi = unit / p.h, hi = unit % p.h;
  const int64_t s_len = p.s, d = p.d;
  const T* keys = static_cast<const T*>(p.k) + unit * s_len * d;
  const T* values = static_cast<const T*>(p.v) + unit * s_len * d;
  const T* qrow = static_cast<const T*>(p.q) + item * d;
  float* scores = scratch;
  float* q = scratch + s_len;  // the query row in fp32, times the scale
  float* out = p.out + item * d;
  for (int64_t i = 0; i < d; ++i) q[i] = to_f32(qrow[i]) * p.scale;

  const int64_t mask_row = bi * p.mask_stride[0] + hi * p.mask_stride[1] + r * p.mask_stride[2];
  const int64_t ms = p.mask_stride[3];
  const auto* keep = static_cast<const uint8_t*>(p.mask) + mask_row;
  const T* add = static_cast<const T*>(p.mask) + mask_row;
  float top = kMinusInf;
  int64_t kept = 0;
  for (int64_t s = 0; s < s_len; ++s) {
    float bias = 0.f;
    if (MASK == AttentionMask::kBool && keep[s * ms] == 0) {
      scores[s] = kMinusInf;
      continue;
    }
    if (MASK == AttentionMask::kAdditive) {
      bias = to_f32(add[s * ms]);
      if (bias == kMinusInf) {
        scores[s] = kMinusInf;
        continue;
      }
    }
    const float score = dot(q, keys + s * d, d) + bias;
    scores[s] = score;
    top = score > top ? score : top;
    ++kept;
  }
  if (kept == 0) {  // nothing to attend to: zeros, as torch's SDPA gives
    for (int64_t i = 0; i < d; ++i) out[i] = 0.f;
    return;
  }
  for (int64_t s = 0; s < s_len; ++s)
    scores[s] = scores[s] == kMinusInf ? 0.f : exp_nonpositive(scores[s] - top);
  const float inv = 1.f / sum(scores, s_len);
  weighted_sum(out, scores, values, s_len, d);
  for (int64_t i = 0; i < d; ++i) out[i] *= inv;
}

template <typename T, AttentionMask MASK>
void rows(const DecodeAttentionProblem& p, float* scratch, int64_t begin, int64_t end) {
  for (int64_t item = begin; item < end; ++item) row<T, MASK>(p, scratch, item);
}

template <typename T>
void run_typed(const DecodeAttentionProblem& p, float* scratch, int64_t begin, int64_t end) {
  switch (p.mask_kind) {
    case AttentionMask::kNone:
      return rows<T, AttentionMask::kNone>(p, scratch, begin, end);
    case AttentionMask::kBool:
      return rows<T, AttentionMask::kBool>(p, scratch, begin, end);
    case AttentionMask::kAdditive:
      return rows<T, AttentionMask::kAdditive>(p, scratch, begin, end);
  }
}

inline void run_any(const DecodeAttentionProblem& p, float* scratch, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case DType::kFloat32:
      return run_typed<float>(p, scratch, begin, end);
    case DType::kBFloat16:
      return run_typed<Bf16>(p, scratch, begin, end);
    case DType::kFloat16:
      return run_typed<F16>(p, scratch, begin, end);
    case DType::kInt8:
      return;  // not an activation dtype: the glue refuses it
  }
}

}  // namespace
}  // namespace fastquant::cpu::attention_detail
