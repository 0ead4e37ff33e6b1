#pragma once
// Raw-pointer interface between the torch glue (int8_linear.cpp) and the per-ISA kernels. The ISA
// files are compiled with their own -m flags and must include no torch headers (see CMakeLists.txt).
//
// Kernel paths (chosen in the glue by int8_linear_cpu_path / the active ISA):
//   cpu_portable     scalar, any CPU; reads x, bias and writes y in the activation dtype.
//   cpu_avx2_fp32    x converted to fp32 once by the glue (exact for bf16/fp16), int8 -> fp32 weights,
//                    fp32 FMA with K in the vector lanes; fp32 output, the glue rounds it to x's dtype.
//   cpu_avx512_fp32  same with 16 lanes: the decode path (small M). No rounding of activations.
//   cpu_avx512_vnni_fixed  M = 1 with per-channel scales or groups of a multiple of 64 columns: x in 32-bit
//                    fixed point (fixed_point_x.h), 4 byte planes; per 64 columns and row one load of 64
//                    weight bytes, one XOR and 4 vpdpbusd, summed exactly in int32 lanes; each group's sum
//                    combines in int64 and is scaled in double. Against cpu_avx512_fp32's 12 conversions and
//                    FMAs per 64 columns, this keeps the decode kernel memory-bound when the weight comes
//                    from the last-level cache. x that is not finite, or has an outlier (see
//                    fixed_point_takes), takes cpu_avx512_fp32.
//   cpu_avx2_int8x   int8_activations, M <= kInt8XMaxRows, per-channel scales or groups of a multiple of 32
//                    columns (any CPU with AVX2, AVX-512 ones too): x rounded to int8 per 32-column block by
//                    the glue (int8_activations_x.h: one int8 plane, one step per block), then per 32 weights
//                    and row one vpmaddubsw of |q| by X with q's sign (llama.cpp's Q8_0 form: a pair sums to
//                    at most 2 * 128 * 127, no saturation), one vpmaddwd to int32, one conversion and one FMA
//                    by the block's step: 7 instructions per 32 weights against cpu_avx2_fp32's 12. Group
//                    scales multiply each group's sum, per-channel ones the finished dot product.
//   cpu_avx512_bf16  prefill path (larger M) where x may be rounded to bf16 (bf16/fp16 x; fp32 x only under
//                    torch's "medium" float32 matmul precision, int8_linear_glue.h; else cpu_avx512_fp32):
//                    activations rounded to bf16 ONCE per call by the glue
//                    (relative error 2^-9 per product; exact when x already is bf16), weights int8 -> bf16
//                    (exact) into per-thread L1/L2 tiles, _mm512_dpbf16_ps with fp32 accumulation, fp32
//                    scale applied per group (or per channel) in fp32, fp32 output.
#include <cstdint>

#include "dtypes.h"

namespace fastquant::cpu {

// A bitmap16 sparse weight with int8 values (sparse_linear's format, sparse_linear.h) for the bf16 path:
// its tiles are expanded from the masks instead of converted from a dense row, everything else is shared.
struct Bitmap16Int8 {
  const int8_t* values;        // kept codes, row after row, then 64 of padding
  const uint16_t* masks;       // n x n_chunks mask words
  const int64_t* row_offsets;  // n + 1, each row's popcount equal to its offset difference (checked)
  int64_t n_chunks;
};

struct Int8LinearProblem {
  const void* x;        // m x k activations, row-major, contiguous, activation dtype (portable path)
  const int8_t* w;      // n x k int8 weight, row-major, contiguous
  const float* scales;  // n x n_groups fp32 scales
  const void* bias;     // n values of the activation dtype, or nullptr (portable path)
  void* y;              // m x n output, activation dtype (portable path)
  int64_t m, n, k;
  int64_t group_size;  // k for per-channel scales
  int64_t n_groups;    // ceil(k / group_size)
  DType dtype;

  // Vector paths: fp32 bias (or nullptr) and an fp32 m x n output, rounded to the dtype by the glue.
  const float* bias_f32 = nullptr;
  float* y_f32 = nullptr;
  // fp32 paths: m x k fp32 activations.
  const float* x_f32 = nullptr;
  // bf16 path: activations as bf16 pairs (k, k+1) packed in 32 bits, transposed: xt[p * xt_stride + i]
  // holds x[i, 2p], x[i, 2p+1]; p < ceil(k / 2), i < mp = m rounded up to 16, zero padding. xt_stride is
  // mp + 16: with a stride of mp (2 KiB at m = 512) the rows a micro tile walks all fall in a few L1 sets
  // and evict each other, so x came from L2 at every step.
  const uint32_t* xt = nullptr;
  int64_t mp = 0;
  int64_t xt_stride = 0;
  int64_t kc = 0;  // bf16 path: K chunk converted per weight tile (multiple of group_size, or of it)
  const Bitmap16Int8* bitmap = nullptr;  // bf16 path: the weight in bitmap16 instead of w
  // w holds the weight's rows from this one on: a block of rows expanded for the call
  // (sparse_linear's cpu_avx2_dense_int8); only rows [w_first_row, ...) may then be computed.
  int64_t w_first_row = 0;
  // cpu_avx512_vnni_fixed: the 4 byte planes of x in fixed point (x_fixed_stride bytes each, a multiple of
  // 64, zero past k), the sum of byte 3 per group (one sum for per-channel scales), and the step of X.
  const uint8_t* x_fixed = nullptr;
  int64_t x_fixed_stride = 0;
  const int64_t* x_fixed_top_sums = nullptr;
  double x_fixed_step = 0;
  // cpu_avx2_int8x: per row of x one int8 plane of x_int8_stride bytes (a multiple of 32, zero past k) and
  // x_int8_stride / 32 block steps (x~ = X * step).
  const int8_t* x_int8 = nullptr;
  const float* x_int8_steps = nullptr;
  int64_t x_int8_stride = 0;
};

// Computes output columns [n_begin, n_end) for every row. Called concurrently on disjoint ranges.
// scratch: per-call, per-thread memory of int8_linear_scratch_bytes(p) bytes (64-byte aligned).
using Int8LinearKernel = void (*)(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end, void* scratch);

void int8_linear_portable(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end, void* scratch);
#if defined(__x86_64__) || defined(_M_X64)
void int8_linear_avx2_fp32(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end, void* scratch);
void int8_linear_avx2_int8x(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end, void* scratch);
void int8_linear_avx512_fp32(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end, void* scratch);
void int8_linear_avx512_vnni_fixed(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end, void* scratch);
void int8_linear_avx512_bf16(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end, void* scratch);
// fp32 x (m x k, contiguous) rounded to bf16 (to nearest even, as torch converts) in the bf16 path's layout:
// p.xt's rows 0..ceil(k / 2) - 1, columns 0..mp - 1 (rows of x past m and the pair past an odd k zero).
void int8_linear_avx512_bf16_x(const float* x, int64_t m, int64_t k, int64_t mp, int64_t xt_stride,
                               uint32_t* xt);
// Columns converted per weight tile by the bf16 kernel; thread ranges are multiples of 16 columns.
constexpr int64_t kBf16TileCols = 64;
#endif

// Largest M cpu_avx2_int8x takes: each row of x reads the weight tile again (from L1 after the first);
// above it the fp32 and bf16 kernels, which share each converted weight across rows, run on x~.
constexpr int64_t kInt8XMaxRows = 8;

// Name of the kernel the CPU op will run for this problem (reported by fastquant.report / info; finite x).
const char* int8_linear_cpu_path(int64_t m, int64_t n, int64_t k, int64_t group_size, DType dtype,
                                 bool int8_activations);

}  // namespace fastquant::cpu
