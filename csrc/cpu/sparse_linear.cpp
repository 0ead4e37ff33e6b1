// Torch glue for fastquant::sparse_linear on CPU: checks arguments and the packed weight's offsets, then
// splits output columns (weight rows) across torch's intra-op threads and runs the kernel for the active
// ISA (cpu_features.h; fastquant._C.set_cpu_isa lowers it for tests).
//
// Format ("bitmap16", python/fastquant/kernels/reference.py): per weight row, one 16-bit mask word per 16
// columns and the kept values packed in column order, rows one after the other, 64 elements of padding at the
// end. Kernels read each row's values with 16-wide (or 8-wide) unaligned loads at its running position and
// expand them into the mask's lanes, so the invariant that keeps them inside `values` is that each row's
// offset difference equals the popcount of its masks. A corrupt row_offsets would otherwise turn into
// out-of-bounds reads, so every call checks it: here that offsets start at 0, that row_offsets[N] + 64 <=
// values.numel() and (K not a multiple of 16) that no mask bit is set past in_features; in the kernels, just
// before a block of rows is read, that each row lies within [0, row_offsets[N]] with its popcount equal to
// its offset difference (first_bad_row in sparse_linear.h; or after reading, for rows that cannot leave
// values). That is one popcnt per 4 mask words (N * K / 64 in all) on words the kernel loads next anyway: no
// extra pass over memory, a fraction of a cycle per 16 weights. A failing row stops its thread and raises
// after the parallel region (the output is discarded), naming the first decreasing offset if there is one.
#include "cpu/sparse_linear.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/int8_linear_glue.h"
#include "cpu/non_finite.h"
#include "cpu/parallel.h"
#include "cpu/sparse_glue.h"
#include "dequantize.h"
#include "sparse_linear_contract.h"

namespace fastquant::cpu {
namespace {

constexpr const char* kPrefix = "fastquant.sparse_linear:";

enum class Path {
  kPortable,
  kAvx2,
  kAvx2Fixed,
  kAvx2DenseInt8,
  kAvx2DenseFloat,
  kAvx512,
  kAvx512Vbmi,
  kAvx512VnniFixed,
  kAvx512Bf16Tiles
};

// Rows of x from which int8 values on AVX2 take cpu_avx2_dense_int8: below, the expansion costs more than
// the bitmap16 kernel loses (dense int8 time / sparse time at 1536 x 576 and 4096 x 4096: M = 4 bitmap16
// 0.73 / 0.67, expanded 0.52 / 0.59; M = 8 bitmap16 0.66 / 0.66, expanded 0.72 / 0.85).
constexpr int64_t kAvx2DenseMinRows = 8;
// The same for float values (blocks of dense fp32 rows for torch's matmul). fp32 F.linear time / sparse time,
// 4096 x 4096 / 1536 x 576 at 50%: M = 16 bitmap16 tiles 1.5 / 1.0, blocks 1.1 / 0.9; M = 32 tiles 1.1 / 0.8,
// blocks 1.1 / 0.8; M = 64 tiles 0.7-0.9 / 0.7, blocks 1.0-1.2 / 0.8.
constexpr int64_t kAvx2DenseFloatMinRows = 32;
// Bytes of the expanded fp32 block: well inside the last-level cache of current x86 CPUs, so that the matmul
// reads it from there, and large enough (256 rows at K = 4096) that each matmul call is a full-size GEMM.
// 1, 2, 4 and 16 MiB were within noise of each other at 4096 x 4096, M = 32-512.
constexpr int64_t kDenseFloatBlockBytes = 4 << 20;

// group_size: -1 for per-channel scales (or float values).
Path choose_path(Isa isa, int64_t m, int64_t k, DType values, DType x, int64_t group_size) {
  const int64_t group = group_size == -1 ? k : group_size;
#if defined(__x86_64__) || defined(_M_X64)
  if (isa >= Isa::kAvx512 && values == DType::kInt8 && m > kBf16MinRows && bf16_chunk(k, group) > 0 &&
      bf16_activations_allowed(x)) {
    return Path::kAvx512Bf16Tiles;
  }
  if (isa == Isa::kAvx512Vbmi && values == DType::kInt8 && m == 1) {
    return group_size == -1 && k <= kFixedPointMaxK ? Path::kAvx512VnniFixed : Path::kAvx512Vbmi;
  }
  if (isa >= Isa::kAvx512) return Path::kAvx512;
  if (isa == Isa::kAvx2) {
    if (values == DType::kInt8 && m >= kAvx2DenseMinRows) return Path::kAvx2DenseInt8;
    if (values != DType::kInt8 && m >= kAvx2DenseFloatMinRows) return Path::kAvx2DenseFloat;
    // Groups of whole 64-column steps: the fixed-point kernel flushes its sums at each group's end.
    const bool fixed_groups = group_size == -1 || group_size % 64 == 0;
    return values == DType::kInt8 && m == 1 && fixed_groups ? Path::kAvx2Fixed : Path::kAvx2;
  }
#endif
  return Path::kPortable;
}

const char* path_name(Path path) {
  // In the order of Path's values.
  constexpr const char* kNames[] = {
      "cpu_portable",           "cpu_avx2_permute",      "cpu_avx2_fixed",
      "cpu_avx2_dense_int8",    "cpu_avx2_dense_float",  "cpu_avx512_expand",
      "cpu_avx512_vbmi_expand", "cpu_avx512_vnni_fixed", "cpu_avx512_bf16_tiles"};
  return kNames[static_cast<int>(path)];
}

// The checks of the header comment before the kernels run: O(1), and O(N) only for a K that ends inside a
// mask word. Worded as check_sparse_linear_contents in ops.py.
void check_offsets_ends(const at::Tensor& values, const uint16_t* masks, const int64_t* offsets, int64_t n,
                        int64_t k, int64_t n_chunks) {
  TORCH_CHECK(offsets[0] == 0, kPrefix, " row_offsets[0] must be 0, got ", offsets[0]);
  const int64_t rem = k % 16;
  if (rem != 0) {
    for (int64_t j = 0; j < n; ++j) {
      TORCH_CHECK((masks[j * n_chunks + n_chunks - 1] >> rem) == 0, kPrefix, " masks of row ", j,
                  " keep columns past in_features (", k, ")");
    }
  }
  const int64_t total = offsets[n];
  TORCH_CHECK(total + 64 <= values.numel(), kPrefix, " row_offsets[N] = ", total,
              " kept weights need values of at least ", total + 64, " elements (64 of padding), got ",
              values.numel());
}

// After a kernel refused row `bad`: the first decreasing offset if there is one (the more precise message),
// else the refused row's popcount.
[[noreturn]] void raise_refused(const uint16_t* masks, const int64_t* offsets, int64_t n, int64_t n_chunks,
                                int64_t bad) {
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK(offsets[j + 1] >= offsets[j], kPrefix, " row_offsets must not decrease: row ", j,
                " goes from ", offsets[j], " to ", offsets[j + 1]);
  }
  TORCH_CHECK(false, kPrefix, " row ", bad, " keeps ", row_mask_popcount(masks, n_chunks, bad),
              " weights in masks but row_offsets gives it ", offsets[bad + 1] - offsets[bad]);
}

}  // namespace

const char* sparse_linear_cpu_path(int64_t m, int64_t n, int64_t k, DType values, DType x,
                                   int64_t group_size) {
  return path_name(choose_path(active_isa(), m, k, values, x, group_size));
}

int64_t sparse_linear_cpu_prefill_rows(int64_t k, DType values, DType x, int64_t group_size) {
  const int64_t m = kBf16MinRows + 1;
  return choose_path(active_isa(), m, k, values, x, group_size) == Path::kAvx512Bf16Tiles ? m : 0;
}

namespace {

at::Tensor run_kernels(const SparseLinearCall& c) {
  const at::Tensor& x = c.x;
  const int64_t m = c.shape.m, n = c.shape.n, k = c.shape.k, n_groups = c.shape.n_groups;
  const DType dtype = c.shape.x_dtype, vtype = c.shape.values_dtype;
  const int64_t group_size = c.group_size;
  const int64_t n_chunks = group_count(k, 16);

  const at::Tensor vals = c.values.contiguous();
  const at::Tensor mk = c.positions.contiguous();
  const at::Tensor offs = c.row_offsets.contiguous();
  const auto* mask_words = reinterpret_cast<const uint16_t*>(mk.data_ptr<int16_t>());
  const int64_t* offsets = offs.data_ptr<int64_t>();
  check_offsets_ends(vals, mask_words, offsets, n, k, n_chunks);

  at::Tensor y = empty_output(x, n);
  if (output_without_kernel(y, k, c.bias)) return y;

  const SparseFp32Operands o = sparse_fp32_operands(c, y);
  const at::Tensor& b32 = o.bias32;
  const at::Tensor& y32 = o.y32;

  SparseLinearProblem p{};
  set_sparse_operands(p, c.shape, vals, offsets, o);
  p.values_size = vals.numel();
  p.masks = mask_words;
  p.n_chunks = n_chunks;
  p.group_chunks = vtype == DType::kInt8 && group_size != -1 ? group_size / 16 : 0;
  const Path path = choose_path(active_isa(), m, k, vtype, dtype, group_size);
  p.byte_expand = path == Path::kAvx512Vbmi || path == Path::kAvx512VnniFixed;

  int64_t bad = n;
#if defined(__x86_64__) || defined(_M_X64)
  if (path == Path::kAvx2DenseInt8) {
    const at::Tensor x32 = x.reshape({m, k}).to(at::kFloat).contiguous();
    Int8LinearProblem ip{nullptr,  nullptr, p.scales,
                         nullptr,  nullptr, m,
                         n,        k,       group_size == -1 ? k : std::min(group_size, k),
                         n_groups, dtype};
    ip.x_f32 = x32.data_ptr<float>();
    ip.bias_f32 = p.bias;
    ip.y_f32 = p.y;
    // 32 rows of K int8 (128 KiB at K = 4096) stay in L2 while the rows of x stream past them, as they do
    // past each 4-row strip of a dense weight.
    constexpr int64_t kBlockRows = 32;
    bad = parallel_rows_first_refused(n, kBlockRows, [&](int64_t begin, int64_t end) {
      std::vector<int8_t> block(kBlockRows * k);
      for (int64_t b0 = begin; b0 < end; b0 += kBlockRows) {
        const int64_t b1 = std::min(b0 + kBlockRows, end);
        const int64_t refused = sparse_expand_int8_avx2(p, block.data(), b0, b1);
        if (refused >= 0) return refused;
        prefetch_rows(p, b1, std::min(b1 + kBlockRows, end));
        Int8LinearProblem bp = ip;
        bp.w = block.data();
        bp.w_first_row = b0;
        int8_linear_avx2_fp32(bp, b0, b1, nullptr);
      }
      return int64_t{-1};
    });
  }
  if (path == Path::kAvx2DenseFloat) {
    // Blocks of weight rows are expanded into one buffer that stays in the last-level cache, and torch's
    // matmul multiplies each into its columns of y: DRAM then sees only the sparse format (2.1 bytes per
    // weight at 50%, against F.linear's 4). A dense copy of the whole weight instead (n x k x 4 bytes of
    // fresh memory per call, 67 MB at 4096 x 4096) cost 30-40 ms, so it paid off only from M = 256.
    const int64_t block_rows = std::min(n, std::max<int64_t>(8, kDenseFloatBlockBytes / (4 * k) / 8 * 8));
    at::Tensor block = at::empty({block_rows, k}, x.options().dtype(at::kFloat));
    const at::Tensor x32 = x.reshape({m, k}).to(at::kFloat);
    at::Tensor out = y32.view({m, n});
    for (int64_t b0 = 0; b0 < n; b0 += block_rows) {
      const int64_t rows = std::min(block_rows, n - b0);
      float* block_data = block.data_ptr<float>();
      const int64_t refused = parallel_rows_first_refused(rows, 8, [&](int64_t begin, int64_t end) {
        const int64_t row = sparse_expand_float_avx2(p, block_data + begin * k, b0 + begin, b0 + end);
        return row < 0 ? row : row - b0;
      });
      if (refused < rows) {
        bad = b0 + refused;
        break;
      }
      // Written into y32 and rounded to x's dtype at the end, like every other path.
      at::Tensor columns = out.narrow(1, b0, rows);
      const at::Tensor weight = block.narrow(0, 0, rows).t();
      if (b32.defined()) {
        at::addmm_out(columns, b32.narrow(0, b0, rows), x32, weight);
      } else {
        at::mm_out(columns, x32, weight);
      }
    }
  }
  if (path == Path::kAvx512Bf16Tiles) {
    // Every row's popcount against its offsets first (the tiles expand rows in K chunks, so no row can be
    // checked just before it is read): ~0.1 ms for 4096 x 4096, ~1% of a prefill call.
    bad = parallel_rows_first_refused(
        n, 64, [&](int64_t begin, int64_t end) { return sparse_first_bad_row_avx512(p, begin, end); });
    if (bad == n) {
      const at::Tensor x2 = x.reshape({m, k}).contiguous();
      const Bitmap16Int8 bitmap{static_cast<const int8_t*>(p.values), mask_words, offsets, n_chunks};
      Int8LinearProblem ip{x2.data_ptr(),
                           nullptr,
                           p.scales,
                           nullptr,
                           y32.data_ptr(),
                           m,
                           n,
                           k,
                           group_size == -1 ? k : std::min(group_size, k),
                           n_groups,
                           dtype};
      ip.bias_f32 = p.bias;
      ip.y_f32 = p.y;
      ip.bitmap = &bitmap;
      int8_linear_run_bf16(ip, x2);
    }
  }
#endif
  if (path != Path::kAvx512Bf16Tiles && path != Path::kAvx2DenseInt8 && path != Path::kAvx2DenseFloat) {
    // Activations in fp32 (exact for bf16/fp16), zero-padded to whole 16-column chunks so that the last
    // chunk's vector load reads zeros past K (its mask bits there are zero, checked above).
    const int64_t ldx = n_chunks * 16;
    at::Tensor x32;
    if (dtype == DType::kFloat32 && ldx == k) {
      x32 = x.reshape({m, k}).contiguous();
    } else {
      x32 = at::zeros({m, ldx}, x.options().dtype(at::kFloat));
      x32.narrow(1, 0, k).copy_(x.reshape({m, k}));
    }
    p.x = x32.data_ptr<float>();
    p.ldx = ldx;
#if defined(__x86_64__) || defined(_M_X64)
    at::Tensor planes;
    if (path == Path::kAvx512Vbmi || path == Path::kAvx512VnniFixed) {
      const XRange range = x_range_avx512(p.x, k);
      if (!range.finite || range.max_abs > kByteExpandMaxX) {
        p.byte_expand = false;  // the fp32 kernel, which propagates NaN and infinities as the reference does
      } else if (path == Path::kAvx512VnniFixed && fixed_point_takes(range)) {
        const int64_t stride = (ldx + 63) / 64 * 64;
        planes = at::empty({4 * stride}, x.options().dtype(at::kByte));
        // One group spanning every column: the per-channel kernel takes one top-byte sum.
        fixed_point_x_avx512(p.x, k, range.max_abs, stride, stride, planes.data_ptr<uint8_t>(),
                             &p.x_fixed_top_sum, &p.x_fixed_step);
        p.x_fixed = planes.data_ptr<uint8_t>();
        p.x_fixed_stride = stride;
      }
    }
    if (path == Path::kAvx2Fixed) {  // other x: the fp32 kernel (cpu_avx2_permute)
      const XRange range = x_range_avx2(p.x, k);
      if (fixed_point_takes(range)) {
        planes = at::empty({2 * ldx}, x.options().dtype(at::kShort));
        fixed_point_x_avx2(p.x, ldx, range.max_abs, planes.data_ptr<int16_t>(), &p.x_fixed_step);
        p.x_fixed = reinterpret_cast<const uint8_t*>(planes.data_ptr<int16_t>());
        p.x_fixed_stride = ldx;
      }
    }
#endif

    SparseLinearKernel kernel = sparse_linear_portable;
#if defined(__x86_64__) || defined(_M_X64)
    if (path == Path::kAvx512 || path == Path::kAvx512Vbmi || path == Path::kAvx512VnniFixed) {
      kernel = sparse_linear_avx512;
    }
    if (path == Path::kAvx2 || path == Path::kAvx2Fixed) kernel = sparse_linear_avx2;
#endif
    // Weight rows are the unit of work: each thread streams a disjoint, contiguous slice of values and
    // masks exactly once (per block of x rows). Blocks of 8 rows keep the kernels' row tiles whole.
    constexpr int64_t grain = 8;
    bad = parallel_rows_first_refused(n, grain,
                                      [&](int64_t begin, int64_t end) { return kernel(p, begin, end); });
  }
  if (bad != n) raise_refused(mask_words, offsets, n, n_chunks, bad);
  if (dtype != DType::kFloat32) y.view({m, n}).copy_(y32);
  return y;
}

// c.positions: the mask words.
at::Tensor sparse_linear_cpu(const SparseLinearCall& c) {
  at::Tensor y = run_kernels(c);
  if (!finite_call(c.x, y)) {
    reference_linear_into(
        y, c.x,
        dequantize_bitmap16(c.values, c.positions, c.row_offsets, c.scales, c.in_features, c.group_size),
        c.bias);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastquant, CPU, m) { impl_sparse_linear<Backend::kCpu, sparse_linear_cpu>(m); }

}  // namespace fastquant::cpu
