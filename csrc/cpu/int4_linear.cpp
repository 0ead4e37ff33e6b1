// Torch glue for fastquant::int4_linear on CPU: checks the arguments (int4_linear_contract.h), chooses the
// kernel for the active ISA and M, and splits output columns across torch's intra-op threads
// (parallel_ranges), so each thread streams a disjoint slice of the weight exactly once.
#include "cpu/int4_linear.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <memory>

#include "cpu/cpu_features.h"
#include "cpu/parallel.h"
#include "int4_linear_contract.h"

namespace fastquant::cpu {
namespace {

enum class Path { kPortable, kAvx2Fixed16, kAvx512VnniFixed16, kAvx2TiledFp32 };

// The kernel for a problem with finite x (x with NaN or inf takes cpu_avx2_tiled_fp32 on AVX2 and AVX-512).
Path choose_path(Isa isa, int64_t m) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa >= Isa::kAvx512) return m <= kAvx512FixedMaxRows ? Path::kAvx512VnniFixed16 : Path::kAvx2TiledFp32;
  if (isa >= Isa::kAvx2) return m <= kFixedMaxRows ? Path::kAvx2Fixed16 : Path::kAvx2TiledFp32;
#endif
  return Path::kPortable;
}

const char* path_name(Path path) {
  switch (path) {
    case Path::kAvx2Fixed16:
      return "cpu_avx2_fixed16";
    case Path::kAvx512VnniFixed16:
      return "cpu_avx512_vnni_fixed16";
    case Path::kAvx2TiledFp32:
      return "cpu_avx2_tiled_fp32";
    case Path::kPortable:
      break;
  }
  return "cpu_portable";
}

}  // namespace

const char* int4_linear_cpu_path(int64_t m, int64_t n, int64_t k, int64_t group_size) {
  return path_name(choose_path(active_isa(), m));
}

at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& bias,
                           int64_t in_features, int64_t group_size) {
  const Int4LinearShape s =
      check_int4_linear(Backend::kCpu, x, qweight, scales, offsets, bias, in_features, group_size);
  at::Tensor y = empty_output(x, s.n);
  if (output_without_kernel(y, s.k, bias)) return y;

  const int64_t m = s.m, n = s.n, k = s.k;
  // Kernels compute in fp32 (x converted exactly from bf16/fp16) into an fp32 output, rounded once at the
  // end.
  const at::Tensor x32 = x.reshape({m, k}).to(at::kFloat).contiguous();
  const at::Tensor w = qweight.contiguous();
  const at::Tensor sc = scales.contiguous();
  const at::Tensor off = s.has_offsets ? offsets->contiguous() : at::Tensor();
  const at::Tensor b32 = s.has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y32 =
      s.x_dtype == DType::kFloat32 ? y.view({m, n}) : at::empty({m, n}, x.options().dtype(at::kFloat));
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
  Path path = choose_path(active_isa(), m);
#if defined(__x86_64__) || defined(_M_X64)
  at::Tensor planes, steps, group_sums;
  if (path == Path::kAvx2Fixed16 || path == Path::kAvx512VnniFixed16) {
    p.kp = s.row_bytes * 2;
    planes = at::empty({m, 2 * p.kp}, x.options().dtype(at::kChar));
    steps = at::empty({m, p.kp / 32}, x.options().dtype(at::kFloat));
    group_sums = at::empty({m, s.n_groups}, x.options().dtype(at::kFloat));
    for (int64_t i = 0; i < m && path != Path::kAvx2TiledFp32; ++i) {
      if (!int4_fixed16_x_avx2(p.x + i * k, k, p.kp, s.group_size, planes.data_ptr<int8_t>() + i * 2 * p.kp,
                               steps.data_ptr<float>() + i * (p.kp / 32),
                               group_sums.data_ptr<float>() + i * s.n_groups)) {
        path = Path::kAvx2TiledFp32;  // NaN/inf (or a vanishing block) in x: no rounding, IEEE propagation
      }
    }
    if (path == Path::kAvx512VnniFixed16)
      int4_fixed16_interleave_avx512(planes.data_ptr<int8_t>(), m * 2 * p.kp);
    p.x_planes = planes.data_ptr<int8_t>();
    p.x_steps = steps.data_ptr<float>();
    p.x_group_sums = group_sums.data_ptr<float>();
  }
  if (path == Path::kAvx512VnniFixed16) {
    // Blocks of 8 output columns (two passes of kInt4Avx512Rows): small N still splits across threads.
    constexpr int64_t grain = 8;
    const int64_t scratch_floats = int4_avx512_scratch_floats(p.kp);
    parallel_ranges((n + grain - 1) / grain, [&](int64_t begin, int64_t end) {
      std::unique_ptr<float[]> scratch(new float[scratch_floats]);
      int4_linear_avx512_fixed16(p, begin * grain, std::min(end * grain, n), scratch.get());
    });
  } else if (path == Path::kAvx2Fixed16) {
    // Blocks of 8 output columns: small N still splits across threads.
    constexpr int64_t grain = 8;
    parallel_ranges((n + grain - 1) / grain, [&](int64_t begin, int64_t end) {
      int4_linear_avx2_fixed16(p, begin * grain, std::min(end * grain, n));
    });
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
