#pragma once
// Tensor-core GEMV for int4 weight-only linear layers at small M (decode, M <= 64).
//
// Roles as in the int8 GEMV (int8_gemv_mma.cuh): y^T (N x M) = W (N x K) * x^T (K x M), the weight is the
// row-major 16x16 "A" operand of mma.sync.m16n8k16 and x^T the column-major 16x8 "B" operand, so M = 1..8
// pads to the n=8 side and every weight byte goes from HBM into registers once, with no shared memory.
//
// Work split: a lane (g = lane / 4, t = lane % 4) loads bytes 8t .. 8t + 7 of packed block b (64 k, 32 bytes)
// of weight rows g and g + 8: the quad reads the whole block of both rows, the warp 8 row pairs (256 bytes,
// whole 32-byte sectors). Byte j of a block holds k = 64b + j (low nibble) and 64b + 32 + j (high nibble), so
// the lane's 8 bytes carry k = 64b + 32h + 8t + i for i = 0..7, h = 0 (low) and 1 (high): every 16-k mma step
// takes 4 k from each lane within ONE 32-k half block. Groups are multiples of 32 starting at multiples of
// 32, so a half block lies in one group, and the group's scale multiplies the fp32 result of the half block's
// two mma steps instead of the weights: the mma multiplies exact small integers (q - 8, or q) by x, the fp32
// accumulator adds exact products, and no weight is ever rounded to x's dtype.
// 8-byte rather than 16-byte loads: 16 consecutive bytes would put two half blocks of different groups (group
// 32) in one mma step. Bytes in flight stay enough: U blocks of 16 bytes per lane per step.
//
// K permutation (A and B must agree, any order is fine): step s (0, 1) of half h uses word s of the lane's 8
// bytes, bytes j = 0..3 at k = base + j, base = 64b + 32h + 8t + 4s. Nibble extraction works on 16-bit lanes
// (one lop3 turns bytes 0 and 2 of a word into a packed pair), so fragment slots (2t, 2t+1) hold bytes (0, 2)
// and slots (2t+8, 2t+9) bytes (1, 3); the B fragment is permuted to match with one prmt per register:
// {x[base], x[base+2]} and {x[base+1], x[base+3]}.
//
// Codes to 16-bit floats with no conversion instruction: OR-ing a nibble under the exponent of 1024 (fp16,
// 0x6400) or 128 (bf16, 0x4300) gives 1024 + q or 128 + q exactly; one packed subtract leaves q - 8 (or q),
// exact. fp16 high nibbles stay in place (1024 + 16q, then one fma by 1/16 - 72, exact); bf16 has only 7
// mantissa bits, so its high nibbles are shifted down first. About 1.2-1.4 ALU instructions per weight, a
// third of H100's issue rate at full HBM bandwidth.
//
// Asymmetric weights (w = s * q + o): y = sum over groups of s * sum(q * x) + o * sum(x). The group sums of
// x come from one more mma per step with an all-ones A fragment (the tensor cores are idle in a memory-bound
// GEMV): C's rows are then all sum(x) over the step's 16 k, per activation row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "cuda/int4_linear_dispatch.h"
#include "cuda/int4_linear_launch.h"
#include "cuda/int8_gemv_mma.cuh"
#include "cuda/launch_status.h"
#include "static_count.h"

namespace fastquant::cuda::int4_detail {

using detail::Act;

// Bits of two 16-bit values packed into one register (low half first).
__device__ __forceinline__ __half2 as_half2(uint32_t v) {
  __half2 h;
  memcpy(&h, &v, sizeof(h));
  return h;
}
__device__ __forceinline__ __nv_bfloat162 as_bf162(uint32_t v) {
  __nv_bfloat162 h;
  memcpy(&h, &v, sizeof(h));
  return h;
}
template <typename H>
__device__ __forceinline__ uint32_t bits_of(H h) {
  uint32_t v;
  memcpy(&v, &h, sizeof(v));
  return v;
}

// Codes<T>::pairs: one word of 4 packed bytes -> the codes of bytes (0, 2) and of bytes (1, 3) as packed
// exact values q - 8 (symmetric) or q (asymmetric), low nibbles (k in the first half block) or high nibbles.
template <typename T>
struct Codes;

template <>
struct Codes<__half> {
  template <bool kHigh, bool kAsym>
  static __device__ __forceinline__ void pairs(uint32_t w, uint32_t& p02, uint32_t& p13) {
    constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both halves
    if constexpr (!kHigh) {
      // 1024 + q, minus 1032 (symmetric) or 1024
      const __half2 sub = as_half2(kAsym ? 0x64006400u : 0x64086408u);
      p02 = bits_of(__hsub2(as_half2((w & 0x000F000Fu) | kMagic), sub));
      p13 = bits_of(__hsub2(as_half2(((w >> 8) & 0x000F000Fu) | kMagic), sub));
    } else {
      // 1024 + 16q, times 1/16 (0x2C00) is 64 + q, plus -72 (0xD480) or -64 (0xD400): exact, one rounding.
      const __half2 sixteenth = as_half2(0x2C002C00u);
      const __half2 add = as_half2(kAsym ? 0xD400D400u : 0xD480D480u);
      p02 = bits_of(__hfma2(as_half2((w & 0x00F000F0u) | kMagic), sixteenth, add));
      p13 = bits_of(__hfma2(as_half2(((w >> 8) & 0x00F000F0u) | kMagic), sixteenth, add));
    }
  }
  static constexpr uint32_t kOnes = 0x3C003C00u;  // 1.0 in both halves
};

template <>
struct Codes<__nv_bfloat16> {
  template <bool kHigh, bool kAsym>
  static __device__ __forceinline__ void pairs(uint32_t w, uint32_t& p02, uint32_t& p13) {
    constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in both halves: 128 + q for q < 16 is exact
    // 128 + q, minus 136 (0x4308, symmetric) or 128
    const __nv_bfloat162 sub = as_bf162(kAsym ? 0x43004300u : 0x43084308u);
    const uint32_t v = kHigh ? (w >> 4) : w;
    p02 = bits_of(__hsub2(as_bf162((v & 0x000F000Fu) | kMagic), sub));
    p13 = bits_of(__hsub2(as_bf162(((v >> 8) & 0x000F000Fu) | kMagic), sub));
  }
  static constexpr uint32_t kOnes = 0x3F803F80u;  // 1.0 in both halves
};

// 8 weight bytes that are read exactly once: non-coherent path, no L1 allocation, evict-first in L2 and a
// 256-byte L2 prefetch (the next blocks of the same row are what this warp asks for next), as in the int8
// GEMV.
__device__ __forceinline__ uint2 load_stream8(const uint8_t* p, uint64_t policy) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.L2::256B.v2.u32 {%0,%1}, [%2], %3;\n"
      : "=r"(v.x), "=r"(v.y)
      : "l"(p), "l"(policy));
  return v;
}

// The 8 activations of one x row at k0 .. k0 + 7 as 4 packed words, zero past K or past the last row (the
// padding codes past K then multiply zeros; x is never read past K).
template <bool kVector>
__device__ __forceinline__ void load_x8(const uint16_t* xrow, int k0, int k, bool row_ok, uint32_t (&xw)[4]) {
  if constexpr (kVector) {
    // K % 8 == 0: the 8 values are all inside K or all past it.
    if (row_ok && k0 < k) {
      const uint4 a = __ldg(reinterpret_cast<const uint4*>(xrow + k0));
      xw[0] = a.x, xw[1] = a.y, xw[2] = a.z, xw[3] = a.w;
    } else {
      xw[0] = xw[1] = xw[2] = xw[3] = 0u;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = (row_ok && k0 + 2 * i < k) ? __ldg(xrow + k0 + 2 * i) : 0u;
      const uint32_t hi = (row_ok && k0 + 2 * i + 1 < k) ? __ldg(xrow + k0 + 2 * i + 1) : 0u;
      xw[i] = lo | (hi << 16);
    }
  }
}

struct Int4GemvParams {
  const uint16_t* x;  // bf16/fp16 bits
  const uint8_t* w;
  const __half* scales;
  const __half* offsets;  // asymmetric only
  const uint16_t* bias;   // may be null
  uint16_t* y;
  float* workspace;  // used when gridDim.y > 1: one zeroed M x N slice (atomics) or one slice per split
  int m, n, k;
  int row_bytes;    // ceil(K / 64) * 32
  int n_groups;     // ceil(K / group_size)
  int group_shift;  // log2(group_size / 32) when group_size / 32 is a power of two, else -1
  int halves_per_group;
  bool ordered;  // split-K: store to slice blockIdx.y (summed in order by the finalize kernel), no atomics
};

// Group of half block hb (= 2b + h, k from 32 hb): a shift for power-of-two group sizes.
__device__ __forceinline__ int group_of_half(const Int4GemvParams& p, int hb) {
  return p.group_shift >= 0 ? (hb >> p.group_shift) : hb / p.halves_per_group;
}

// Block: 8 warps on the same 16 weight rows (blockIdx.x), each on every 8th run of U packed blocks within
// this block's K split (blockIdx.y). The U blocks' weight bytes (U x 16 bytes per lane) and scales are
// loaded before any is used so that enough bytes are in flight.
template <typename T, int NT, bool kAsym, bool kXVector>
__global__ void __launch_bounds__(kGemvWarps * 32, 2) int4_gemv_mma_kernel(Int4GemvParams p) {
  constexpr int U = int4_gemv_blocks_per_step(NT);
  constexpr int kScalesPerBlock = kAsym ? 8 : 4;  // (low, high half) x (row g, row g + 8) x (scale, offset)
  __shared__ float partial[kGemvWarps][NT * 4 * 32];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int n0 = blockIdx.x * kGemvTileN + g;
  const int n1 = n0 + 8;
  const bool row0_ok = n0 < p.n;
  const bool row1_ok = n1 < p.n;
  const uint8_t* w0 = p.w + static_cast<int64_t>(row0_ok ? n0 : 0) * p.row_bytes + 8 * t;
  const uint8_t* w1 = p.w + static_cast<int64_t>(row1_ok ? n1 : 0) * p.row_bytes + 8 * t;
  const __half* s0 = p.scales + static_cast<int64_t>(row0_ok ? n0 : 0) * p.n_groups;
  const __half* s1 = p.scales + static_cast<int64_t>(row1_ok ? n1 : 0) * p.n_groups;
  const __half* o0 = kAsym ? p.offsets + static_cast<int64_t>(row0_ok ? n0 : 0) * p.n_groups : nullptr;
  const __half* o1 = kAsym ? p.offsets + static_cast<int64_t>(row1_ok ? n1 : 0) * p.n_groups : nullptr;

  const int blocks = p.row_bytes / kInt4BlockBytes;
  const int per_split = (blocks + gridDim.y - 1) / gridDim.y;
  const int b_begin = blockIdx.y * per_split;
  const int b_end = min(blocks, b_begin + per_split);

  const uint64_t policy = detail::evict_first_policy();
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

  for (int base = b_begin + warp * U; base < b_end; base += kGemvWarps * U) {
    uint2 qa[U], qb[U];
    float sc[U][kScalesPerBlock];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int b = base + u;
      const bool block_ok = b < b_end;
      qa[u] = (block_ok && row0_ok) ? load_stream8(w0 + b * kInt4BlockBytes, policy) : make_uint2(0u, 0u);
      qb[u] = (block_ok && row1_ok) ? load_stream8(w1 + b * kInt4BlockBytes, policy) : make_uint2(0u, 0u);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // A half block that starts at or past K has no group (its codes are padding): scale 0, never read.
        const int hb = 2 * b + h;
        const bool in_k = block_ok && 32 * hb < p.k;
        const int gi = in_k ? group_of_half(p, hb) : 0;
        sc[u][2 * h] = (in_k && row0_ok) ? __half2float(s0[gi]) : 0.f;
        sc[u][2 * h + 1] = (in_k && row1_ok) ? __half2float(s1[gi]) : 0.f;
        if constexpr (kAsym) {
          sc[u][4 + 2 * h] = (in_k && row0_ok) ? __half2float(o0[gi]) : 0.f;
          sc[u][4 + 2 * h + 1] = (in_k && row1_ok) ? __half2float(o1[gi]) : 0.f;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int b = base + u;
      if (b >= b_end) break;  // warp-uniform: mma.sync needs the whole warp
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int k_half = 64 * b + 32 * h;
        if (k_half >= p.k) break;  // warp-uniform: the high half of the last block may lie past K
        // A fragments of the half block's two mma steps: {row g slots 2t.., row g+8 slots 2t..,
        // row g slots 2t+8.., row g+8 slots 2t+8..}.
        uint32_t a[2][4];
        if (h == 0) {
          Codes<T>::template pairs<false, kAsym>(qa[u].x, a[0][0], a[0][2]);
          Codes<T>::template pairs<false, kAsym>(qb[u].x, a[0][1], a[0][3]);
          Codes<T>::template pairs<false, kAsym>(qa[u].y, a[1][0], a[1][2]);
          Codes<T>::template pairs<false, kAsym>(qb[u].y, a[1][1], a[1][3]);
        } else {
          Codes<T>::template pairs<true, kAsym>(qa[u].x, a[0][0], a[0][2]);
          Codes<T>::template pairs<true, kAsym>(qb[u].x, a[0][1], a[0][3]);
          Codes<T>::template pairs<true, kAsym>(qa[u].y, a[1][0], a[1][2]);
          Codes<T>::template pairs<true, kAsym>(qb[u].y, a[1][1], a[1][3]);
        }
        const float sg0 = sc[u][2 * h];
        const float sg1 = sc[u][2 * h + 1];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int mrow = nt * 8 + g;  // B fragment column g = activation row nt * 8 + g
          uint32_t xw[4];
          load_x8<kXVector>(p.x + static_cast<int64_t>(mrow < p.m ? mrow : 0) * p.k, k_half + 8 * t, p.k,
                            mrow < p.m, xw);
          float c[4] = {0.f, 0.f, 0.f, 0.f};
          float xs[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int s = 0; s < 2; ++s) {
            // {x[base], x[base + 2]} and {x[base + 1], x[base + 3]}, base = k_half + 8t + 4s
            const uint32_t b0 = __byte_perm(xw[2 * s], xw[2 * s + 1], 0x5410);
            const uint32_t b1 = __byte_perm(xw[2 * s], xw[2 * s + 1], 0x7632);
            Act<T>::mma(c, a[s], b0, b1);
            if constexpr (kAsym) {
              const uint32_t ones[4] = {Codes<T>::kOnes, Codes<T>::kOnes, Codes<T>::kOnes, Codes<T>::kOnes};
              Act<T>::mma(xs, ones, b0, b1);
            }
          }
          // C fragment: c[i] is weight row g + 8 * (i / 2), activation row nt * 8 + 2t + (i % 2); xs[i] the
          // half block's sum of that activation row (every weight row of the ones-matrix is the same).
          acc[nt][0] = fmaf(sg0, c[0], acc[nt][0]);
          acc[nt][1] = fmaf(sg0, c[1], acc[nt][1]);
          acc[nt][2] = fmaf(sg1, c[2], acc[nt][2]);
          acc[nt][3] = fmaf(sg1, c[3], acc[nt][3]);
          if constexpr (kAsym) {
            const float og0 = sc[u][4 + 2 * h];
            const float og1 = sc[u][4 + 2 * h + 1];
            acc[nt][0] = fmaf(og0, xs[0], acc[nt][0]);
            acc[nt][1] = fmaf(og0, xs[1], acc[nt][1]);
            acc[nt][2] = fmaf(og1, xs[2], acc[nt][2]);
            acc[nt][3] = fmaf(og1, xs[3], acc[nt][3]);
          }
        }
      }
    }
  }

  // Sum the 8 warps' accumulators (as the int8 GEMV).
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][(nt * 4 + i) * 32 + lane] = acc[nt][i];
  }
  __syncthreads();
  for (int v = threadIdx.x; v < NT * 4 * 32; v += kGemvWarps * 32) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) sum += partial[w][v];
    const int vl = v & 31;
    const int i = (v >> 5) & 3;
    const int nt = v >> 7;
    const int n = blockIdx.x * kGemvTileN + (vl >> 2) + 8 * (i >> 1);
    const int m = nt * 8 + 2 * (vl & 3) + (i & 1);
    if (n >= p.n || m >= p.m) continue;
    detail::gemv_store<T>(p, m, n, sum);
  }
}

template <typename T, int NT, bool kAsym>
void launch_nt(const Int4GemvParams& p, bool x_vector, dim3 grid, cudaStream_t stream) {
  constexpr int kThreads = kGemvWarps * 32;
  if (x_vector) {
    int4_gemv_mma_kernel<T, NT, kAsym, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    int4_gemv_mma_kernel<T, NT, kAsym, false><<<grid, kThreads, 0, stream>>>(p);
  }
}

template <typename T, int NT>
void launch_asym(const Int4GemvParams& p, bool asym, bool x_vector, dim3 grid, cudaStream_t stream) {
  if (asym) {
    launch_nt<T, NT, true>(p, x_vector, grid, stream);
  } else {
    launch_nt<T, NT, false>(p, x_vector, grid, stream);
  }
}

template <typename T>
LaunchStatus launch_gemv(const Int4GemvArgs& a, cudaStream_t stream) {
  const int nt = int4_gemv_n_tiles(a.path);
  if (nt == 0)
    return LaunchStatus::precondition("the int4 GEMV got a path of the dispatch table that is not a GEMV");
  if (a.m <= 0 || a.m > 8 * nt || a.n <= 0 || a.k <= 0)
    return LaunchStatus::precondition("the int4 GEMV needs 1 <= M <= 8 x (its n=8 tiles), N >= 1 and K >= 1");
  if (!int4_group_ok(a.group_size) || a.n_groups != (a.k + a.group_size - 1) / a.group_size)
    return LaunchStatus::precondition("the int4 GEMV needs a group size that is a multiple of 32");
  if (reinterpret_cast<uintptr_t>(a.w) % 16 != 0)
    return LaunchStatus::precondition("the int4 GEMV needs a 16-byte aligned qweight");
  const int splits = int4_gemv_splits(a.n, a.k, a.num_sms, nt);
  const int slices = int4_gemv_workspace_slices(splits, a.deterministic);
  if (slices > 0 && a.workspace == nullptr)
    return LaunchStatus::precondition("the int4 GEMV splits K but got no workspace");

  Int4GemvParams p;
  set_int4_params(p, a);
  p.ordered = a.deterministic;

  const int64_t total = static_cast<int64_t>(a.m) * a.n;
  const cudaError_t zeroed = detail::zero_atomic_slice(a.workspace, slices, total, stream);
  if (zeroed != cudaSuccess) return zeroed;
  const dim3 grid((a.n + kGemvTileN - 1) / kGemvTileN, splits);
  const bool asym = a.offsets != nullptr;
  with_power_of_two<8>(
      nt, [&](auto tiles) { launch_asym<T, decltype(tiles)::value>(p, asym, a.x_vector, grid, stream); });
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  // Scales and offsets are already in the partial sums; the finalize adds the slices and the bias.
  return detail::launch_splitk_finalize<T>(a.workspace, slices, nullptr, a.bias, a.y, total, a.n, stream);
}

}  // namespace fastquant::cuda::int4_detail
