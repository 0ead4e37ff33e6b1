#pragma once
// Decode GEMV for bitmap16 weights (M <= 16): y[m][n] = sum over kept (n, k) of w[n][k] * x[m][k] (+ bias).
//
// Memory-bound at decode (2 * M flops per weight, 1.1 bytes per weight at 50% bf16): the kernel moves the
// format's bytes (masks + packed values) exactly once, with coalesced 16-byte loads, and keeps the ALU
// work per kept value small enough that HBM stays the limit.
//
// - One warp per weight row (8 or 16 rows per block). A warp step covers 32 chunks of 16 columns: lane l
//   reads the mask word of chunk l (one 64-byte coalesced load), a popcount and a 5-shuffle warp scan give
//   each chunk's offset in the step's packed values, which form one contiguous range [run, run + total).
// - The range is loaded cooperatively: lane l of round r holds 16-byte unit u0 + 32 r + l (8 bf16/fp16, 4
//   fp32 or 16 int8 values), so every load instruction reads 512 contiguous bytes: full sectors, one
//   L1 wavefront per 128 bytes, and all of a step's loads are issued before any is used.
// - Each lane then works on the values it holds (not on "its" chunk), so every lane has a full unit of work
//   whatever the sparsity: for its first value a 5-shuffle bisection over the scan finds the owning chunk and
//   a popcount bisection its bit; after that the columns follow by find-first-set and clear-lowest-bit. Per
//   kept value: ~8 instructions at M = 1 (element extract, ffs, clear, column, x load, FMA). A lane-per-chunk
//   loop would instead leave most lanes idle at high sparsity (the warp runs the longest chunk) and read
//   values at lane-strided addresses (many L1 wavefronts per instruction).
// - x is staged once per block in shared memory as fp32 (M rows padded to MP), column-major [col][m] so
//   that one float4 load gives 4 rows' activations; a pad of min(MP, 4) words per 32 columns spreads the
//   lanes of a warp (whose columns advance ~16 per lane at 50% density) over the 32 banks. When M * K does
//   not fit in the shared-memory budget, K is walked in slabs (block barrier per slab).
// - fp32 accumulation per lane, a shuffle reduction per row at the end, fp32 group scales applied to the
//   weight (w = q * s in fp32, exactly the reference's dequantization); per-channel scales to the sum.
#include <algorithm>
#include <type_traits>

#include "cuda/sparse_linear_common.cuh"
#include "static_count.h"

namespace fastquant::cuda::sparse_detail {

constexpr int kMaxWarps = 16;

// Shared-memory budget of the x slab. GUESSED: 72 KiB leaves room for 3 blocks per SM on H100 (228 KiB)
// and 2 on A100 (164 KiB); M = 1 then holds a K = 17408 row in one slab, M = 16 1024 columns.
constexpr int kSlabBudgetBytes = 72 * 1024;

template <int MP>
__host__ __device__ constexpr int pad_words() {
  return MP == 1 ? 1 : (MP == 2 ? 2 : 4);
}

template <int MP>
__host__ __device__ constexpr int slab_floats(int cols) {
  return cols * MP + (cols / 32) * pad_words<MP>();
}

// The warp's sum of each acc[i] (one partial per lane), returned by lane i (0 on lanes >= MP): one shuffle
// tree per row of x, then lane i keeps row i's total, so the store is one coalesced write per warp.
template <int MP>
__device__ __forceinline__ float warp_sums_by_lane(const float (&acc)[MP], int lane) {
  float out = 0.f;
#pragma unroll
  for (int i = 0; i < MP; ++i) {
    float v = acc[i];
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    if (lane == i) out = v;
  }
  return out;
}

template <int MP>
__device__ __forceinline__ int xs_index(int col) {
  return col * MP + (col >> 5) * pad_words<MP>();
}

template <int MP>
__device__ __forceinline__ void fma_x(float (&acc)[MP], const float* xs, int col, float w) {
  const float* p = xs + xs_index<MP>(col);
  if constexpr (MP == 1) {
    acc[0] = fmaf(w, p[0], acc[0]);
  } else if constexpr (MP == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    acc[0] = fmaf(w, v.x, acc[0]);
    acc[1] = fmaf(w, v.y, acc[1]);
  } else {
#pragma unroll
    for (int i = 0; i < MP / 4; ++i) {
      const float4 v = reinterpret_cast<const float4*>(p)[i];
      acc[4 * i + 0] = fmaf(w, v.x, acc[4 * i + 0]);
      acc[4 * i + 1] = fmaf(w, v.y, acc[4 * i + 1]);
      acc[4 * i + 2] = fmaf(w, v.z, acc[4 * i + 2]);
      acc[4 * i + 3] = fmaf(w, v.w, acc[4 * i + 3]);
    }
  }
}

struct GemvParams {
  const void* x;
  const unsigned char* values;  // 16-byte aligned
  int64_t values_numel;
  const uint16_t* masks;
  const int64_t* row_offsets;
  const float* scales;
  const void* bias;
  void* y;
  int m, n, k, n_chunks;
  int group_shift;  // log2(group_size / 16): chunk c uses group c >> group_shift
  int n_groups;
  int slab_chunks;  // chunks of x per slab, a multiple of kSparseStepChunks
  DType x_dtype;
};

// V: value type (float, __nv_bfloat16, __half, int8_t). MP: x rows padded (1, 2, 4, 8, 16). kGrouped: int8
// values with per-group scales (per-channel int8 scales are applied to the row sum).
template <typename V, int MP, bool kGrouped>
__global__ void __launch_bounds__(kMaxWarps * 32) sparse_gemv_kernel(GemvParams p) {
  constexpr int E = Values<V>::kPerUnit;
  constexpr bool kInt8 = std::is_same_v<V, int8_t>;
  // A step's values span at most 512 elements plus one unit of misalignment.
  constexpr int kRounds = (kSparseStepCols / E + 1 + 31) / 32;
  extern __shared__ float4 xs_storage[];
  float* xs = reinterpret_cast<float*>(xs_storage);
  __shared__ uint32_t sm_mask[kMaxWarps][32];
  __shared__ float sm_scale[kMaxWarps][kGrouped ? 32 : 1];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int n = blockIdx.x * warps + warp;
  const bool row_ok = n < p.n;  // warp-uniform
  int64_t run = row_ok ? __ldg(p.row_offsets + n) : 0;
  const uint16_t* mrow = p.masks + static_cast<int64_t>(row_ok ? n : 0) * p.n_chunks;
  const float* srow = kGrouped ? p.scales + static_cast<int64_t>(row_ok ? n : 0) * p.n_groups : nullptr;

  float acc[MP];
#pragma unroll
  for (int i = 0; i < MP; ++i) acc[i] = 0.f;

  for (int s0 = 0; s0 < p.n_chunks; s0 += p.slab_chunks) {
    const int chunks = min(p.slab_chunks, p.n_chunks - s0);
    const int cols = chunks * 16;
    const int col0 = s0 * 16;
    __syncthreads();  // every warp is done with the previous slab
    for (int i = threadIdx.x; i < MP * cols; i += blockDim.x) {
      const int m = i / cols;
      const int col = i - m * cols;
      float v = 0.f;
      if (m < p.m && col0 + col < p.k)
        v = load_act(p.x, static_cast<int64_t>(m) * p.k + col0 + col, p.x_dtype);
      xs[xs_index<MP>(col) + m] = v;
    }
    __syncthreads();
    if (!row_ok) continue;

    for (int c0 = s0; c0 < s0 + chunks; c0 += kSparseStepChunks) {
      const int c = c0 + lane;
      const uint32_t mask = c < p.n_chunks ? static_cast<uint32_t>(__ldg(mrow + c)) : 0u;
      const int cnt = __popc(mask);
      const int incl = warp_inclusive_scan(cnt, lane);
      const int excl = incl - cnt;
      const int total = __shfl_sync(kFullMask, incl, 31);
      __syncwarp();  // the previous step's readers of sm_mask / sm_scale are done
      sm_mask[warp][lane] = mask;
      if constexpr (kGrouped)
        sm_scale[warp][lane] = c < p.n_chunks ? __ldg(srow + (c >> p.group_shift)) : 0.f;
      __syncwarp();
      if (total == 0) continue;  // warp-uniform

      const int64_t e_begin = run;
      const int64_t e_end = run + total;
      run = e_end;
      const int64_t u_begin = e_begin / E;
      const int n_units = static_cast<int>((e_end + E - 1) / E - u_begin);

      uint4 raw[kRounds];
#pragma unroll
      for (int r = 0; r < kRounds; ++r) {
        const int local = r * 32 + lane;
        const int64_t u = u_begin + local;
        raw[r] = make_uint4(0u, 0u, 0u, 0u);
        // Bounded by values.numel() whatever row_offsets says (its contents are not checked on the GPU).
        if (local < n_units && u >= 0 && (u + 1) * E <= p.values_numel)
          raw[r] = load_stream16(p.values + u * 16);
      }

      const int cbase = (c0 - s0) * 16;  // slab column of the step's first chunk
#pragma unroll
      for (int r = 0; r < kRounds; ++r) {
        if (r * 32 >= n_units) break;  // warp-uniform
        const int local = r * 32 + lane;
        const int64_t ue0 = (u_begin + local) * E;
        int q_lo = 0, q_hi = 0, rel = 0;
        if (local < n_units) {
          q_lo = static_cast<int>(e_begin > ue0 ? e_begin - ue0 : 0);
          q_hi = static_cast<int>(e_end - ue0 < E ? e_end - ue0 : E);
          rel = static_cast<int>(ue0 + q_lo - e_begin);  // index of the first value in the step, < total
        }
        // Owning chunk of value `rel`: the number of chunks whose inclusive count is <= rel (bisection over
        // the lanes' scan; all lanes take part, shuffles need the whole warp).
        int owner = 0;
#pragma unroll
        for (int s = 16; s >= 1; s >>= 1) {
          const int v = __shfl_sync(kFullMask, incl, owner + s - 1);
          if (v <= rel) owner += s;
        }
        const int o_excl = __shfl_sync(kFullMask, excl, owner);
        const uint32_t o_mask = __shfl_sync(kFullMask, mask, owner);
        if (q_lo < q_hi) {
          uint32_t rem = drop_low_set_bits(o_mask, rel - o_excl);
          int cc = owner;
          float scale = 1.f;
          if constexpr (kGrouped) scale = sm_scale[warp][cc];
#pragma unroll
          for (int q = 0; q < E; ++q) {
            if (q >= q_lo && q < q_hi) {
              while (rem == 0 && cc < kSparseStepChunks - 1) {  // next chunk with a kept weight
                ++cc;
                rem = sm_mask[warp][cc];
                if constexpr (kGrouped) scale = sm_scale[warp][cc];
              }
              const int col = cbase + cc * 16 + (__ffs(rem) - 1);
              rem &= rem - 1;
              float w = Values<V>::get(raw[r], q);
              if constexpr (kGrouped) w *= scale;
              fma_x<MP>(acc, xs, col, w);
            }
          }
        }
      }
    }
  }
  if (!row_ok) return;

  float out = warp_sums_by_lane<MP>(acc, lane);
  if (lane < p.m) {
    if constexpr (kInt8 && !kGrouped) out *= __ldg(p.scales + n);
    if (p.bias != nullptr) out += load_act(p.bias, n, p.x_dtype);
    store_act(p.y, static_cast<int64_t>(lane) * p.n + n, out, p.x_dtype);
  }
}

template <typename V, int MP, bool kGrouped>
LaunchStatus launch_gemv_variant(GemvParams p, int max_smem_bytes, cudaStream_t stream) {
  // 8 warps per block up to 4 rows of x; 16 from 8 rows, so that each block's x slab (re-read from L2 by
  // every block: M * K * 4 bytes) serves 16 weight rows instead of 8.
  const int warps = MP >= 8 ? 16 : 8;
  const int static_bytes = kMaxWarps * 32 * 8;
  const int budget = std::min(kSlabBudgetBytes, max_smem_bytes - static_bytes);
  const int per_step = slab_floats<MP>(kSparseStepCols) * static_cast<int>(sizeof(float));
  const int steps_needed = (p.n_chunks + kSparseStepChunks - 1) / kSparseStepChunks;
  const int steps = std::max(1, std::min(steps_needed, budget / per_step));
  p.slab_chunks = steps * kSparseStepChunks;
  const int bytes = slab_floats<MP>(steps * kSparseStepCols) * static_cast<int>(sizeof(float));
  if (bytes + static_bytes > max_smem_bytes)
    return LaunchStatus::precondition(
        "one step of the bitmap16 GEMV's x slab does not fit the device's shared memory");
  static std::atomic<bool> done[kMaxDevices];
  if (bytes > 48 * 1024) {
    const cudaError_t err = allow_smem(sparse_gemv_kernel<V, MP, kGrouped>, kSlabBudgetBytes, done);
    if (err != cudaSuccess) return err;
  }
  const int blocks = (p.n + warps - 1) / warps;
  sparse_gemv_kernel<V, MP, kGrouped><<<blocks, warps * 32, bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename V, bool kGrouped>
LaunchStatus launch_gemv_grouped(const GemvParams& p, int max_smem_bytes, cudaStream_t stream) {
  return with_power_of_two<16>(sparse_gemv_tile_m(p.m), [&](auto tile_m) {
    return launch_gemv_variant<V, decltype(tile_m)::value, kGrouped>(p, max_smem_bytes, stream);
  });
}

inline int log2_int(int v) {
  int r = 0;
  while ((1 << (r + 1)) <= v) ++r;
  return r;
}

template <typename V>
LaunchStatus launch_gemv(const SparseLinearArgs& a, cudaStream_t stream) {
  if (a.m < 1 || a.m > kSparseMaxTileM || a.n <= 0 || a.k <= 0)
    return LaunchStatus::precondition("the bitmap16 GEMV needs 1 <= M <= 16, N >= 1 and K >= 1");
  if (reinterpret_cast<std::uintptr_t>(a.values) % 16 != 0)
    return LaunchStatus::precondition("the bitmap16 GEMV needs 16-byte aligned values");
  constexpr bool kInt8 = std::is_same_v<V, int8_t>;
  const bool grouped = kInt8 && a.group_size != -1;
  if (grouped && !sparse_gemv_group_ok(a.group_size))
    return LaunchStatus::precondition("the bitmap16 GEMV needs a power-of-two group size of at least 16");
  if (kInt8 && a.scales == nullptr) return LaunchStatus::precondition("int8 values need scales");
  GemvParams p;
  p.x = a.x;
  p.values = static_cast<const unsigned char*>(a.values);
  p.values_numel = a.values_numel;
  p.masks = a.masks;
  p.row_offsets = a.row_offsets;
  p.scales = a.scales;
  p.bias = a.bias;
  p.y = a.y;
  p.m = a.m;
  p.n = a.n;
  p.k = a.k;
  p.n_chunks = (a.k + 15) / 16;
  p.group_shift = grouped ? log2_int(a.group_size / 16) : 0;
  p.n_groups = grouped ? a.n_groups : 1;
  p.slab_chunks = kSparseStepChunks;
  p.x_dtype = a.x_dtype;
  if constexpr (kInt8) {
    if (grouped) return launch_gemv_grouped<V, true>(p, a.max_smem_bytes, stream);
  }
  return launch_gemv_grouped<V, false>(p, a.max_smem_bytes, stream);
}

}  // namespace fastquant::cuda::sparse_detail
