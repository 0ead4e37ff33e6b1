// Torch glue for fastquant::int4_linear on CPU: checks the arguments (int4_linear_contract.h), chooses the
// kernel for the active ISA and M, and splits output columns across torch's intra-op threads
// (parallel_ranges), so each thread streams a disjoint slice of the weight exactly once.
#include "cpu/int4_linear.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <memory>

#include "cpu/cpu_features.h"
#include "cpu/int8_activations_x.h"
#include "cpu/int8_linear_glue.h"
#include "cpu/non_finite.h"
#include "cpu/parallel.h"
#include "int4_linear_contract.h"

namespace fastquant::cpu {
namespace {

enum class Path { kPortable, kAvx2Fixed16, kAvx512VnniFixed16, kAvx512Bf16, kAvx2TiledFp32, kAvx2Int8X };
// Path's names (int4_linear_cpu_path), in its order.
constexpr const char* kPathNames[] = {"cpu_portable",    "cpu_avx2_fixed16",    "cpu_avx512_vnni_fixed16",
                                      "cpu_avx512_bf16", "cpu_avx2_tiled_fp32", "cpu_avx2_int8x"};

// Prefill rounds x to bf16 where int8_linear does: above kBf16MinRows rows, and for fp32 x only when torch's
// float32 matmul precision allows it (bf16_activations_allowed, the one rule both ops follow).
static_assert(kAvx512FixedMaxRows >= kBf16MinRows,
              "int4 prefill rounds x to bf16 only where int8_linear does");

// The kernel for a problem with finite x (x with NaN or inf takes cpu_avx2_tiled_fp32 on AVX2 and AVX-512).
// M = 1 runs cpu_avx2_fixed16 on AVX-512 CPUs too: measured faster there (int4_linear.h).
// With int8_activations, cpu_avx2_int8x takes the rows cpu_avx2_fixed16 would (the glue rounds x for the
// others).
Path choose_path(Isa isa, int64_t m, int64_t k, int64_t group_size, DType dtype, bool int8_activations) {
#if defined(__x86_64__) || defined(_M_X64)
  if (int8_activations && isa >= Isa::kAvx2 && m <= kFixedMaxRows &&
      (isa < Isa::kAvx512 || m < kAvx512FixedMinRows)) {
    return Path::kAvx2Int8X;
  }
  if (isa >= Isa::kAvx512 && m > kAvx512FixedMaxRows) {
    const bool bf16 = bf16_activations_allowed(dtype) && bf16_chunk(k, std::min(group_size, k)) > 0;
    return bf16 ? Path::kAvx512Bf16 : Path::kAvx2TiledFp32;
  }
  if (isa >= Isa::kAvx512 && m >= kAvx512FixedMinRows) return Path::kAvx512VnniFixed16;
  if (isa >= Isa::kAvx2) return m <= kFixedMaxRows ? Path::kAvx2Fixed16 : Path::kAvx2TiledFp32;
#endif
  return Path::kPortable;
}

}  // namespace

const char* int4_linear_cpu_path(int64_t m, int64_t n, int64_t k, int64_t group_size, DType dtype,
                                 bool int8_activations) {
  return kPathNames[static_cast<int>(choose_path(active_isa(), m, k, group_size, dtype, int8_activations))];
}

at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& bias,
                           int64_t in_features, int64_t group_size, bool int8_activations) {
  const Int4LinearShape s =
      check_int4_linear(Backend::kCpu, x, qweight, scales, offsets, bias, in_features, group_size);
  at::Tensor y = empty_output(x, s.n);
  if (output_without_kernel(y, s.k, bias)) return y;

  const int64_t m = s.m, n = s.n, k = s.k;
  // Kernels compute in fp32 (x converted exactly from bf16/fp16) into an fp32 output, rounded once at the
  // end. They read x through its data pointer, so a contiguous fp32 x of any shape is used as it is (a view
  // or a conversion that changes nothing is still a dispatcher call, per decode call of 5-50 us); paths that
  // need the (m, k) tensor view it.
  at::Tensor x32 = x.contiguous();
  if (s.x_dtype != DType::kFloat32) x32 = x32.to(at::kFloat);
  Path path = choose_path(active_isa(), m, k, s.group_size, s.x_dtype, int8_activations);
  // int8_activations on a path that does not round x itself: every kernel then computes on x~ (exact in the
  // fixed-point paths' 16 bits). x with NaN or inf stays as it is, as in the reference.
  if (int8_activations && path != Path::kAvx2Int8X) x32 = int8_rounded_activations(x32, m, k);
  const at::Tensor w = qweight.contiguous();
  const at::Tensor sc = scales.contiguous();
  const at::Tensor off = s.has_offsets ? offsets->contiguous() : at::Tensor();
  const at::Tensor b32 = s.has_bias ? bias->contiguous().to(at::kFloat) : at::Tensor();
  at::Tensor y32 = s.x_dtype == DType::kFloat32 ? y : at::empty({m, n}, x.options().dtype(at::kFloat));
  Int4LinearProblem p{w.data_ptr<uint8_t>(),
                      reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>()),
                      off.defined() ? reinterpret_cast<const uint16_t*>(off.data_ptr<at::Half>()) : nullptr,
                      x32.data_ptr<float>(),
                      b32.defined() ? b32.data_ptr<float>() : nullptr,
                      y32.data_ptr<float>(),
                      m,
                      n,
                      k,
                      s.row_bytes,
                      s.group_size,
                      s.n_groups};
#if defined(__x86_64__) || defined(_M_X64)
  // x in fixed point lives in one heap block, not in three tensors: an at::empty costs ~1 us through the
  // dispatcher, and SmolLM2's decode makes 210 calls per token of ~10-50 us each.
  std::unique_ptr<char[]> x_fixed;
  if (path == Path::kAvx2Fixed16 || path == Path::kAvx512VnniFixed16 || path == Path::kAvx2Int8X) {
    p.kp = s.row_bytes * 2;
    const int64_t plane_bytes = m * 2 * p.kp;  // a multiple of 128: the floats after it stay aligned
    // 8 floats past the last row of steps and of group sums: cpu_avx2_fixed16 loads a row's last blocks 8
    // at a time and masks the lanes past its end.
    const int64_t steps_floats = m * (p.kp / 32) + 8;
    const int64_t sums_floats = m * s.n_groups + 8;
    x_fixed.reset(new char[plane_bytes + (steps_floats + sums_floats) * sizeof(float)]);
    int8_t* planes = reinterpret_cast<int8_t*>(x_fixed.get());
    float* steps = reinterpret_cast<float*>(x_fixed.get() + plane_bytes);
    float* group_sums = steps + steps_floats;
    for (int64_t i = 0; i < m && path != Path::kAvx2TiledFp32; ++i) {
      const float* xi = p.x + i * k;
      int8_t* planes_i = planes + i * 2 * p.kp;
      float* steps_i = steps + i * (p.kp / 32);
      float* sums_i = group_sums + i * s.n_groups;
      const bool finite = path == Path::kAvx2Int8X
                              ? int8x_x_avx2(xi, k, p.kp, s.group_size, planes_i, steps_i, sums_i)
                              : int4_fixed16_x_avx2(xi, k, p.kp, s.group_size, planes_i, steps_i, sums_i);
      if (!finite) {
        path = Path::kAvx2TiledFp32;  // NaN/inf (or a vanishing block) in x: no rounding, IEEE propagation
      }
    }
    if (path == Path::kAvx512VnniFixed16) int4_fixed16_interleave_avx512(planes, plane_bytes);
    p.x_planes = planes;
    p.x_steps = steps;
    p.x_group_sums = group_sums;
  }
  if (path == Path::kAvx512Bf16 && !all_finite(x32)) {
    path = Path::kAvx2TiledFp32;  // NaN/inf in x: the fp32 kernel propagates them as the reference does
  }
  if (path == Path::kAvx512Bf16) {
    at::Tensor codes = at::empty({n, k}, x.options().dtype(at::kChar));
    parallel_ranges((n + 63) / 64, [&](int64_t begin, int64_t end) {
      int4_codes_to_int8_avx512(p, begin * 64, std::min(end * 64, n), codes.data_ptr<int8_t>());
    });
    const at::Tensor sc32 = sc.to(at::kFloat).contiguous();
    Int8LinearProblem ip{x32.data_ptr(),
                         codes.data_ptr<int8_t>(),
                         sc32.data_ptr<float>(),
                         nullptr,
                         y32.data_ptr(),
                         m,
                         n,
                         k,
                         std::min(s.group_size, k),
                         s.n_groups,
                         DType::kFloat32};
    ip.bias_f32 = p.bias;
    ip.y_f32 = p.y;
    int8_linear_run_bf16(ip, x32.view({m, k}));
    if (s.has_offsets) {
      // w = s q + o = s (q - 8) + (o + 8 s): the kernel summed the first part, the second multiplies each
      // group's fp32 sum of x.
      const at::Tensor x_groups = at::constant_pad_nd(x32.view({m, k}), {0, s.n_groups * s.group_size - k})
                                      .view({m, s.n_groups, s.group_size})
                                      .sum(-1);
      y32.view({m, n}).addmm_(x_groups, (off.to(at::kFloat) + sc32 * 8).t());
    }
  } else if (path == Path::kAvx512VnniFixed16) {
    // Blocks of 8 output columns (two passes of kInt4Avx512Rows): small N still splits across threads.
    constexpr int64_t grain = 8;
    const int64_t scratch_floats = int4_avx512_scratch_floats(p.kp);
    parallel_ranges((n + grain - 1) / grain, [&](int64_t begin, int64_t end) {
      std::unique_ptr<float[]> scratch(new float[scratch_floats]);
      int4_linear_avx512_fixed16(p, begin * grain, std::min(end * grain, n), scratch.get());
    });
  } else if (path == Path::kAvx2Fixed16 || path == Path::kAvx2Int8X) {
    // Blocks of 8 output columns: small N still splits across threads.
    constexpr int64_t grain = 8;
    const auto kernel = path == Path::kAvx2Int8X ? int4_linear_avx2_int8x : int4_linear_avx2_fixed16;
    parallel_ranges((n + grain - 1) / grain,
                    [&](int64_t begin, int64_t end) { kernel(p, begin * grain, std::min(end * grain, n)); });
  } else if (path == Path::kAvx2TiledFp32) {
    parallel_ranges((n + kInt4TileRows - 1) / kInt4TileRows, [&](int64_t begin, int64_t end) {
      std::unique_ptr<float[]> scratch(new float[int4_tiled_scratch_floats() + 8]);
      float* aligned =
          reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.get()) + 31) & ~uintptr_t(31));
      int4_linear_avx2_tiled_fp32(p, begin * kInt4TileRows, std::min(end * kInt4TileRows, n), aligned);
    });
  }
#endif
  if (path == Path::kPortable) {
    parallel_ranges((n + 15) / 16, [&](int64_t begin, int64_t end) {
      int4_linear_portable(p, begin * 16, std::min(end * 16, n));
    });
  }
  if (s.x_dtype != DType::kFloat32) y.view({m, n}).copy_(y32);
  return y;
}

TORCH_LIBRARY_IMPL(fastquant, CPU, m) { m.impl("int4_linear", &int4_linear_cpu); }

}  // namespace fastquant::cpu
