// Torch glue for fastquant::decode_attention on CPU (notes in decode_attention.h): checks the arguments
// (decode_attention_contract.h), splits the query rows across torch's intra-op threads and runs
// the kernel for the active ISA. A call whose output is not finite (NaN or infinity in q, k, v or an additive
// mask) is computed again by the reference, torch's SDPA in fp32, so that it gives what the reference gives.
#include "cpu/decode_attention.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/non_finite.h"
#include "cpu/parallel.h"
#include "decode_attention_contract.h"

namespace fastquant::cpu {
namespace {

// Below this many multiply-adds (q k^T and the weighted sum of v) a call runs on one thread. Not tuned: at
// SmolLM2's decode shape (0.22 M) two threads were only ~8% faster than one (12.6 against 13.6 us), so a call
// a few times smaller gains nothing from waking the other thread.
constexpr int64_t kParallelMacs = 1 << 16;

DecodeAttentionKernel active_kernel() {
#if defined(__x86_64__) || defined(_M_X64)
  if (active_isa() >= Isa::kAvx512) return decode_attention_avx512;
  if (active_isa() >= Isa::kAvx2) return decode_attention_avx2;
#endif
  return decode_attention_portable;
}

DType dtype_of(const at::Tensor& t) {
  if (t.scalar_type() == at::kBFloat16) return DType::kBFloat16;
  if (t.scalar_type() == at::kHalf) return DType::kFloat16;
  return DType::kFloat32;
}

at::Tensor reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, double scale) {
  std::optional<at::Tensor> m = mask;
  if (m.has_value() && m->scalar_type() != at::kBool) m = m->to(at::kFloat);
  return at::scaled_dot_product_attention(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), m, 0.0, false,
                                          scale)
      .to(q.scalar_type());
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& mask, double scale) {
  const DecodeAttentionShape shape = check_decode_attention(Backend::kCpu, q, k, v, mask, scale);
  const int64_t b = shape.b, h = shape.h, r = shape.r, s = shape.s, d = shape.d;
  const bool fp32 = q.scalar_type() == at::kFloat;
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  if (out.numel() == 0) return fp32 ? out : out.to(q.scalar_type());
  if (s == 0) return out.zero_().to(q.scalar_type());  // nothing to attend to, as torch's SDPA

  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  DecodeAttentionProblem p{};
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.out = out.data_ptr<float>();
  p.dtype = dtype_of(q);
  p.b = b;
  p.h = h;
  p.r = r;
  p.s = s;
  p.d = d;
  p.scale = static_cast<float>(scale);
  at::Tensor m;
  if (mask.has_value()) {
    // A broadcast view: stride 0 along the dimensions of size 1; no copy of the mask.
    m = mask->expand({b, h, r, s});
    p.mask = m.data_ptr();
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = m.stride(i);
    p.mask_kind = m.scalar_type() == at::kBool ? AttentionMask::kBool : AttentionMask::kAdditive;
  }

  const DecodeAttentionKernel kernel = active_kernel();
  const int64_t items = b * h * r;
  const auto run = [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(s + d);
    kernel(p, scratch.data(), begin, end);
  };
  if (items > 1 && items * s * d * 2 >= kParallelMacs) {
    parallel_ranges(items, run);
  } else {
    run(0, items);
  }
  if (!all_finite(out)) return reference(q, k, v, mask, scale);
  return fp32 ? out : out.to(q.scalar_type());
}

}  // namespace

const char* decode_attention_cpu_path() {
#if defined(__x86_64__) || defined(_M_X64)
  if (active_isa() >= Isa::kAvx512) return "cpu_attention_avx512";
  if (active_isa() >= Isa::kAvx2) return "cpu_attention_avx2";
#endif
  return "cpu_attention_portable";
}

TORCH_LIBRARY_IMPL(fastquant, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace fastquant::cpu
