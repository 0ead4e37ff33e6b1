// Torch glue for fastquant::decode_attention on CPU (notes in decode_attention.h): checks the arguments
// (worded as ops.check_decode_attention_args), splits the query rows across torch's intra-op threads and runs
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
#include "op_contract.h"

namespace fastquant::cpu {
namespace {

constexpr const char* kPrefix = "fastquant.decode_attention:";
// Below this many multiply-adds (q k^T and the weighted sum of v) a call runs on one thread: waking the
// others costs more than it saves.
constexpr int64_t kParallelMacs = 1 << 16;

DecodeAttentionKernel active_kernel() {
#if defined(__x86_64__) || defined(_M_X64)
  if (active_isa() >= Isa::kAvx512) return decode_attention_avx512;
  if (active_isa() >= Isa::kAvx2) return decode_attention_avx2;
#endif
  return decode_attention_portable;
}

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& mask, double scale) {
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
  check_devices(kPrefix, Backend::kCpu, {{"q", &q}, {"k", &k}, {"v", &v}, {"mask", optional_arg(mask)}});
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
  check_args(q, k, v, mask, scale);
  const int64_t b = q.size(0), h = q.size(1), r = q.size(2), s = k.size(2), d = q.size(3);
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
