// Fused tensor-core GEMM for int4 weight-only linear layers at medium M (prefill-sized batches).
//
// The int8 GEMM's structure (int8_gemm_mma.cu): y (M x N) = x (M x K) * W^T, x the row-major A operand of
// mma.sync.m16n8k16 and the weight the column-major B operand; x tiles (bf16/fp16, swizzled) and packed int4
// weight tiles staged in shared memory by a 3-stage cp.async pipeline; the weight stays packed in shared
// memory (a 64-k tile is 32 bytes per row: a quarter of a bf16 tile) and is dequantized in registers right
// before the mma. Block: 8 warps as 2 (M) x 4 (N), block tile (32 * MT) x 128, k-tile 64 = one packed block.
//
// K permutation: the int4 GEMV's (int4_linear_gemv.cuh). Lane (g, t) reads bytes 8t .. 8t + 7 of its weight
// rows' block; mma step (h, s) covers k = 32h + 8t + 4s + j (j = 0..3) of the tile from each lane, fragment
// slots (2t, 2t+1) holding bytes (0, 2) and (2t+8, 2t+9) bytes (1, 3) of word s; x's A fragment is permuted
// to match with one prmt per register from the 8 activations at 32h + 8t (one 16-byte shared load per row).
//
// Dequantization rounds each weight to x's dtype once from the reference's fp32 value, s * (q - 8) or
// s * q + o (multiply, then add): y is "dequantize, then F.linear" with fp32 accumulation, as the cuBLAS path
// computes it. In a GEMM the conversion (~3 instructions per weight) is shared by 32 * MT x rows: negligible.
// Scales are per (row, 32-k half block): a half block lies inside one group for every group size the format
// allows (multiples of 32).
//
// Dynamic shared memory: 3 stages x ((32 * MT) x 64 x 2 B of x + 128 x 32 B of weight) = 36 KiB (MT = 2) or
// 60 KiB (MT = 4, above the 48 KiB default: opted in once per device with cudaFuncSetAttribute).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "cuda/cuda_common.cuh"
#include "cuda/int4_linear_dispatch.h"
#include "cuda/int4_linear_launch.h"
#include "cuda/int8_gemv_mma.cuh"

namespace fastquant::cuda {
namespace {

using detail::Act;

constexpr int kBN = kGemmTileN;  // weight rows per block
constexpr int kBK = kGemmTileK;  // k per tile: one packed int4 block
static_assert(kBK == kInt4BlockK, "a k-tile of the int4 GEMM is one packed block");
constexpr int kThreads = 256;
constexpr int kStages = 3;

template <int MT>
constexpr int smem_bytes() {
  return kStages * (32 * MT * kBK * 2 + kBN * kInt4BlockBytes);
}

struct Int4GemmParams {
  const uint16_t* x;
  const uint8_t* w;
  const __half* scales;
  const __half* offsets;  // asymmetric only
  const uint16_t* bias;
  uint16_t* y;
  float* workspace;  // [gridDim.z][m][n] partial sums when gridDim.z > 1
  int m, n, k;
  int row_bytes;  // ceil(K / 64) * 32
  int n_groups;
  int group_shift;  // log2(group_size / 32) when a power of two, else -1
  int halves_per_group;
};

// x tile rows are 64 elements = 128 bytes = 8 chunks of 16 bytes; chunk c of row r is stored at chunk
// c ^ (r % 8), as in the int8 GEMM: a warp's A loads (8 rows x 4 lanes, chunk 4h + t) hit each 16-byte bank
// group exactly 4 times, the minimum for 512 bytes. Weight rows are 32 bytes, unswizzled: the B loads of 8
// consecutive rows x 4 lanes are 256 contiguous bytes.
__device__ __forceinline__ int x_offset(int row, int chunk) { return row * kBK + ((chunk ^ (row & 7)) * 8); }

// The 4 codes of one packed word (bytes 0..3; low nibbles, or high when kHigh) -> the dequantized weights of
// bytes (0, 2) and (1, 3) as packed x-dtype pairs (B fragment registers b0, b1).
template <typename T, bool kAsym>
__device__ __forceinline__ void dequant_pairs(uint32_t w, bool high, float s, float o, uint32_t& b0,
                                              uint32_t& b1) {
  const uint32_t u = (high ? (w >> 4) : w) & 0x0F0F0F0Fu;
  // Byte j under the exponent of 2^23: 8388608 + q exactly; one FADD leaves q (or q - 8), exact.
  constexpr float kMagic = kAsym ? 8388608.0f : 8388616.0f;
  float f[4];
  f[0] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540)) - kMagic;
  f[1] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541)) - kMagic;
  f[2] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7542)) - kMagic;
  f[3] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7543)) - kMagic;
#pragma unroll
  for (int i = 0; i < 4; ++i) f[i] = kAsym ? __fadd_rn(__fmul_rn(s, f[i]), o) : __fmul_rn(s, f[i]);
  b0 = Act<T>::pack(f[0], f[2]);
  b1 = Act<T>::pack(f[1], f[3]);
}

template <typename T, int MT, bool kAsym>
__global__ void __launch_bounds__(kThreads) int4_gemm_mma_kernel(Int4GemmParams p) {
  constexpr int kBM = 32 * MT;
  extern __shared__ __align__(16) unsigned char smem[];
  // [kStages][kBM * kBK] x elements, then [kStages][kBN * 32] packed weight bytes (both 16-byte aligned).
  auto* xs = reinterpret_cast<uint16_t (*)[kBM * kBK]>(smem);
  auto* ws = reinterpret_cast<uint8_t (*)[kBN * kInt4BlockBytes]>(smem + kStages * kBM * kBK * 2);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int wm = warp >> 2;  // 0..1
  const int wn = warp & 3;   // 0..3
  const int n_block = blockIdx.x * kBN;
  const int m_block = blockIdx.y * kBM;
  // This block's k-tiles: split blockIdx.z of gridDim.z (split-K; one split covers all of K otherwise).
  const int k_tiles_all = p.row_bytes / kInt4BlockBytes;
  const int per_split = (k_tiles_all + gridDim.z - 1) / gridDim.z;
  const int kt_begin = blockIdx.z * per_split;
  const int k_tiles = max(0, min(k_tiles_all, kt_begin + per_split) - kt_begin);

  auto load_tile = [&](int stage, int kt) {  // kt counts from kt_begin
    const int k_base = (kt_begin + kt) * kBK;
#pragma unroll
    for (int i = 0; i < kBM * 8 / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      const int r = idx >> 3;
      const int c = idx & 7;
      const int gm = m_block + r;
      const int gk = k_base + c * 8;
      const bool ok = gm < p.m && gk < p.k;  // k % 8 == 0: a chunk is all in or all out
      cp_async16(&xs[stage][x_offset(r, c)], p.x + (ok ? static_cast<int64_t>(gm) * p.k + gk : 0), ok);
    }
    // 128 rows x 2 chunks of 16 bytes: one per thread. Packed rows cover whole blocks: no K bound.
    {
      const int r = tid >> 1;
      const int c = tid & 1;
      const int gn = n_block + r;
      const bool ok = gn < p.n;
      const int64_t src =
          ok ? static_cast<int64_t>(gn) * p.row_bytes + (kt_begin + kt) * kInt4BlockBytes + 16 * c : 0;
      cp_async16(&ws[stage][r * kInt4BlockBytes + 16 * c], p.w + src, ok);
    }
  };

  float acc[MT][4][4];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;
  }

  // Prologue: tiles 0 .. kStages - 2. One commit group per tile slot, empty past the last tile, so that at
  // iteration kt exactly kStages - 1 groups younger than tile kt's may still be in flight.
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < k_tiles) load_tile(st, st);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int stage = kt % kStages;
    // Refill the stage that tile kt - 1 used: released by the barrier that ended the previous iteration.
    if (kt + kStages - 1 < k_tiles) load_tile((kt + kStages - 1) % kStages, kt + kStages - 1);
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncthreads();

    const int block = kt_begin + kt;
    // B: 8 packed bytes per n-tile (rows wn * 32 + j * 8 + g), with the scale (and offset) of each half
    // block.
    uint2 qb[4];
    float sb[4][2], ob[4][2];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int nl = wn * 32 + j * 8 + g;
      qb[j] = *reinterpret_cast<const uint2*>(&ws[stage][nl * kInt4BlockBytes + 8 * t]);
      const int gn = n_block + nl;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // A half block at or past K has no group: weight 0 there (x is zero-filled there anyway).
        const int hb = 2 * block + h;
        const bool ok = gn < p.n && 32 * hb < p.k;
        const int gi = p.group_shift >= 0 ? (hb >> p.group_shift) : hb / p.halves_per_group;
        const int64_t at = static_cast<int64_t>(gn) * p.n_groups + gi;
        sb[j][h] = ok ? __half2float(p.scales[at]) : 0.f;
        ob[j][h] = (kAsym && ok) ? __half2float(p.offsets[at]) : 0.f;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // A: rows g and g + 8 of each m-tile, the 8 activations at k 32h + 8t (steps (h, 0) and (h, 1)).
      uint4 xa[MT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int rl = wm * (16 * MT) + i * 16 + g + 8 * rr;
          xa[i][rr] = *reinterpret_cast<const uint4*>(&xs[stage][x_offset(rl, 4 * h + t)]);
        }
      }
#pragma unroll
      for (int ss = 0; ss < 2; ++ss) {
        uint32_t b[4][2];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          dequant_pairs<T, kAsym>(ss == 0 ? qb[j].x : qb[j].y, h == 1, sb[j][h], ob[j][h], b[j][0], b[j][1]);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          const uint32_t w0a = detail::word_of(xa[i][0], 2 * ss), w1a = detail::word_of(xa[i][0], 2 * ss + 1);
          const uint32_t w0b = detail::word_of(xa[i][1], 2 * ss), w1b = detail::word_of(xa[i][1], 2 * ss + 1);
          // {row g slots 2t.. = x[base], x[base+2]; row g+8 slots 2t..; row g slots 2t+8.. = x[base+1],
          // x[base+3]; row g+8 slots 2t+8..}, base = 32h + 8t + 4ss
          const uint32_t a[4] = {__byte_perm(w0a, w1a, 0x5410), __byte_perm(w0b, w1b, 0x5410),
                                 __byte_perm(w0a, w1a, 0x7632), __byte_perm(w0b, w1b, 0x7632)};
#pragma unroll
          for (int j = 0; j < 4; ++j) Act<T>::mma(acc[i][j], a, b[j][0], b[j][1]);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // C fragment: acc[i][j][v] is x row wm * 16MT + 16i + g + 8 (v / 2), weight row wn * 32 + 8j + 2t + v % 2.
  const T* bias = reinterpret_cast<const T*>(p.bias);
  T* y = reinterpret_cast<T*>(p.y);
  const bool split = gridDim.z > 1;
  float* partial = split ? p.workspace + static_cast<int64_t>(blockIdx.z) * p.m * p.n : nullptr;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int n = n_block + wn * 32 + j * 8 + 2 * t + e;
      if (n >= p.n) continue;
      const float b = (!split && bias != nullptr) ? Act<T>::to_float(bias[n]) : 0.f;
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int m = m_block + wm * (16 * MT) + i * 16 + g + 8 * half;
          if (m >= p.m) continue;
          const int64_t out = static_cast<int64_t>(m) * p.n + n;
          if (split) {  // raw partial sums; the finalize kernel adds the splits in order, then the bias
            partial[out] = acc[i][j][2 * half + e];
          } else {
            y[out] = Act<T>::from_float(acc[i][j][2 * half + e] + b);
          }
        }
      }
    }
  }
}

template <typename T, int MT, bool kAsym>
cudaError_t launch_variant(const Int4GemmParams& p, int splits, cudaStream_t stream) {
  static std::atomic<bool> done[kMaxDevices];  // per instantiation: each kernel needs its own attribute
  constexpr int bytes = smem_bytes<MT>();
  const cudaError_t err = allow_smem(int4_gemm_mma_kernel<T, MT, kAsym>, bytes, done);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.n + kBN - 1) / kBN, (p.m + 32 * MT - 1) / (32 * MT), splits);
  int4_gemm_mma_kernel<T, MT, kAsym><<<grid, kThreads, bytes, stream>>>(p);
  const cudaError_t launch_err = cudaGetLastError();
  if (launch_err != cudaSuccess || splits == 1) return launch_err;
  return detail::launch_splitk_finalize<T>(p.workspace, splits, nullptr, p.bias, p.y,
                                           static_cast<int64_t>(p.m) * p.n, p.n, stream);
}

template <typename T, int MT>
cudaError_t launch_mt(const Int4GemmParams& p, bool asym, int splits, cudaStream_t stream) {
  return asym ? launch_variant<T, MT, true>(p, splits, stream)
              : launch_variant<T, MT, false>(p, splits, stream);
}

template <typename T>
LaunchStatus launch(const Int4GemvArgs& a, cudaStream_t stream) {
  Int4GemmParams p;
  set_int4_params(p, a);
  const int splits = int4_gemm_splits(a.m, a.n, a.k, a.num_sms);  // geometry rules: int4_linear_dispatch.h
  if (splits > 1 && a.workspace == nullptr)
    return LaunchStatus::precondition("the int4 GEMM splits K but got no workspace");
  const bool asym = a.offsets != nullptr;
  if (int4_gemm_block_m(a.m, a.n, a.num_sms) == 128) return launch_mt<T, 4>(p, asym, splits, stream);
  return launch_mt<T, 2>(p, asym, splits, stream);
}

}  // namespace

LaunchStatus launch_int4_gemm_mma(const Int4GemvArgs& args, cudaStream_t stream) {
  if (reinterpret_cast<std::uintptr_t>(args.x) % 16 != 0 ||
      reinterpret_cast<std::uintptr_t>(args.w) % 16 != 0 || args.k % 8 != 0)
    return LaunchStatus::precondition(
        "the int4 GEMM stages x and the weight with 16-byte cp.async: both aligned and K % 8 == 0");
  if (args.m <= 0 || args.n <= 0 || args.k <= 0)
    return LaunchStatus::precondition("the int4 GEMM needs M, N and K >= 1");
  if (!int4_group_ok(args.group_size) || args.n_groups != (args.k + args.group_size - 1) / args.group_size)
    return LaunchStatus::precondition("the int4 GEMM needs a group size that is a multiple of 32");
  if (args.dtype == DType::kBFloat16) return launch<__nv_bfloat16>(args, stream);
  if (args.dtype == DType::kFloat16) return launch<__half>(args, stream);
  return LaunchStatus::precondition("the int4 GEMM takes bfloat16 or float16 activations");
}

}  // namespace fastquant::cuda
