#pragma once
// Device helpers shared by the bitmap16 kernels (GEMV and densify): value extraction from 16-byte units,
// activation load/store by run-time dtype, streaming loads, the warp scan of the mask popcounts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/cuda_common.cuh"
#include "cuda/sparse_linear_launch.h"

namespace fastquant::cuda::sparse_detail {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// One value type of the format: its dtype code, kPerUnit elements per 16-byte unit
// (sparse_values_per_unit), element q of a unit as fp32 (q is a compile-time constant after unrolling, so
// the word selection costs nothing).
template <typename V>
struct Values;

template <>
struct Values<float> {
  static constexpr DType kCode = DType::kFloat32;
  static constexpr int kPerUnit = 4;
  static __device__ __forceinline__ float get(const uint4& u, int q) {
    return __uint_as_float(word_of(u, q));
  }
};

template <>
struct Values<__nv_bfloat16> {
  static constexpr DType kCode = DType::kBFloat16;
  static constexpr int kPerUnit = 8;
  // bf16 -> fp32 is the 16 bits under the fp32 sign/exponent: one shift or one AND, no conversion unit.
  static __device__ __forceinline__ float get(const uint4& u, int q) {
    const uint32_t w = word_of(u, q >> 1);
    return __uint_as_float((q & 1) ? (w & 0xFFFF0000u) : (w << 16));
  }
};

template <>
struct Values<__half> {
  static constexpr DType kCode = DType::kFloat16;
  static constexpr int kPerUnit = 8;
  static __device__ __forceinline__ float get(const uint4& u, int q) {
    const uint32_t w = word_of(u, q >> 1);
    const unsigned short h = static_cast<unsigned short>((q & 1) ? (w >> 16) : (w & 0xFFFFu));
    return __half2float(__ushort_as_half(h));
  }
};

template <>
struct Values<int8_t> {
  static constexpr DType kCode = DType::kInt8;
  static constexpr int kPerUnit = 16;
  // int8 -> exact fp32 without I2F (quarter rate on sm_80/sm_90): prmt puts the byte (XOR 0x80, so
  // unsigned) under the exponent of 2^23 and one FADD removes 2^23 + 128 (as in int8_gemv_mma.cuh).
  static __device__ __forceinline__ float get(const uint4& u, int q) {
    const uint32_t w = word_of(u, q >> 2) ^ 0x80808080u;
    return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540 + (q & 3))) - 8388736.0f;
  }
};

// One element by index (densify kernel: scattered reads, ordinary cached loads).
template <typename V>
__device__ __forceinline__ float load_value(const void* values, int64_t i) {
  if constexpr (std::is_same_v<V, float>) {
    return __ldg(static_cast<const float*>(values) + i);
  } else if constexpr (std::is_same_v<V, __nv_bfloat16>) {
    const unsigned short b = __ldg(static_cast<const unsigned short*>(values) + i);
    return __uint_as_float(static_cast<uint32_t>(b) << 16);
  } else if constexpr (std::is_same_v<V, __half>) {
    return __half2float(__ldg(static_cast<const __half*>(values) + i));
  } else {
    return static_cast<float>(__ldg(static_cast<const signed char*>(values) + i));
  }
}

__device__ __forceinline__ float load_act(const void* p, int64_t i, DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return __ldg(static_cast<const float*>(p) + i);
    case DType::kBFloat16:
      return __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(p) + i));
    default:
      return __half2float(__ldg(static_cast<const __half*>(p) + i));
  }
}

__device__ __forceinline__ void store_act(void* p, int64_t i, float v, DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      static_cast<float*>(p)[i] = v;
      break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      break;
  }
}

// 16 bytes of packed values that are read exactly once: non-coherent path, no L1 allocation (they would
// only evict x and the masks), 256-byte L2 prefetch (a warp reads 512 contiguous bytes per load instruction,
// so the next segment of the row is what it asks for next).
__device__ __forceinline__ uint4 load_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Inclusive prefix sum over the warp's lanes (5 shuffles).
__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int t = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += t;
  }
  return v;
}

// m with its r lowest set bits cleared (m: 16-bit mask, 0 <= r < popc(m)). Popcount bisection finds the
// position of the r-th set bit in a fixed 4 steps (a clear-one-bit loop would diverge with r).
__device__ __forceinline__ uint32_t drop_low_set_bits(uint32_t m, int r) {
  int pos = 0;
  uint32_t t = m;
  int c = __popc(t & 0xFFu);
  if (r >= c) r -= c, pos += 8, t >>= 8;
  c = __popc(t & 0xFu);
  if (r >= c) r -= c, pos += 4, t >>= 4;
  c = __popc(t & 0x3u);
  if (r >= c) r -= c, pos += 2, t >>= 2;
  if (r >= static_cast<int>(t & 1u)) pos += 1;
  return m & (0xFFFFFFFFu << pos);
}

}  // namespace fastquant::cuda::sparse_detail
