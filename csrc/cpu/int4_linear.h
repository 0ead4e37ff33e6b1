#pragma once
// Raw-pointer interface between the torch glue (int4_linear.cpp) and the per-ISA int4 kernels. The ISA
// files are compiled with their own -m flags and include no torch headers (see CMakeLists.txt).
//
// The weight (reference.py, int4 section): row n is ceil(K/64) blocks of 32 bytes; byte j of block b holds
// code(64b + j) in its low nibble and code(64b + 32 + j) in its high nibble. fp16 scales (and offsets) per
// group of group_size columns (a multiple of 32, so each 32-column half block lies in one group).
// w = s * (q - 8) (symmetric) or s * q + o (asymmetric).
//
// Kernel paths (int4_linear_cpu_path):
//   cpu_portable        scalar, any CPU: dequantizes each weight exactly as the reference (fp32 multiply,
//                       then add) and sums the products in fp32. The correctness baseline.
//   cpu_avx2_fixed16    decode (M <= kFixedMaxRows = 8, finite x). x is rounded once per call to 16-bit fixed
//                       point per block of 32 columns: X = round(x / step), step = max|x of the block| /
//                       32512, written as two signed byte planes (X = 256 hi + lo). Per 32 columns and row,
//                       the 4-bit codes are the unsigned operand of 2 vpmaddubsw (one per plane) and 2
//                       vpmaddwd sum them exactly in int32 lanes; one conversion and one FMA by s * step per
//                       32 columns. The zero point (-8, or the offset) multiplies the block's sum of rounded
//                       x once per group. Numerical rule: exactly y = x~ @ W^T up to fp32 rounding of the
//                       per-block partial sums, x~ the rounded x (|x~ - x| <= step / 2 = 2^-16 max|x of its
//                       block|). Against the 8 conversions and 8 FMAs per 64 weights of an fp32 kernel this
//                       keeps M = 1 memory-bound at int4's half of int8's bytes.
//   cpu_avx2_int8x      decode with int8_activations (M <= kFixedMaxRows, finite x; AVX2 and AVX-512): x
//                       rounded to int8 per block of 32 columns as int8_activations.h's rule (X = round(x *
//                       127 / m), step = m / 127), one signed plane; per 32 columns and row one vpmaddubsw
//                       and one vpmaddwd (cpu_avx2_fixed16's loop with half its multiplies), one conversion
//                       and one FMA. Numerical rule: y = x~ @ W^T up to fp32 rounding of the per-block
//                       partial sums, x~ the rounded x of the reference (int8_activation_round). Other paths
//                       with int8_activations run on x~ computed by the glue (exact in their fixed point).
//   cpu_avx512_vnni_fixed16  decode on AVX-512 VNNI (2 <= M <= 16, finite x; M = 1 runs cpu_avx2_fixed16).
//                       x exactly as cpu_avx2_fixed16 (same rounding, same numerical rule), its planes'
//                       dwords reordered so that one 64-column block's 32 weight bytes widen to 64 codes in
//                       one zmm (first 32 columns in the even int32 lanes, last 32 in the odd ones). Per 64
//                       columns, row of x and output column: 2 vpdpbusd (codes unsigned, a plane signed), one
//                       shift, one conversion, one FMA by a (scale x step) pair. 4 output columns share each
//                       load of x's planes and 4 rows of x each load of the weight, so M up to 16 reads the
//                       weight from memory once.
//   cpu_avx512_bf16     prefill on AVX-512 (M > 16, finite x, groups of 32, 64, 128 or a multiple of 256) for
//                       activations int8_linear also rounds to bf16 (bf16_activations_allowed: fp32 x only
//                       under torch's "medium" float32 matmul precision): the codes minus 8 go to
//                       int8_linear's bf16 kernel as an int8 weight (exact in bf16; n x k bytes written per
//                       call, a few percent of a prefill call) with the fp32 scales, so x is rounded to bf16
//                       once per call (relative error 2^-9 per product, as int8_linear's cpu_avx512_bf16) and
//                       each group's sum is scaled in fp32; the offsets (asymmetric, as o + 8 s) multiply
//                       each group's fp32 sum of x in one fp32 matmul.
//   cpu_avx2_tiled_fp32 prefill (larger M) and x with NaN/inf: tiles of 16 weight rows x 256 columns are
//                       dequantized once into fp32 (same formula as the reference), transposed in L1, and a
//                       6 x 16 register-blocked FMA micro-kernel runs every row of x over each tile. No
//                       rounding of activations: reference up to fp32 summation order.
#include <cstdint>

#include "dtypes.h"

namespace fastquant::cpu {

struct Int4LinearProblem {
  const uint8_t* w;         // n x row_bytes packed codes
  const uint16_t* scales;   // n x n_groups fp16 bit patterns
  const uint16_t* offsets;  // n x n_groups fp16 bit patterns, or nullptr (symmetric)
  const float* x;           // m x k fp32 activations, row-major, contiguous
  const float* bias;        // n fp32 values, or nullptr
  float* y;                 // m x n fp32 output
  int64_t m, n, k;
  int64_t row_bytes;   // ceil(k / 64) * 32
  int64_t group_size;  // multiple of 32
  int64_t n_groups;    // ceil(k / group_size)

  // cpu_avx2_fixed16: per row of x, two int8 planes of kp = ceil(k / 64) * 64 bytes (lo then hi; zero past
  // k), the step of each 32-column block (kp / 32 floats), and per group the sum of the rounded x (x~) over
  // the group (n_groups floats), the zero point's multiplier.
  const int8_t* x_planes = nullptr;
  const float* x_steps = nullptr;
  const float* x_group_sums = nullptr;
  int64_t kp = 0;
};

// Computes output columns [n_begin, n_end) for every row of x. Called concurrently on disjoint ranges.
void int4_linear_portable(const Int4LinearProblem& p, int64_t n_begin, int64_t n_end);
#if defined(__x86_64__) || defined(_M_X64)
void int4_linear_avx2_fixed16(const Int4LinearProblem& p, int64_t n_begin, int64_t n_end);
// cpu_avx2_int8x with x from int8x_x_avx2 (p.x_planes: one plane of kp bytes per row of x, at the
// stride of two).
void int4_linear_avx2_int8x(const Int4LinearProblem& p, int64_t n_begin, int64_t n_end);
// n_begin a multiple of kInt4TileRows. scratch: int4_tiled_scratch_floats() floats, 32-byte aligned.
void int4_linear_avx2_tiled_fp32(const Int4LinearProblem& p, int64_t n_begin, int64_t n_end, float* scratch);
// One row of x (k floats) in cpu_avx2_fixed16's form: planes (2 x kp bytes, lo then hi), steps (kp / 32) and
// group_sums (ceil(k / group_size)). Returns false, writing nothing useful, when x has NaN, an infinity or a
// nonzero block below 2^-100 in magnitude: the fp32 kernel runs instead (and propagates NaN/inf as the
// reference does).
bool int4_fixed16_x_avx2(const float* x, int64_t k, int64_t kp, int64_t group_size, int8_t* planes,
                         float* steps, float* group_sums);
// cpu_avx512_vnni_fixed16 with x from int4_fixed16_x_avx2 (p.x_planes reordered by
// int4_fixed16_interleave_avx512). scratch: int4_avx512_scratch_floats(p.kp) floats.
void int4_linear_avx512_fixed16(const Int4LinearProblem& p, int64_t n_begin, int64_t n_end, float* scratch);
// Codes minus 8 (-8..7, exact as bf16) of weight rows [n_begin, n_end) as int8 rows of k bytes (out: n x k),
// the weight cpu_avx512_bf16 hands to int8_linear's bf16 kernel.
void int4_codes_to_int8_avx512(const Int4LinearProblem& p, int64_t n_begin, int64_t n_end, int8_t* out);
// Reorders planes (bytes, a multiple of 64) in place: per 64 bytes, dword i of the first 32 to dword 2i and
// dword i of the last 32 to dword 2i + 1 (the lane order of cpu_avx512_vnni_fixed16's codes).
void int4_fixed16_interleave_avx512(int8_t* planes, int64_t bytes);
#endif
// Output columns per pass of cpu_avx512_vnni_fixed16 (and rows of x per tile).
constexpr int64_t kInt4Avx512Rows = 4;
// Per-thread scratch of cpu_avx512_vnni_fixed16: each block's group (kp / 32 + 16 ints) and the scale x step
// factors of a 4 x kInt4Avx512Rows tile.
constexpr int64_t int4_avx512_scratch_floats(int64_t kp) {
  return (4 * kInt4Avx512Rows + 1) * (kp / 32) + 16;
}
// Rows of x cpu_avx512_vnni_fixed16 takes (measured, benchmarks/NOTES.md): from 2, where sharing each weight
// load across rows of x pays; at M = 1 the widening of the codes to 64 int32 lanes is not shared, and on a
// CPU that runs a 512-bit operation at half the rate of a 256-bit one (this project's Zen 5 VM)
// cpu_avx2_fixed16 was 1.15x faster. Up to 16 rows it beat the tiled kernel down to K = 576 (there within 6%
// at M = 16, in cache); above 16, the prefill kernels.
constexpr int64_t kAvx512FixedMinRows = 2;
constexpr int64_t kAvx512FixedMaxRows = 16;
constexpr int64_t kInt4TileRows = 16;
constexpr int64_t kInt4TileCols = 256;  // a multiple of 64
constexpr int64_t int4_tiled_scratch_floats() { return 2 * kInt4TileRows * kInt4TileCols; }
// Largest M cpu_avx2_fixed16 takes; above it the tiled kernel (whose dequantization is shared by all rows).
constexpr int64_t kFixedMaxRows = 8;
// 16-bit fixed point per 32-column block: |X| <= 32512 = 127 * 256 keeps hi = (X - lo) / 256 within int8.
constexpr float kFixed16Max = 32512.f;

// Scalar fp16 -> fp32 (bit pattern in, any CPU).
float half_to_float(uint16_t h);

// Name of the kernel the CPU op will run for this problem (finite x).
const char* int4_linear_cpu_path(int64_t m, int64_t n, int64_t k, int64_t group_size, DType dtype,
                                 bool int8_activations);

}  // namespace fastquant::cpu
