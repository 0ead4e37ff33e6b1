#pragma once
// Raw-pointer interface between the torch glue (decode_attention.cpp) and the per-ISA kernels of
// decode_attention: softmax(q k^T * scale + mask) v for a few query rows per key/value head, the attention of
// a decode step. A grouped-query model packs the query heads of one key/value head as its rows (q (B, H_kv,
// R, D)), so the cache's keys and values are read as they are, once per step.
//
// Why not torch's SDPA: at one token and a few hundred cached positions the work is ~0.2 M multiply-adds per
// layer, and torch's CPU flash attention spends ~30 us around them (per-call buffers, MKL's small-GEMM
// packing, a thread split over 3 heads) where the loops take a few. Positions a bool mask drops (a static
// cache's empty slots) are skipped, not computed and masked.
//
// Kernel paths (decode_attention_cpu_path): cpu_attention_portable, cpu_attention_avx2, cpu_attention_avx512:
// the loops of decode_attention_kernel.h on one fp32 lane, 8 (ymm) or 16 (zmm); fp32 accumulation and an fp32
// output whatever the input dtype.
#include <cstdint>

#include "dtypes.h"

namespace fastquant::cpu {

enum class AttentionMask : int { kNone = 0, kBool = 1, kAdditive = 2 };

struct DecodeAttentionProblem {
  const void* q;  // (B, H, R, D) contiguous, dtype
  const void* k;  // (B, H, S, D) contiguous, dtype
  const void* v;  // (B, H, S, D) contiguous, dtype
  float* out;     // (B, H, R, D) fp32
  // kBool: bool (one byte, nonzero keeps); kAdditive: dtype, added to the scores. Element (b, h, r, s) is at
  // b * mask_stride[0] + h * mask_stride[1] + r * mask_stride[2] + s * mask_stride[3] (a stride of 0
  // broadcasts).
  const void* mask;
  int64_t mask_stride[4];
  AttentionMask mask_kind;
  DType dtype;
  int64_t b, h, r, s, d;
  float scale;
};

// Computes query rows [begin, end) (row (b, h, r) is item (b * H + h) * R + r) with scratch of s + d floats.
using DecodeAttentionKernel = void (*)(const DecodeAttentionProblem& p, float* scratch, int64_t begin,
                                       int64_t end);

void decode_attention_portable(const DecodeAttentionProblem& p, float* scratch, int64_t begin, int64_t end);
#if defined(__x86_64__) || defined(_M_X64)
void decode_attention_avx2(const DecodeAttentionProblem& p, float* scratch, int64_t begin, int64_t end);
void decode_attention_avx512(const DecodeAttentionProblem& p, float* scratch, int64_t begin, int64_t end);
#endif

const char* decode_attention_cpu_path();

namespace attention_detail {
// 16-bit activations as the kernels see them: raw bits, widened to fp32 on load.
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};
}  // namespace attention_detail

}  // namespace fastquant::cpu
