// Torch glue for fastquant::int8_linear on CPU: checks arguments, then splits output columns across
// torch's intra-op threads (parallel_ranges, so torch.set_num_threads applies) and runs the kernel for the
// active ISA.
#include "cpu/int8_linear.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <memory>

#include "cpu/cpu_features.h"
#include "cpu/fixed_point_x.h"
#include "cpu/int8_activations_x.h"
#include "cpu/int8_linear_glue.h"
#include "cpu/non_finite.h"
#include "cpu/parallel.h"
#include "dequantize.h"
#include "int8_activations.h"
#include "int8_linear_contract.h"

namespace fastquant::cpu {
namespace {

constexpr int64_t kFixedMinK = 2048;
static_assert(kInt8XTiny == kInt8ActivationTiny, "the decode kernels round x as the torch ops do");

enum class Path { kPortable, kAvx2Fp32, kAvx512Fp32, kAvx512VnniFixed, kAvx512Bf16, kAvx2Int8X };

// The kernel for a problem with finite x (x with NaN or inf, which int8_activations leaves unrounded, takes
// the fp32 kernel of the ISA). With int8_activations, cpu_avx2_int8x takes small M on AVX-512 CPUs too, as
// int4's AVX2 decode kernel does: 7 ymm instructions per 32 weights against cpu_avx512_fp32's 6 zmm ones (3
// per 16), and this project's Zen 5 VM runs a 512-bit operation at half the rate of a 256-bit one
// (int4_linear.h). Not measured on an AVX-512 CPU yet (benchmarks/NOTES.md). The other paths run on x~.
Path choose_path(Isa isa, int64_t m, int64_t k, int64_t group, DType dtype, bool int8_activations) {
#if defined(__x86_64__) || defined(_M_X64)
  if (int8_activations && isa >= Isa::kAvx2 && m <= kInt8XMaxRows && (group == k || group % 32 == 0)) {
    return Path::kAvx2Int8X;
  }
  if (isa >= Isa::kAvx512) {
    if (m > kBf16MinRows && bf16_chunk(k, group) > 0 && bf16_activations_allowed(dtype)) {
      return Path::kAvx512Bf16;
    }
    // Fixed point sums whole 64-column steps per group (a group's end flushes its sums). From K > 2048 only:
    // streaming from DRAM (M = 1, benchmarks/results/decode-layer-dram-2026-12-06.md) it ran at 0.96-1.24x
    // the fp32 kernel at K = 4096-11008 (1.3-1.4x from cache), but 0.76-0.90x at SmolLM2's K = 576 and 1536.
    if (m == 1 && k > kFixedMinK && k <= kFixedPointMaxK && (group == k || group % 64 == 0)) {
      return Path::kAvx512VnniFixed;
    }
    return Path::kAvx512Fp32;
  }
  if (isa == Isa::kAvx2) return Path::kAvx2Fp32;
#endif
  return Path::kPortable;
}

const char* path_name(Path path) {
  // In the order of Path's values.
  constexpr const char* kNames[] = {"cpu_portable",          "cpu_avx2_fp32",   "cpu_avx512_fp32",
                                    "cpu_avx512_vnni_fixed", "cpu_avx512_bf16", "cpu_avx2_int8x"};
  return kNames[static_cast<int>(path)];
}

}  // namespace

// K chunk of the bf16 kernel: a multiple of the group, so that groups never straddle two chunks.
int64_t bf16_chunk(int64_t k, int64_t group) {
  if (group >= k) return 256;  // per-channel (or one group covering K)
  if (group % 2 != 0) return 0;
  if (256 % group == 0) return 256;
  if (group % 256 == 0) return group;
  return 0;
}

#if defined(__x86_64__) || defined(_M_X64)
void int8_linear_run_bf16(Int8LinearProblem& p, const at::Tensor& x2) {
  // The only path that rounds activations: to bf16, once per call (exact when x is bf16 already).
  // Pairs (x[i, 2q], x[i, 2q+1]) are packed in 32 bits and transposed so 16 rows fill a vector.
  const int64_t m = p.m, k = p.k, n = p.n;
  p.mp = (m + 15) / 16 * 16;
  const int64_t kp2 = (k + 1) / 2;
  p.xt_stride = p.mp + 16;
  at::Tensor xt;
  if (x2.scalar_type() == at::kFloat) {
    // One pass (convert, pair, transpose 16 x 16) instead of four ATen ops: a tenth of a SmolLM2 layer's
    // prefill time went to them.
    xt = at::empty({kp2, p.xt_stride}, x2.options().dtype(at::kInt));
    int8_linear_avx512_bf16_x(x2.data_ptr<float>(), m, k, p.mp, p.xt_stride,
                              reinterpret_cast<uint32_t*>(xt.data_ptr<int32_t>()));
  } else {
    at::Tensor xb = at::zeros({m, 2 * kp2}, x2.options().dtype(at::kBFloat16));
    xb.narrow(1, 0, k).copy_(x2);
    xt = at::zeros({kp2, p.xt_stride}, x2.options().dtype(at::kInt));
    xt.narrow(1, 0, m).copy_(xb.view(at::kInt).t());
  }
  p.xt = reinterpret_cast<const uint32_t*>(xt.data_ptr<int32_t>());
  p.kc = bf16_chunk(k, p.group_size);
  const int64_t kcs = (p.kc + 31) / 32 * 32;
  const int64_t scratch_bytes = kBf16TileCols * kcs * 2 + kBf16TileCols * p.mp * 4;
  // Work unit: blocks of 32 output columns (half a tile), so each thread reads a disjoint slice of the
  // weight exactly once; whole tiles as the unit left SmolLM2's N = 192 and 576 (3 and 9 tiles) a tile
  // short on one of two threads.
  constexpr int64_t unit = kBf16TileCols / 2;
  parallel_ranges((n + unit - 1) / unit, [&](int64_t begin, int64_t end) {
    std::unique_ptr<char[]> scratch(new char[scratch_bytes + 64]);
    void* aligned =
        reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.get()) + 63) & ~uintptr_t(63));
    int8_linear_avx512_bf16(p, begin * unit, std::min(end * unit, n), aligned);
  });
}
#endif

at::Tensor int8_rounded_activations(const at::Tensor& x32, int64_t m, int64_t k) {
#if defined(__x86_64__) || defined(_M_X64)
  if (active_isa() >= Isa::kAvx2) {
    at::Tensor rounded = at::empty({m, k}, x32.options());
    const float* x = x32.data_ptr<float>();
    float* out = rounded.data_ptr<float>();
    std::atomic<bool> finite{true};
    parallel_ranges(m, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end && finite.load(std::memory_order_relaxed); ++i) {
        if (!int8x_round_avx2(x + i * k, k, out + i * k)) finite = false;
      }
    });
    return finite ? rounded : x32;
  }
#endif
  return all_finite(x32) ? int8_activation_round(x32.view({m, k})) : x32;
}

const char* int8_linear_cpu_path(int64_t m, int64_t n, int64_t k, int64_t group_size, DType dtype,
                                 bool int8_activations) {
  const int64_t group = group_size == -1 || group_size > k ? k : group_size;
  return path_name(choose_path(active_isa(), m, k, group, dtype, int8_activations));
}

namespace {

at::Tensor run_kernels(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, int64_t group_size, bool int8_activations) {
  const Int8LinearShape shape = check_int8_linear(Backend::kCpu, x, qweight, scales, bias, group_size);
  const int64_t m = shape.m, n = shape.n, k = shape.k, n_groups = shape.n_groups;
  const DType dtype = shape.x_dtype;
  const int64_t effective_group = group_size == -1 ? k : group_size;
  at::Tensor y = empty_output(x, n);
  if (output_without_kernel(y, k, bias)) return y;

  // The kernels read x through its data pointer: a contiguous x of any shape is the (m, k) matrix they need.
  // A view or a conversion that changes nothing is still a dispatcher call (and a view a new tensor), and a
  // SmolLM2 token makes 211 decode calls of 5-50 us: they are made only where a path needs them.
  at::Tensor x2 = x.contiguous();
  const Path path = choose_path(active_isa(), m, k, std::min(effective_group, k), dtype, int8_activations);
  // int8_activations on a path that does not round x itself: the kernel computes on x~ in fp32 (x~ is not a
  // bf16 or fp16 value), or on x as it is when x holds NaN or inf.
  const bool on_x_tilde = int8_activations && path != Path::kAvx2Int8X;
  if (on_x_tilde) x2 = int8_rounded_activations(x2.to(at::kFloat), m, k);
  const at::Tensor w = qweight.contiguous();
  const at::Tensor s = scales.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  Int8LinearProblem p{x2.data_ptr(),
                      w.data_ptr<int8_t>(),
                      s.data_ptr<float>(),
                      b.defined() ? b.data_ptr() : nullptr,
                      y.data_ptr(),
                      m,
                      n,
                      k,
                      effective_group,
                      n_groups,
                      on_x_tilde ? DType::kFloat32 : dtype};
  if (path == Path::kPortable) {
    // The portable kernel reads x and bias and writes y in one dtype: fp32 throughout on x~.
    const bool fp32_run = p.dtype != dtype;
    const at::Tensor b32 = fp32_run && b.defined() ? b.to(at::kFloat) : b;
    at::Tensor y_run = fp32_run ? at::empty({m, n}, x.options().dtype(at::kFloat)) : y;
    p.bias = b32.defined() ? b32.data_ptr() : nullptr;
    p.y = y_run.data_ptr();
    // Columns are the unit of work: each thread streams a disjoint slice of the weight exactly once.
    parallel_ranges((n + 15) / 16, [&](int64_t begin, int64_t end) {
      int8_linear_portable(p, begin * 16, std::min(end * 16, n), nullptr);
    });
    if (fp32_run) y.view({m, n}).copy_(y_run);
    return y;
  }
#if defined(__x86_64__) || defined(_M_X64)
  if (p.group_size > k) p.group_size = k;  // one group covering K reads as per-channel
  // Vector paths compute in fp32 into an fp32 output (y itself for float32 x), then round once to x's dtype.
  const at::Tensor b32 = !b.defined() || b.scalar_type() == at::kFloat ? b : b.to(at::kFloat);
  at::Tensor y32 = dtype == DType::kFloat32 ? y : at::empty({m, n}, x.options().dtype(at::kFloat));
  p.bias_f32 = b32.defined() ? b32.data_ptr<float>() : nullptr;
  p.y_f32 = y32.data_ptr<float>();
  if (path == Path::kAvx512Bf16) {
    int8_linear_run_bf16(p, x2.view({m, k}));
  } else {
    const at::Tensor x32 = x2.scalar_type() == at::kFloat ? x2 : x2.to(at::kFloat);
    p.x_f32 = x32.data_ptr<float>();
    const Isa isa = active_isa();
    Int8LinearKernel kernel = path == Path::kAvx2Fp32 || (path == Path::kAvx2Int8X && isa < Isa::kAvx512)
                                  ? int8_linear_avx2_fp32
                                  : int8_linear_avx512_fp32;
    std::unique_ptr<char[]> x_fixed;  // one heap block, not two at::empty calls (~1 us each)
    if (path == Path::kAvx2Int8X) {
      // Per row one int8 plane (a multiple of 32 bytes: the steps after the planes stay aligned), then the
      // steps. x with NaN or inf is not rounded: the fp32 kernel propagates them as the reference does.
      const int64_t stride = (k + 31) / 32 * 32;
      x_fixed.reset(new char[m * stride + m * (stride / 32) * sizeof(float)]);
      int8_t* planes = reinterpret_cast<int8_t*>(x_fixed.get());
      float* steps = reinterpret_cast<float*>(x_fixed.get() + m * stride);
      bool finite = true;
      for (int64_t i = 0; i < m && finite; ++i) {
        finite = int8x_x_avx2(p.x_f32 + i * k, k, stride, 32, planes + i * stride, steps + i * (stride / 32),
                              nullptr);
      }
      if (finite) {
        p.x_int8 = planes;
        p.x_int8_steps = steps;
        p.x_int8_stride = stride;
        kernel = int8_linear_avx2_int8x;
      }
    }
    const XRange range =
        path == Path::kAvx512VnniFixed ? x_range_avx512(p.x_f32, k) : XRange{false, 0.f, 0.f};
    if (fixed_point_takes(range)) {
      // Other x (NaN/inf, an outlier) stays on the fp32 kernel, which rounds nothing and propagates
      // non-finite values as the reference does.
      const int64_t stride = (k + 63) / 64 * 64;
      const int64_t group = p.group_size < k ? p.group_size : stride;
      // 4 * stride bytes of planes (a multiple of 256: the int64 sums after them stay aligned), then the
      // sums.
      x_fixed.reset(new char[4 * stride + (stride + group - 1) / group * sizeof(int64_t)]);
      uint8_t* planes = reinterpret_cast<uint8_t*>(x_fixed.get());
      int64_t* top_sums = reinterpret_cast<int64_t*>(x_fixed.get() + 4 * stride);
      fixed_point_x_avx512(p.x_f32, k, range.max_abs, stride, group, planes, top_sums, &p.x_fixed_step);
      p.x_fixed = planes;
      p.x_fixed_stride = stride;
      p.x_fixed_top_sums = top_sums;
      kernel = int8_linear_avx512_vnni_fixed;
    }
    // Work unit: blocks of 8 output columns, so each thread streams a disjoint slice of the weight
    // exactly once. Small N still splits across threads when it has at least two blocks.
    constexpr int64_t grain = 8;
    parallel_ranges((n + grain - 1) / grain, [&](int64_t begin, int64_t end) {
      kernel(p, begin * grain, std::min(end * grain, n), nullptr);
    });
  }
  if (dtype != DType::kFloat32) y.view({m, n}).copy_(y32);
#endif
  return y;
}

}  // namespace

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& bias, int64_t group_size, bool int8_activations) {
  at::Tensor y = run_kernels(x, qweight, scales, bias, group_size, int8_activations);
  // Per-channel scales multiply a finished dot product, so an infinite one would not meet a zero code.
  if (!finite_call(x, y)) {
    const int64_t k = qweight.size(1), m = k > 0 ? x.numel() / k : 0;
    const at::Tensor x_used =
        int8_activations && k > 0 ? int8_rounded_activations(x.contiguous().to(at::kFloat), m, k) : x;
    reference_linear_into(y, x_used, dequantize_int8(qweight, scales, group_size), bias);
  }
  return y;
}

TORCH_LIBRARY_IMPL(fastquant, CPU, m) { m.impl("int8_linear", &int8_linear_cpu); }

}  // namespace fastquant::cpu
