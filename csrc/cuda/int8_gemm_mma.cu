// Fused tensor-core GEMM for int8 weight-only linear layers at medium M (prefill-sized batches).
//
// y (M x N) = x (M x K) * W^T: x is the row-major A operand of mma.sync.m16n8k16, the int8 weight (N, K)
// row-major is the column-major B operand. Tiles of x (bf16/fp16) and of the int8 weight are staged in shared
// memory by cp.async (three stages: two k-tiles stream in while one is multiplied, enough to cover the
// ~600-800 cycle global latency with 8-16 warps per SM); the weight stays
// int8 in shared memory (half the bytes of a bf16 tile) and is converted in registers right before the mma,
// with the same prmt + FADD trick and K permutation as the GEMV (int8_gemv_mma.cuh): lane t of a quad owns
// the 16 consecutive k at 16t of each 64-wide k-tile, and mma step s uses the 4 at 16t + 4s, for A and B.
// So B needs one 16-byte shared load per 8 weight rows and k-tile, A two 16-byte loads per 16 x rows and
// half k-tile; no ldmatrix (its layout would fix k order that the int8 side cannot match cheaply).
//
// Against dequantize + cuBLAS this saves the pass that writes the bf16 weight (1 byte read + 2 written per
// weight, ~17 us for 4096 x 4096 on an H100) and reads 1 byte per weight instead of 2, but mma.sync reaches
// only part of the wgmma peak that cuBLAS uses on sm_90: it should win for M of a few hundred and lose when
// the problem is deep in the compute-bound range (see the table in int8_linear_dispatch.h).
//
// Block: 8 warps as 2 (M) x 4 (N); block tile (32 * MT) x 128, k-tile 64; warp tile (16 * MT) x 32.
// Dynamic shared memory: 3 stages x ((32 * MT) x 64 x 2 B of x + 128 x 64 B of weight) = 48 KiB (MT = 2) or
// 72 KiB (MT = 4, above the 48 KiB default: opted in once per device with cudaFuncSetAttribute).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "cuda/cuda_common.cuh"
#include "cuda/int8_gemv_mma.cuh"
#include "cuda/int8_linear_dispatch.h"
#include "cuda/int8_linear_launch.h"

namespace fastquant::cuda {
namespace {

using detail::Act;
using detail::dequant_word;
using detail::word_of;

constexpr int kBN = kGemmTileN;  // weight rows per block
constexpr int kBK = kGemmTileK;  // k per tile: 4 lanes x 16
constexpr int kThreads = 256;
constexpr int kStages = 3;

template <int MT>
constexpr int smem_bytes() {
  return kStages * (32 * MT * kBK * 2 + kBN * kBK);
}

struct GemmParams {
  const uint16_t* x;
  const int8_t* w;
  const float* scales;
  const uint16_t* bias;
  uint16_t* y;
  float* workspace;  // [gridDim.z][m][n] partial sums when gridDim.z > 1
  int m, n, k, group_size, n_groups;
};

// x tile rows are 64 elements = 128 bytes = 8 chunks of 16 bytes; chunk c of row r is stored at chunk
// c ^ (r % 8). The A loads of a warp (8 rows x 4 lanes, chunk 2t + h) then hit each 16-byte bank group
// exactly 4 times: the minimum of 4 wavefronts for 512 bytes. Weight rows are 64 bytes, unswizzled: the B
// loads of 8 consecutive rows x 4 lanes are 512 contiguous bytes.
__device__ __forceinline__ int x_offset(int row, int chunk) { return row * kBK + ((chunk ^ (row & 7)) * 8); }

template <typename T, int MT, bool kGrouped>
__global__ void __launch_bounds__(kThreads) int8_gemm_mma_kernel(GemmParams p) {
  constexpr int kBM = 32 * MT;
  extern __shared__ __align__(16) unsigned char smem[];
  // [kStages][kBM * kBK] x elements, then [kStages][kBN * kBK] weight bytes (both 16-byte aligned).
  auto* xs = reinterpret_cast<uint16_t (*)[kBM * kBK]>(smem);
  auto* ws = reinterpret_cast<int8_t (*)[kBN * kBK]>(smem + kStages * kBM * kBK * 2);

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
  const int k_tiles_all = (p.k + kBK - 1) / kBK;
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
      const bool ok = gm < p.m && gk < p.k;  // k % 16 == 0: a chunk is all in or all out
      cp_async16(&xs[stage][x_offset(r, c)], p.x + (ok ? static_cast<int64_t>(gm) * p.k + gk : 0), ok);
    }
#pragma unroll
    for (int i = 0; i < kBN * 4 / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      const int r = idx >> 2;
      const int c = idx & 3;
      const int gn = n_block + r;
      const int gk = k_base + c * 16;
      const bool ok = gn < p.n && gk < p.k;
      cp_async16(&ws[stage][r * kBK + c * 16], p.w + (ok ? static_cast<int64_t>(gn) * p.k + gk : 0), ok);
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

    // B: 16 weight bytes per n-tile (rows wn * 32 + j * 8 + g, k 16t .. 16t + 15 of this tile).
    uint4 qb[4];
    float sb[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int nl = wn * 32 + j * 8 + g;
      qb[j] = *reinterpret_cast<const uint4*>(&ws[stage][nl * kBK + 16 * t]);
      sb[j] = 1.f;
      if constexpr (kGrouped) {
        const int gn = n_block + nl;
        const int k0 = (kt_begin + kt) * kBK + 16 * t;
        sb[j] = (gn < p.n && k0 < p.k)
                    ? __ldg(p.scales + static_cast<int64_t>(gn) * p.n_groups + k0 / p.group_size)
                    : 0.f;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // A: rows g and g + 8 of each m-tile, 8 activations at k 16t + 8h (steps 2h and 2h + 1).
      uint4 xa[MT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int rl = wm * (16 * MT) + i * 16 + g + 8 * rr;
          xa[i][rr] = *reinterpret_cast<const uint4*>(&xs[stage][x_offset(rl, 2 * t + h)]);
        }
      }
#pragma unroll
      for (int ss = 0; ss < 2; ++ss) {
        const int s = 2 * h + ss;
        uint32_t b[4][2];
#pragma unroll
        for (int j = 0; j < 4; ++j) dequant_word<T, kGrouped>(word_of(qb[j], s), sb[j], b[j][0], b[j][1]);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          const uint32_t a[4] = {word_of(xa[i][0], 2 * ss), word_of(xa[i][1], 2 * ss),
                                 word_of(xa[i][0], 2 * ss + 1), word_of(xa[i][1], 2 * ss + 1)};
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
      if (split) {  // raw partial sums; the finalize kernel applies scale and bias once
#pragma unroll
        for (int i = 0; i < MT; ++i) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int m = m_block + wm * (16 * MT) + i * 16 + g + 8 * half;
            if (m < p.m) partial[static_cast<int64_t>(m) * p.n + n] = acc[i][j][2 * half + e];
          }
        }
        continue;
      }
      const float scale = kGrouped ? 1.f : __ldg(p.scales + n);
      const float b = bias != nullptr ? Act<T>::to_float(bias[n]) : 0.f;
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int m = m_block + wm * (16 * MT) + i * 16 + g + 8 * half;
          if (m < p.m)
            y[static_cast<int64_t>(m) * p.n + n] = Act<T>::from_float(acc[i][j][2 * half + e] * scale + b);
        }
      }
    }
  }
}

template <typename T, int MT, bool kGrouped>
cudaError_t launch_variant(const GemmParams& p, int splits, cudaStream_t stream) {
  static std::atomic<bool> done[kMaxDevices];  // per instantiation: each kernel needs its own attribute
  constexpr int bytes = smem_bytes<MT>();
  const cudaError_t err = allow_smem(int8_gemm_mma_kernel<T, MT, kGrouped>, bytes, done);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.n + kBN - 1) / kBN, (p.m + 32 * MT - 1) / (32 * MT), splits);
  int8_gemm_mma_kernel<T, MT, kGrouped><<<grid, kThreads, bytes, stream>>>(p);
  const cudaError_t launch_err = cudaGetLastError();
  if (launch_err != cudaSuccess || splits == 1) return launch_err;
  return detail::launch_splitk_finalize<T>(p.workspace, splits, kGrouped ? nullptr : p.scales, p.bias, p.y,
                                           static_cast<int64_t>(p.m) * p.n, p.n, stream);
}

template <typename T, int MT>
cudaError_t launch_mt(const GemmParams& p, bool grouped, int splits, cudaStream_t stream) {
  return grouped ? launch_variant<T, MT, true>(p, splits, stream)
                 : launch_variant<T, MT, false>(p, splits, stream);
}

template <typename T>
LaunchStatus launch(const Int8GemvArgs& a, cudaStream_t stream) {
  GemmParams p;
  p.x = static_cast<const uint16_t*>(a.x);
  p.w = a.w;
  p.scales = a.scales;
  p.bias = static_cast<const uint16_t*>(a.bias);
  p.y = static_cast<uint16_t*>(a.y);
  p.m = a.m;
  p.n = a.n;
  p.k = a.k;
  p.group_size = a.group_size == -1 ? a.k : a.group_size;
  p.n_groups = a.group_size == -1 ? 1 : a.n_groups;
  p.workspace = a.workspace;
  const int splits = int8_gemm_splits(a.m, a.n, a.k, a.num_sms);  // geometry rules: int8_linear_dispatch.h
  if (splits > 1 && a.workspace == nullptr)
    return LaunchStatus::precondition("the int8 GEMM splits K but got no workspace");
  const bool grouped = a.group_size != -1;
  if (int8_gemm_block_m(a.m, a.n, a.num_sms) == 128) return launch_mt<T, 4>(p, grouped, splits, stream);
  return launch_mt<T, 2>(p, grouped, splits, stream);
}

}  // namespace

LaunchStatus launch_int8_gemm_mma(const Int8GemvArgs& args, cudaStream_t stream) {
  if (!args.w_vector || reinterpret_cast<std::uintptr_t>(args.x) % 16 != 0)
    return LaunchStatus::precondition(
        "the int8 GEMM stages x and the weight with 16-byte cp.async: both aligned");
  if (args.m <= 0 || args.n <= 0 || args.k <= 0)
    return LaunchStatus::precondition("the int8 GEMM needs M, N and K >= 1");
  if (args.dtype == DType::kBFloat16) return launch<__nv_bfloat16>(args, stream);
  if (args.dtype == DType::kFloat16) return launch<__half>(args, stream);
  return LaunchStatus::precondition("the int8 GEMM takes bfloat16 or float16 activations");
}

}  // namespace fastquant::cuda
