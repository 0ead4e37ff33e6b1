#pragma once
// Raw-pointer interface between the torch glue (sparse_linear.cpp) and the per-ISA kernels of
// sparse_linear, the product of activations with a "bitmap16" sparse weight (notes in sparse_linear.cpp).
// The ISA files are compiled with their own -m flags and include no torch headers.
//
// Kernel paths (sparse_linear_cpu_path):
//   cpu_portable        scalar, any CPU: walks the set bits of every mask word.
//   cpu_avx2_permute    8 lanes: each 16-column chunk is two 8-bit halves; a 256-entry table turns a mask
//                       byte into a vpermps index that moves the next popcount(byte) packed values into
//                       their columns (sign bits select the kept lanes, blendv zeroes the others).
//   cpu_avx512_expand   16 lanes: the 16-bit mask is a k-register and vexpandps/vpexpandd does the same.
//   cpu_avx512_vbmi_expand  int8 values at M = 1 with VBMI/VBMI2: one vpexpandb places the kept bytes of 64
//                       columns, vpermb widens each 16 of them to 32-bit lanes.
//   cpu_avx512_vnni_fixed  per-channel int8 values at M = 1: x in 32-bit fixed point, split into 4 byte
//                       planes once per call; per 64 columns one vpexpandb places the kept int8 values and
//                       4 vpdpbusd multiply them with the 4 planes, summing in int32 exactly. The only
//                       rounding is x's, to 2^-32 of max|x|, below fp32's for the x it takes (finite, max|x|
//                       <= 2^10 x the others' mean); other x takes cpu_avx512_vbmi_expand's kernel.
//   cpu_avx2_fixed      the same for AVX2 (and groups of a multiple of 64 columns, each group's exact sum
//                       scaled in double): x in two int16 planes (X = 65536 hi + lo); per 16 columns one
//                       vpshufb moves the kept int8 values into the high bytes of 16-bit lanes (a 16-byte
//                       control per mask byte), vpsraw makes them int16, and 2 vpmaddwd multiply them with
//                       the planes, summing in int32 (flushed to int64 every 2048 columns); other x takes
//                       cpu_avx2_permute's kernel.
//   cpu_avx2_dense_int8 int8 values at M >= 8 on AVX2: each thread expands blocks of 32 weight rows into a
//                       dense int8 buffer that stays in L2, and int8_linear's AVX2 kernel multiplies each
//                       block with all rows of x: the bitmap16 kernels expand each chunk once per 4 rows of
//                       x and took 1.4-1.6x dense int8's time there.
//   cpu_avx2_dense_float float values at M >= 32 on AVX2: blocks of weight rows (4 MiB of fp32) are expanded
//                       into a buffer that stays in the last-level cache and multiplied by torch's dense fp32
//                       matmul, where the bitmap16 fp32 tiles took 1.1-2.5x F.linear's time.
//   cpu_avx512_bf16_tiles  int8 values at M > 16 (prefill) where x may be rounded to bf16 (fp32 x only
//                       under torch's "medium" float32 matmul precision, int8_linear_glue.h): int8_linear's
//                       bf16 path, its weight tiles expanded from the masks (int8 -> bf16 is exact); x is
//                       rounded to bf16 once per call as that path does, products and sums in fp32.
// All other paths multiply and accumulate in fp32: values (bf16, fp16, int8 codes) and activations convert to
// fp32 exactly, grouped int8 scales multiply the expanded weight (q * s in fp32, as the reference
// dequantizes), per-channel scales multiply the finished dot product.
#include <cstdint>
#include <cstring>

#include "cpu/fixed_point_x.h"
#include "cpu/int8_linear.h"
#include "dtypes.h"

namespace fastquant::cpu {

struct SparseLinearProblem {
  const float* x;              // m x ldx fp32 activations; columns k..ldx are zero (ldx = 16 * n_chunks)
  const void* values;          // kept weights in row-major order, then 64 elements of padding
  int64_t values_size;         // elements of values (>= row_offsets[n] + 64)
  const uint16_t* masks;       // n x n_chunks mask words (bit j of word c: column 16 c + j is kept)
  const int64_t* row_offsets;  // n + 1: row j's values are values[row_offsets[j], row_offsets[j + 1])
  const float* scales;         // int8 values: n x n_groups fp32; nullptr for float values
  const float* bias;           // n fp32, or nullptr
  float* y;                    // m x n fp32 output
  int64_t m, n, k, n_chunks, ldx;
  int64_t group_chunks;  // int8 with group-wise scales: chunks per group (group_size / 16); else 0
  int64_t n_groups;      // columns of scales (1 for per-channel)
  DType vtype;
  bool byte_expand;  // int8 values, M = 1: the VBMI/VBMI2 byte-expand kernel (CPU support checked by caller)
  // Per-channel int8 values at M = 1: x in 32-bit fixed point, X = round(x / x_fixed_step); nullptr when x
  // does not qualify (see SparseXRange) and an fp32 kernel runs instead. cpu_avx512_vnni_fixed (with
  // byte_expand): the 4 bytes of X in 4 planes of x_fixed_stride bytes (byte 3 is signed), stride a
  // multiple of 64. cpu_avx2_fixed: two int16 planes (hi, lo) of x_fixed_stride = ldx elements.
  // Planes are zero past k.
  const uint8_t* x_fixed;
  int64_t x_fixed_stride;
  int64_t x_fixed_top_sum;  // the sum over all columns of byte 3 of X
  double x_fixed_step;
};

// Computes output columns [n_begin, n_end) for every row of x. Called concurrently on disjoint ranges.
// Before reading a weight row's values a kernel checks it with first_bad_row (the masks are then in L1 for
// the product), or, for a row whose offset lies in [0, values_size - 16 n_chunks - 64] (it cannot read past
// values whatever its masks), that its values ended at the next row's offset after reading them; it
// returns the first row that fails (the output is then discarded), or -1. With that, and the glue's checks
// that row_offsets[0] = 0 and row_offsets[n] + 64 <= values.numel(), a kernel may load 64 elements from any
// position of a row without leaving values. No O(N) pass over the offsets precedes the kernels: in a
// model, where a layer's offsets are cold, such a serial pass took 3-8 us of a 12-30 us decode call.
using SparseLinearKernel = int64_t (*)(const SparseLinearProblem& p, int64_t n_begin, int64_t n_end);

int64_t sparse_linear_portable(const SparseLinearProblem& p, int64_t n_begin, int64_t n_end);
#if defined(__x86_64__) || defined(_M_X64)
int64_t sparse_linear_avx2(const SparseLinearProblem& p, int64_t n_begin, int64_t n_end);
int64_t sparse_linear_avx512(const SparseLinearProblem& p, int64_t n_begin, int64_t n_end);
#endif

// group_size: -1 for per-channel scales (or float values).
// Kept weights in row j's masks. static: each file (ISA kernels, glue) compiles its own copy with its own
// flags, so no AVX-512 build of it can be linked into code that runs elsewhere.
static inline int64_t row_mask_popcount(const uint16_t* masks, int64_t n_chunks, int64_t j) {
  const uint16_t* row = masks + j * n_chunks;
  int64_t count = 0, c = 0;
  for (; c + 4 <= n_chunks; c += 4) {  // 4 mask words per popcount
    uint64_t words;
    std::memcpy(&words, row + c, sizeof(words));
    count += __builtin_popcountll(words);
  }
  for (; c < n_chunks; ++c) count += __builtin_popcount(row[c]);
  return count;
}

// First row in [j0, j1) that does not lie within [0, row_offsets[n]] with an offset difference equal to the
// popcount of its mask words, or -1. Rows that pass read only inside values (the glue checked that
// row_offsets[n] + 64 <= values_size) whether or not the offsets of other rows are sound.
static inline int64_t first_bad_row(const SparseLinearProblem& p, int64_t j0, int64_t j1) {
  const int64_t total = p.row_offsets[p.n];
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t begin = p.row_offsets[j], end = p.row_offsets[j + 1];
    if (begin < 0 || end > total || row_mask_popcount(p.masks, p.n_chunks, j) != end - begin) return j;
  }
  return -1;
}

// M = 1 row passes of int8 values (rows_bytes, rows_fixed): a row whose offset lies in [0, values_size -
// 16 n_chunks - 64] cannot read past values whatever its masks (its pointer advances by at most 16 per chunk,
// loads reach 64 past it), so such rows are checked after they are read (their pointer must end at the next
// row's offset: one compare) instead of before (a popcount pass over their masks, 20% of the time at
// K = 576). Rows [j, j + rows) all qualify.
static inline bool rows_read_inside(const SparseLinearProblem& p, int64_t j, int rows) {
  const int64_t row_reach = 16 * p.n_chunks + 64;
  for (int r = 0; r < rows; ++r) {
    const int64_t offset = p.row_offsets[j + r];
    if (offset < 0 || offset > p.values_size - row_reach) return false;
  }
  return true;
}

#ifndef FQ_SPARSE_BYTES_PF
#define FQ_SPARSE_BYTES_PF 4096  // rows_bytes, rows_fixed: bytes prefetched past the rows of the next pass
#endif

// Software prefetch of rows_bytes and rows_fixed, whose loads of values wait on the popcount of mask words
// just loaded, so the core keeps few misses in flight on its own. Values: past the R rows of the pass (which
// lie one after another), so that row r fetches row r of the next pass, plus FQ_SPARSE_BYTES_PF; a fixed
// distance fetched rows of the current pass once R rows spanned it. Masks: the next pass's words at the same
// chunk, one line per 32 chunks per row. The next rows' offsets may be corrupt (each row is checked when
// reached), and a prefetch of any address is harmless, so the addresses are computed on integers.
static inline uintptr_t values_ahead(const SparseLinearProblem& p, int64_t j, int rows) {
  return static_cast<uintptr_t>(p.row_offsets[j + rows]) - static_cast<uintptr_t>(p.row_offsets[j]) +
         FQ_SPARSE_BYTES_PF;
}

static inline void prefetch_at(const void* base, uintptr_t ahead) {
  __builtin_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(base) + ahead), 0, 3);
}

// rows_bytes sums q * 2^24 * x, which could overflow fp32 for max_abs > kByteExpandMaxX (2^80: sums reach
// K * 2^31 max_abs) where the result would not; such x takes the plain fp32 kernel.
constexpr float kByteExpandMaxX = 0x1p80f;

#if defined(__x86_64__) || defined(_M_X64)
// cpu_avx2_dense_int8: checks rows [j0, j1) (first_bad_row) and expands their int8 values into `block`, a
// dense (j1 - j0) x k int8 weight (zeros where pruned); returns the first refused row, or -1.
int64_t sparse_expand_int8_avx2(const SparseLinearProblem& p, int8_t* block, int64_t j0, int64_t j1);

// cpu_avx2_dense_float: checks rows [j0, j1) and expands their float values into rows_out, a dense
// (j1 - j0) x k fp32 weight (exact for bf16/fp16; zeros where pruned); returns the first refused row, or -1.
int64_t sparse_expand_float_avx2(const SparseLinearProblem& p, float* rows_out, int64_t j0, int64_t j1);

// Software prefetch of the values and masks of rows [j0, j1), so that a block's format arrives while the
// previous block is multiplied (the expansion itself would otherwise wait on DRAM). Offsets are read as
// integers: a prefetch of any address is harmless, and the rows are checked when expanded.
static inline void prefetch_rows(const SparseLinearProblem& p, int64_t j0, int64_t j1) {
  if (j0 >= j1) return;
  const auto* values = static_cast<const char*>(p.values);
  const uintptr_t begin = static_cast<uintptr_t>(p.row_offsets[j0]);
  const uintptr_t end = static_cast<uintptr_t>(p.row_offsets[j1]);
  for (uintptr_t b = begin; b < end && b - begin < (uintptr_t{1} << 20); b += 64) prefetch_at(values, b);
  const auto* masks = reinterpret_cast<const char*>(p.masks + j0 * p.n_chunks);
  const int64_t mask_bytes = (j1 - j0) * p.n_chunks * 2;
  for (int64_t b = 0; b < mask_bytes; b += 64) prefetch_at(masks, b);
}

// first_bad_row compiled with the AVX-512 file's flags (a popcnt instruction per 4 mask words), for the
// glue's check of every row before sparse_linear's bf16 prefill path.
int64_t sparse_first_bad_row_avx512(const SparseLinearProblem& p, int64_t j0, int64_t j1);

#endif

// Rows of x from which sparse_linear takes a dedicated prefill kernel for this weight (int8 values on
// AVX-512: cpu_avx512_bf16_tiles), or 0 when no row count does (at the current float32 matmul precision
// for fp32 x). A csr16 layer hands such calls to
// sparse_linear.
int64_t sparse_linear_cpu_prefill_rows(int64_t k, DType values, DType x, int64_t group_size);
const char* sparse_linear_cpu_path(int64_t m, int64_t n, int64_t k, DType values, DType x,
                                   int64_t group_size);

}  // namespace fastquant::cpu
