#pragma once
// Tensor-core GEMV for int8 weight-only linear layers at small M (decode, M <= 64).
//
// Roles are swapped against the usual GEMM: y^T (N x M) = W (N x K) * x^T (K x M). The int8 weight, row-major
// (N, K), is exactly the row-major 16x16 "A" operand of mma.sync.m16n8k16, and x^T (x row-major (M, K)) is
// the column-major 16x8 "B" operand. So M = 1..8 pads to the n=8 side (not to 16), and every weight byte is
// loaded from HBM once, with 16-byte vector loads, straight into registers -- no shared memory staging, no
// ldmatrix. Products of an int8 weight and a bf16/fp16 activation are exact in the fp32 accumulator.
//
// K permutation: a dot product may visit k in any order as long as A and B agree. Lane (g = lane / 4,
// t = lane % 4) loads 16 consecutive bytes of weight rows g and g + 8 at k0 = chunk * 64 + 16 t, and the 16
// matching activations of x row g. mma step s (0..3) uses bytes 4s..4s+3 of those 16 for the fragment
// slots (2t, 2t+1, 2t+8, 2t+9) that PTX assigns to the lane, in both A and B. Each mma step then sums 16
// real k values, and the four steps cover the 64-wide chunk.
//
// int8 -> fp32 with no I2F (quarter rate on sm_80/sm_90): prmt puts the byte (XOR 0x80, so unsigned) under
// the exponent of 2^23 (0x4B0000xx == 8388608 + xx), one FADD removes 8388608 + 128. The exact integer is
// then scaled (per-group only) and packed to bf16x2 / f16x2 with one cvt per pair. About 3.5 ALU
// instructions per weight byte: ~40% of H100's issue rate at full HBM bandwidth, so memory stays the limit.
//
// Per-channel scales are applied once to the fp32 result (exact products, exact sums up to fp32 rounding).
// Per-group scales are applied to the weight before the mma, rounding w = q * s to x's dtype exactly as
// PyTorch's (qweight.float() * scales).to(dtype) does: one mma covers k values of two groups of 32, so the
// scale cannot be applied after the mma without doubling the mma and accumulator count.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "cuda/int8_linear_dispatch.h"
#include "cuda/int8_linear_launch.h"
#include "cuda/launch_status.h"
#include "static_count.h"

namespace fastquant::cuda::detail {

template <typename T>
struct Act;

template <>
struct Act<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // lo in the low 16 bits
    uint32_t r;
    memcpy(&r, &v, sizeof(r));
    return r;
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Act<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, sizeof(r));
    return r;
  }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// 16 weight bytes that are read exactly once: non-coherent path, no L1 allocation (they would only evict x),
// an evict-first L2 policy (x and the scales are what should stay in L2), and a 256-byte L2 prefetch so
// each DRAM access brings whole row segments that the neighbouring chunks of this warp ask for next.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ uint4 load_stream16(const int8_t* p, uint64_t policy) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4], %5;\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "l"(policy));
  return v;
}

// 4 int8 (one 32-bit word) -> 4 exact fp32 integers.
__device__ __forceinline__ void int8x4_to_float(uint32_t q, float (&f)[4]) {
  const uint32_t u = q ^ 0x80808080u;   // two's complement byte b -> unsigned b + 128
  constexpr float kMagic = 8388736.0f;  // 2^23 + 128
  f[0] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540)) - kMagic;
  f[1] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541)) - kMagic;
  f[2] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7542)) - kMagic;
  f[3] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7543)) - kMagic;
}

// One weight word (bytes 4s..4s+3 of a lane's segment) -> the two packed registers for fragment slots
// (2t, 2t+1) [lo] and (2t+8, 2t+9) [hi].
template <typename T, bool kGrouped>
__device__ __forceinline__ void dequant_word(uint32_t q, float scale, uint32_t& lo, uint32_t& hi) {
  float f[4];
  int8x4_to_float(q, f);
  if constexpr (kGrouped) {
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] *= scale;
  }
  lo = Act<T>::pack(f[0], f[1]);
  hi = Act<T>::pack(f[2], f[3]);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// 16 weight bytes of one row at k0, zero where the row or k is out of range.
template <bool kAligned>
__device__ __forceinline__ uint4 load_weight_segment(const int8_t* row, int k0, int k, bool row_ok,
                                                     uint64_t policy) {
  if constexpr (kAligned) {
    // k % 16 == 0, so a segment is either entirely inside the row or entirely past its end.
    if (row_ok && k0 < k) return load_stream16(row + k0, policy);
    return make_uint4(0u, 0u, 0u, 0u);
  } else {
    (void)policy;
    uint32_t words[4] = {0u, 0u, 0u, 0u};
    if (row_ok) {
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        if (k0 + j < k) {
          const uint32_t b = static_cast<uint8_t>(row[k0 + j]);
          words[j / 4] |= b << (8 * (j % 4));
        }
      }
    }
    return make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// The 16 activations of one x row at k0 as 8 packed words, zero where the row or k is out of range.
// x is small and re-read by every block: ordinary cached loads (L1/L2 hits after the first block).
template <bool kAligned>
__device__ __forceinline__ void load_x_segment(const uint16_t* xrow, int k0, int k, bool row_ok,
                                               uint32_t (&xw)[8]) {
  if constexpr (kAligned) {
    if (row_ok && k0 < k) {
      const uint4 a = __ldg(reinterpret_cast<const uint4*>(xrow + k0));
      const uint4 b = __ldg(reinterpret_cast<const uint4*>(xrow + k0 + 8));
      xw[0] = a.x, xw[1] = a.y, xw[2] = a.z, xw[3] = a.w;
      xw[4] = b.x, xw[5] = b.y, xw[6] = b.z, xw[7] = b.w;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) xw[i] = 0u;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t lo = (row_ok && k0 + 2 * i < k) ? __ldg(xrow + k0 + 2 * i) : 0u;
      const uint32_t hi = (row_ok && k0 + 2 * i + 1 < k) ? __ldg(xrow + k0 + 2 * i + 1) : 0u;
      xw[i] = lo | (hi << 16);
    }
  }
}

// Stores the finished sum of output (m, n) of a GEMV block (the int8 and the int4 GEMV): into this split's
// workspace slice (ordered split-K) or atomically into the workspace (split-K), or with the bias into y.
template <typename T, typename Params>
__device__ __forceinline__ void gemv_store(const Params& p, int m, int n, float sum) {
  const int64_t out = static_cast<int64_t>(m) * p.n + n;
  if (gridDim.y > 1) {
    if (p.ordered) {
      p.workspace[static_cast<int64_t>(blockIdx.y) * p.m * p.n + out] = sum;
    } else {
      atomicAdd(p.workspace + out, sum);
    }
  } else {
    if (p.bias != nullptr) sum += Act<T>::to_float(reinterpret_cast<const T*>(p.bias)[n]);
    reinterpret_cast<T*>(p.y)[out] = Act<T>::from_float(sum);
  }
}

// Zeroes the one M x N fp32 workspace slice that a split-K GEMV's atomics accumulate into (slices == 1).
inline cudaError_t zero_atomic_slice(float* workspace, int slices, int64_t total, cudaStream_t stream) {
  if (slices != 1) return cudaSuccess;
  return cudaMemsetAsync(workspace, 0, static_cast<size_t>(total) * sizeof(float), stream);
}

struct GemvParams {
  const uint16_t* x;  // bf16/fp16 bits
  const int8_t* w;
  const float* scales;
  const uint16_t* bias;  // may be null
  uint16_t* y;
  float* workspace;  // used when gridDim.y > 1: one zeroed M x N slice (atomics) or one slice per split
  int m, n, k, group_size, n_groups;
  bool ordered;  // split-K: store to slice blockIdx.y (summed in order by the finalize kernel), no atomics
};

// Block: 8 warps on the same 16 weight rows (blockIdx.x), each warp on every 8th group of U chunks of
// 64 k within this block's K split (blockIdx.y). U chunks (U * 2 KiB per warp with both rows) are loaded
// before any is used so that enough bytes are in flight: 2 blocks/SM x 8 warps x 4 KiB = 64 KiB per SM,
// above the ~25 KiB that H100's bandwidth-latency product needs per SM.
// kWVector / kXVector: 16-byte loads of the weight / of x (Int8Plan); the other way, element loads.
template <typename T, int NT, bool kGrouped, bool kWVector, bool kXVector>
__global__ void __launch_bounds__(kGemvWarps * 32, 2) int8_gemv_mma_kernel(GemvParams p) {
  constexpr int U = int8_gemv_chunks_per_step(NT);
  __shared__ float partial[kGemvWarps][NT * 4 * 32];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int n0 = blockIdx.x * kGemvTileN + g;
  const int n1 = n0 + 8;
  const bool row0_ok = n0 < p.n;
  const bool row1_ok = n1 < p.n;
  const int8_t* w0 = p.w + static_cast<int64_t>(row0_ok ? n0 : 0) * p.k;
  const int8_t* w1 = p.w + static_cast<int64_t>(row1_ok ? n1 : 0) * p.k;

  const int chunks = (p.k + kGemvChunkK - 1) / kGemvChunkK;
  const int per_split = (chunks + gridDim.y - 1) / gridDim.y;
  const int c_begin = blockIdx.y * per_split;
  const int c_end = min(chunks, c_begin + per_split);

  const uint64_t policy = evict_first_policy();
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

  for (int base = c_begin + warp * U; base < c_end; base += kGemvWarps * U) {
    uint4 qa[U], qb[U];
    float sa[U], sb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k0 = (base + u) * kGemvChunkK + 16 * t;
      const bool chunk_ok = base + u < c_end;
      qa[u] = load_weight_segment<kWVector>(w0, k0, p.k, chunk_ok && row0_ok, policy);
      qb[u] = load_weight_segment<kWVector>(w1, k0, p.k, chunk_ok && row1_ok, policy);
      sa[u] = sb[u] = 1.f;
      if constexpr (kGrouped) {
        // A 16-aligned segment never straddles a group (group_size % 16 == 0).
        const bool in_k = chunk_ok && k0 < p.k;
        const int gi = in_k ? k0 / p.group_size : 0;
        sa[u] = (in_k && row0_ok) ? __ldg(p.scales + static_cast<int64_t>(n0) * p.n_groups + gi) : 0.f;
        sb[u] = (in_k && row1_ok) ? __ldg(p.scales + static_cast<int64_t>(n1) * p.n_groups + gi) : 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (base + u >= c_end) break;  // warp-uniform: mma.sync needs the whole warp
      const int k0 = (base + u) * kGemvChunkK + 16 * t;
      uint32_t a[4][4];
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        // A fragment: {row g slots 2t..2t+1, row g+8 slots 2t..2t+1, row g slots 2t+8.., row g+8 slots
        // 2t+8..}
        dequant_word<T, kGrouped>(word_of(qa[u], s), sa[u], a[s][0], a[s][2]);
        dequant_word<T, kGrouped>(word_of(qb[u], s), sb[u], a[s][1], a[s][3]);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int mrow = nt * 8 + g;  // B fragment column g = activation row nt * 8 + g
        uint32_t xw[8];
        load_x_segment<kXVector>(p.x + static_cast<int64_t>(mrow < p.m ? mrow : 0) * p.k, k0, p.k, mrow < p.m,
                                 xw);
#pragma unroll
        for (int s = 0; s < 4; ++s) Act<T>::mma(acc[nt], a[s], xw[2 * s], xw[2 * s + 1]);
      }
    }
  }

  // Sum the 8 warps' accumulators. C fragment: acc[nt][i] is weight row g + 8 * (i / 2), activation row
  // nt * 8 + 2t + (i % 2).
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
    if constexpr (!kGrouped) sum *= __ldg(p.scales + n);
    gemv_store<T>(p, m, n, sum);
  }
}

// Split-K epilogue of the int8 GEMV, the int8 GEMM and the bitmap16 GEMM: y[m][n] = dtype(scale[n] * sum
// over the slices + bias[n]), the slices added in order (deterministic), one rounding as in the unsplit
// kernels. scales == nullptr: already applied (group-wise scales on the weight, or the GEMV's per-channel
// scale before its atomics).
template <typename T>
__global__ void splitk_finalize_kernel(const float* workspace, int slices, const float* scales,
                                       const uint16_t* bias, uint16_t* y, int64_t total, int n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < slices; ++s) v += workspace[s * total + i];
    const int col = static_cast<int>(i % n);
    if (scales != nullptr) v *= __ldg(scales + col);
    if (bias != nullptr) v += Act<T>::to_float(reinterpret_cast<const T*>(bias)[col]);
    reinterpret_cast<T*>(y)[i] = Act<T>::from_float(v);
  }
}

template <typename T>
cudaError_t launch_splitk_finalize(const float* workspace, int slices, const float* scales, const void* bias,
                                   void* y, int64_t total, int n, cudaStream_t stream) {
  const int64_t blocks64 = (total + 255) / 256;
  const int blocks = static_cast<int>(blocks64 < 4096 ? blocks64 : 4096);
  splitk_finalize_kernel<T><<<blocks, 256, 0, stream>>>(
      workspace, slices, scales, static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(y), total, n);
  return cudaGetLastError();
}

template <typename T, int NT, bool kGrouped>
void launch_gemv_nt(const GemvParams& p, bool w_vector, bool x_vector, dim3 grid, cudaStream_t stream) {
  constexpr int kThreads = kGemvWarps * 32;
  // A vector x with element weight loads is not instantiated (Int8Plan never asks for it).
  if (w_vector && x_vector) {
    int8_gemv_mma_kernel<T, NT, kGrouped, true, true><<<grid, kThreads, 0, stream>>>(p);
  } else if (w_vector) {
    int8_gemv_mma_kernel<T, NT, kGrouped, true, false><<<grid, kThreads, 0, stream>>>(p);
  } else {
    int8_gemv_mma_kernel<T, NT, kGrouped, false, false><<<grid, kThreads, 0, stream>>>(p);
  }
}

template <typename T, int NT>
void launch_gemv_grouped(const GemvParams& p, bool grouped, bool w_vector, bool x_vector, dim3 grid,
                         cudaStream_t stream) {
  if (grouped) {
    launch_gemv_nt<T, NT, true>(p, w_vector, x_vector, grid, stream);
  } else {
    launch_gemv_nt<T, NT, false>(p, w_vector, x_vector, grid, stream);
  }
}

template <typename T>
LaunchStatus launch_gemv(const Int8GemvArgs& a, cudaStream_t stream) {
  const int nt = int8_gemv_n_tiles(a.path);
  if (nt == 0)
    return LaunchStatus::precondition("the int8 GEMV got a path of the dispatch table that is not a GEMV");
  if (a.m <= 0 || a.m > 8 * nt || a.n <= 0 || a.k <= 0)
    return LaunchStatus::precondition("the int8 GEMV needs 1 <= M <= 8 x (its n=8 tiles), N >= 1 and K >= 1");
  const int splits = int8_gemv_splits(a.n, a.k, a.num_sms, nt);
  const int slices = int8_gemv_workspace_slices(splits, a.deterministic);
  if (slices > 0 && a.workspace == nullptr)
    return LaunchStatus::precondition("the int8 GEMV splits K but got no workspace");
  if (!a.w_vector && a.x_vector)
    return LaunchStatus::precondition("the int8 GEMV has no variant with vector x and element weight loads");

  GemvParams p;
  p.x = static_cast<const uint16_t*>(a.x);
  p.w = a.w;
  p.scales = a.scales;
  p.bias = static_cast<const uint16_t*>(a.bias);
  p.y = static_cast<uint16_t*>(a.y);
  p.workspace = a.workspace;
  p.m = a.m;
  p.n = a.n;
  p.k = a.k;
  p.group_size = a.group_size == -1 ? a.k : a.group_size;
  p.n_groups = a.group_size == -1 ? 1 : a.n_groups;
  p.ordered = a.deterministic;

  const int64_t total = static_cast<int64_t>(a.m) * a.n;
  const cudaError_t zeroed = zero_atomic_slice(a.workspace, slices, total, stream);
  if (zeroed != cudaSuccess) return zeroed;
  const dim3 grid((a.n + kGemvTileN - 1) / kGemvTileN, splits);
  const bool grouped = a.group_size != -1;
  with_power_of_two<8>(nt, [&](auto tiles) {
    launch_gemv_grouped<T, decltype(tiles)::value>(p, grouped, a.w_vector, a.x_vector, grid, stream);
  });
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  // The per-channel scale is already in the partial sums (applied before the atomics).
  return launch_splitk_finalize<T>(a.workspace, slices, nullptr, a.bias, a.y, total, a.n, stream);
}

}  // namespace fastquant::cuda::detail
