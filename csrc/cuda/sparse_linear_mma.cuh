#pragma once
// Tensor-core GEMM for bitmap16 weights with bf16/fp16 activations (M > 16): y = x W^T (+ bias).
//
// The zeros of an unstructured sparse weight cannot be skipped by a 16 x 8 x 16 tensor-core step, so the
// kernel densifies each weight tile into shared memory and runs mma.sync on it: it reads the format once per
// 128 x rows (values + masks, no dense temporary in HBM) and multiplies on tensor cores.
//
// Roles as in the decode GEMV of int8 (int8_gemv_mma.cuh): y^T = W x^T, the weight is the 16-row "A" operand
// of mma.m16n8k16 and x the 8-column "B" operand, so M pads to multiples of 8 (M = 17 costs 3 n=8 tiles, not
// 2 m=16 tiles) and one A fragment (the expensive, densified side) serves every x tile of the warp.
//
// Block: 128 weight rows x BM x rows (BM = 32, 64, 128), 8 warps as 4 (N) x 2 (M), warp tile 32 x BM/2;
// k-tiles of 64 columns (4 mask chunks). Per k-tile and thread:
// - Ownership for the decode: thread 2r + h owns weight row r, columns [32h, 32h + 32) of the tile: two mask
//   chunks (one 32-bit mask), at most 32 values, contiguous in `values` from an offset that is the row's
//   running offset plus the partner thread's count (one shuffle: the pair are adjacent lanes).
// - Values: up to RU 16-byte units per thread (5 for 16-bit values) with ordinary 16-byte global loads into
//   registers, issued one k-tile ahead (latency hidden behind a tile of mma + decode), then written to a
//   thread-private shared-memory slot laid out word-interleaved ([word][thread]): the decode reads a value at
//   a data-dependent position, and with that layout lane l always hits bank l, so those reads never conflict.
//   (16-byte cp.async cannot write that layout; a per-thread contiguous slot would conflict 4 ways.)
// - Decode: per column, the rank of its bit among the kept bits below it (incremental) gives the value's
//   position; unkept columns are zero. Columns go in pairs into 32-bit words and 16-byte stores (4 per
//   thread) of the densified A tile (bf16/fp16, 128 x 64, 16-byte chunks XOR-swizzled by row so that both the
//   stores and the ldmatrix reads take the minimum 4 wavefronts). Two A buffers: the decode of tile k + 1 and
//   the mma of tile k are in the same loop iteration with no barrier between them, so the ALU work of one and
//   the tensor-core work of the other overlap within each warp; one barrier per k-tile.
// - x: 3-stage cp.async ring of BM x 64 tiles (fixed positions, so it can run further ahead than the values),
//   same swizzle; ldmatrix.x4 for both operands.
// - Rounding: float values other than x's dtype and group-scaled int8 (q * s in fp32) are rounded once to x's
//   dtype (the rounding of F.linear(x, W.to(x.dtype))); int8 codes with per-channel scales are exact in
//   bf16/fp16 and the scale multiplies the fp32 sum. fp32 accumulation, output in x's dtype.
// - Split-K (sparse_mma_splits): split z starts at k-tile z * per_split; its per-row start offsets come from
//   launch_sparse_mma_offsets (one pass over the masks), partial sums go to workspace[z][m][n] and a finalize
//   kernel (detail::splitk_finalize_kernel) sums them in a fixed order (deterministic, CUDA-graph safe) and
//   applies scale and bias.
//
// Every value load is bounded by values_numel whatever row_offsets say (its contents are not checked on the
// GPU), as in the GEMV.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cuda/int8_gemv_mma.cuh"  // detail::Act<T>: pack, mma.m16n8k16, conversions
#include "cuda/sparse_linear_common.cuh"

namespace fastquant::cuda::sparse_detail {

using detail::Act;

constexpr int kMmaBN = kSparseMmaTileN;
constexpr int kMmaBK = kSparseMmaTileK;
constexpr int kMmaThreads = kSparseMmaThreads;
constexpr int kMmaXStages = kSparseMmaXStages;

// Element offset of 16-byte chunk `chunk` (0..7) of row `row` in a 64-column tile of 16-bit elements.
__device__ __forceinline__ int swz(int row, int chunk) { return row * kMmaBK + ((chunk ^ (row & 7)) << 3); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// 16 bytes of packed values. Cached in L1 (unlike the GEMV's stream loads): the unit that holds the boundary
// between two threads' (or two k-tiles') values is read twice, the second time from L1. 256-byte L2
// prefetch: the row's next k-tile is what this thread asks for next.
__device__ __forceinline__ uint4 load_values16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Element `sub` of a 32-bit word of values, as fp32 (int8: exact, without I2F, see Values<int8_t>).
template <typename V>
__device__ __forceinline__ float word_elem(uint32_t w, int sub) {
  if constexpr (std::is_same_v<V, float>) {
    (void)sub;
    return __uint_as_float(w);
  } else if constexpr (std::is_same_v<V, __nv_bfloat16>) {
    return __uint_as_float(sub ? (w & 0xFFFF0000u) : (w << 16));
  } else if constexpr (std::is_same_v<V, __half>) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(sub ? (w >> 16) : (w & 0xFFFFu))));
  } else {
    return __uint_as_float(__byte_perm(w ^ 0x80808080u, 0x4B000000u, 0x7540 + sub)) - 8388736.0f;
  }
}

struct MmaParams {
  const uint16_t* x;            // m x k, bf16 or fp16 bits
  const unsigned char* values;  // 16-byte aligned
  int64_t values_numel;
  const uint16_t* masks;
  const int64_t* row_offsets;
  int64_t*
      split_offsets;    // n x splits (written by launch_sparse_mma_offsets), or nullptr when gridDim.z == 1
  const float* scales;  // int8 values only
  const uint16_t* bias;
  uint16_t* y;
  float* workspace;  // [gridDim.z][m][n] when gridDim.z > 1
  int m, n, k, n_chunks;
  int group_chunks;  // group_size / 16 (grouped int8 only)
  int n_groups;
  int per_split;   // k-tiles per split
  bool x_aligned;  // k % 8 == 0 and x 16-byte aligned: 16-byte cp.async of x
};

// kScale: 0 float values, 1 int8 per-channel (applied to the sum), 2 int8 per-group (applied to the weight).
template <typename T, typename V, int BM, int kScale>
__global__ void __launch_bounds__(kMmaThreads, 2) sparse_mma_kernel(MmaParams p) {
  constexpr int E = Values<V>::kPerUnit;
  constexpr int RU = sparse_mma_raw_units(Values<V>::kCode);
  constexpr int EW = E / 4;    // elements per 32-bit word
  constexpr int NT = BM / 16;  // n=8 tiles per warp (warp tile BM / 2 x rows)
  constexpr bool kSameType = std::is_same_v<V, T>;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* as = reinterpret_cast<uint16_t*>(smem);                            // [2][128 * 64]
  uint16_t* xs = as + 2 * kMmaBN * kMmaBK;                                     // [stages][BM * 64]
  uint32_t* ws = reinterpret_cast<uint32_t*>(xs + kMmaXStages * BM * kMmaBK);  // [RU * 4][256]

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t4 = lane & 3;
  const int wn = warp >> 1;  // 0..3: weight rows wn * 32 ..
  const int wm = warp & 1;   // 0..1: x rows wm * BM / 2 ..
  const int n_block = blockIdx.x * kMmaBN;
  const int m_block = blockIdx.y * BM;
  const int k_tiles_all = (p.k + kMmaBK - 1) / kMmaBK;
  const int kt_begin = blockIdx.z * p.per_split;
  const int k_tiles = max(0, min(k_tiles_all, kt_begin + p.per_split) - kt_begin);

  // Decode ownership.
  const int drow = tid >> 1;
  const int half = tid & 1;
  const int n_own = n_block + drow;
  const bool row_ok = n_own < p.n;
  const uint16_t* mrow = p.masks + static_cast<int64_t>(row_ok ? n_own : 0) * p.n_chunks;
  int64_t row_run = 0;  // the row's offset in values at the start of the next k-tile to load
  if (row_ok) {
    row_run = p.split_offsets != nullptr
                  ? p.split_offsets[static_cast<int64_t>(n_own) * gridDim.z + blockIdx.z]
                  : __ldg(p.row_offsets + n_own);
  }
  // Group of this thread's first chunk, kept incrementally (chunks advance by 4 per k-tile): no division in
  // the loop.
  int grp = 0, grp_rem = 0;
  const float* srow = nullptr;
  if constexpr (kScale == 2) {
    srow = p.scales + static_cast<int64_t>(row_ok ? n_own : 0) * p.n_groups;
    const int c0 = kt_begin * 4 + 2 * half;
    grp = c0 / p.group_chunks;
    grp_rem = c0 - grp * p.group_chunks;
  }

  auto load_mask = [&](int t) -> uint32_t {  // t counts from kt_begin
    const int c = (kt_begin + t) * 4 + 2 * half;
    if (!row_ok || t >= k_tiles) return 0u;
    const uint32_t lo = c < p.n_chunks ? static_cast<uint32_t>(__ldg(mrow + c)) : 0u;
    const uint32_t hi = c + 1 < p.n_chunks ? static_cast<uint32_t>(__ldg(mrow + c + 1)) : 0u;
    return lo | (hi << 16);
  };

  // Values of tile t (mask `mask`) into registers; called for consecutive t, warp-uniformly (shuffle).
  uint4 raw[RU];
  uint32_t raw_mask = 0;
  int raw_shift = 0;
  float raw_scale[2] = {1.f, 1.f};
  auto load_raw = [&](uint32_t mask) {
    const int cnt = __popc(mask);
    const int partner = __shfl_xor_sync(kFullMask, cnt, 1);
    const int64_t start = row_run + (half ? partner : 0);
    row_run += cnt + partner;
    int64_t ub = 0;
    int shift = 0, n_units = 0;
    if (start >= 0) {
      ub = start / E;
      shift = static_cast<int>(start - ub * E);
      n_units = (shift + cnt + E - 1) / E;
    }
#pragma unroll
    for (int j = 0; j < RU; ++j) {
      const int64_t u = ub + j;
      raw[j] = make_uint4(0u, 0u, 0u, 0u);
      // Bounded by values.numel() whatever row_offsets says.
      if (j < n_units && (u + 1) * E <= p.values_numel) raw[j] = load_values16(p.values + u * 16);
    }
    raw_mask = mask;
    raw_shift = shift;
    if constexpr (kScale == 2) {
      const int g1 = grp + (grp_rem + 1 >= p.group_chunks ? 1 : 0);
      raw_scale[0] = (mask & 0xFFFFu) != 0u && grp < p.n_groups ? __ldg(srow + grp) : 0.f;
      raw_scale[1] = (mask >> 16) != 0u && g1 < p.n_groups ? __ldg(srow + g1) : 0.f;
      grp_rem += 4;
      while (grp_rem >= p.group_chunks) {
        grp_rem -= p.group_chunks;
        ++grp;
      }
    }
  };

  // Registers -> the thread's word-interleaved slot, then decode into A buffer `buf`.
  auto decode = [&](int buf) {
#pragma unroll
    for (int j = 0; j < RU; ++j) {
      ws[(4 * j + 0) * kMmaThreads + tid] = raw[j].x;
      ws[(4 * j + 1) * kMmaThreads + tid] = raw[j].y;
      ws[(4 * j + 2) * kMmaThreads + tid] = raw[j].z;
      ws[(4 * j + 3) * kMmaThreads + tid] = raw[j].w;
    }
    const uint32_t mask = raw_mask;
    const int shift = raw_shift;
    [[maybe_unused]] const float sc0 = raw_scale[0], sc1 = raw_scale[1];
    uint16_t* arow = as + buf * (kMmaBN * kMmaBK);
    int rank = 0;
    // The word holding column j's value (0 when the column is not kept: no load, and 0 decodes to +0 in
    // every value type) and the element's index in it.
    auto fetch = [&](int j, int& sub) -> uint32_t {
      const bool kept = (mask >> j) & 1u;
      const int idx = shift + rank;
      sub = idx % EW;
      rank += kept ? 1 : 0;
      return kept ? ws[(idx / EW) * kMmaThreads + tid] : 0u;  // lane l reads bank l: no conflict
    };
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // 8 columns = one 16-byte chunk of the A row
      uint32_t words[4];
#pragma unroll
      for (int pr = 0; pr < 4; ++pr) {
        const int j = q * 8 + pr * 2;
        int s0 = 0, s1 = 0;
        const uint32_t w0 = fetch(j, s0);
        const uint32_t w1 = fetch(j + 1, s1);
        if constexpr (kSameType) {
          words[pr] = (s0 ? (w0 >> 16) : (w0 & 0xFFFFu)) | ((s1 ? (w1 >> 16) : (w1 & 0xFFFFu)) << 16);
        } else {
          float f0 = word_elem<V>(w0, s0);
          float f1 = word_elem<V>(w1, s1);
          if constexpr (kScale == 2) {
            f0 *= j < 16 ? sc0 : sc1;
            f1 *= j < 16 ? sc0 : sc1;
          }
          words[pr] = Act<T>::pack(f0, f1);
        }
      }
      *reinterpret_cast<uint4*>(arow + swz(drow, 4 * half + q)) =
          make_uint4(words[0], words[1], words[2], words[3]);
    }
  };

  auto load_x = [&](int stage, int t) {
    const int k_base = (kt_begin + t) * kMmaBK;
    uint16_t* xt = xs + stage * (BM * kMmaBK);
#pragma unroll
    for (int i = 0; i < BM * 8 / kMmaThreads; ++i) {
      const int idx = tid + i * kMmaThreads;
      const int r = idx >> 3;
      const int c = idx & 7;
      const int gm = m_block + r;
      const int gk = k_base + c * 8;
      if (p.x_aligned) {
        const bool ok = gm < p.m && gk < p.k;  // k % 8 == 0: a 16-byte chunk is all in or all out
        cp_async16(xt + swz(r, c), p.x + (ok ? static_cast<int64_t>(gm) * p.k + gk : 0), ok);
      } else {
        // Rows not 16-byte aligned (k % 8 != 0): element loads, synchronous (rare shapes).
        uint32_t w[4] = {0u, 0u, 0u, 0u};
        if (gm < p.m) {
          const uint16_t* src = p.x + static_cast<int64_t>(gm) * p.k;
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (gk + e < p.k) w[e >> 1] |= static_cast<uint32_t>(__ldg(src + gk + e)) << (16 * (e & 1));
          }
        }
        *reinterpret_cast<uint4*>(xt + swz(r, c)) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  };

  float acc[2][NT][4];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;
  }

  // Prologue: x tiles 0 .. stages - 2 (one commit group per tile slot, empty past the last tile); values
  // of tile 0 decoded into A[0]; values of tile 1 in flight.
#pragma unroll
  for (int st = 0; st < kMmaXStages - 1; ++st) {
    if (st < k_tiles) load_x(st, st);
    cp_async_commit();
  }
  uint32_t mask_next = load_mask(0);
  if (k_tiles > 0) {
    load_raw(mask_next);
    mask_next = load_mask(1);
    decode(0);
    if (k_tiles > 1) {
      load_raw(mask_next);
      mask_next = load_mask(2);
    }
  }
  cp_async_wait<kMmaXStages - 2>();
  __syncthreads();

  for (int kt = 0; kt < k_tiles; ++kt) {
    // Refill the x stage of tile kt - 1 (released by the barrier that ended the previous iteration).
    if (kt + kMmaXStages - 1 < k_tiles) load_x((kt + kMmaXStages - 1) % kMmaXStages, kt + kMmaXStages - 1);
    cp_async_commit();
    if (kt + 1 < k_tiles) {  // warp-uniform
      decode((kt + 1) & 1);  // tile kt + 1: its values arrived during the previous iteration
      if (kt + 2 < k_tiles) {
        load_raw(mask_next);
        mask_next = load_mask(kt + 3);
      }
    }

    const uint16_t* at = as + (kt & 1) * (kMmaBN * kMmaBK);
    const uint16_t* xt = xs + (kt % kMmaXStages) * (BM * kMmaBK);
#pragma unroll
    for (int ks = 0; ks < kMmaBK / 16; ++ks) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int r = wn * 32 + mt * 16 + (lane & 15);
        ldmatrix_x4(a[mt], at + swz(r, 2 * ks + (lane >> 4)));
      }
      uint32_t b[NT][2];
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        const int r = wm * (BM / 2) + np * 16 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t v[4];
        ldmatrix_x4(v, xt + swz(r, 2 * ks + ((lane >> 3) & 1)));
        b[2 * np][0] = v[0];
        b[2 * np][1] = v[1];
        b[2 * np + 1][0] = v[2];
        b[2 * np + 1][1] = v[3];
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) Act<T>::mma(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
      }
    }
    cp_async_wait<kMmaXStages - 2>();  // x of tile kt + 1
    __syncthreads();  // A[(kt + 1) & 1] and x tile kt + 1 complete; A[kt & 1] and its x stage free
  }

  // C fragment: acc[mt][nt][v] is weight row wn * 32 + 16 mt + g + 8 (v / 2), x row wm * BM / 2 + 8 nt + 2 t4
  // + v % 2.
  const T* bias = reinterpret_cast<const T*>(p.bias);
  T* y = reinterpret_cast<T*>(p.y);
  const bool split = gridDim.z > 1;
  float* partial = split ? p.workspace + static_cast<int64_t>(blockIdx.z) * p.m * p.n : nullptr;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int hv = 0; hv < 2; ++hv) {
      const int n = n_block + wn * 32 + mt * 16 + g + 8 * hv;
      if (n >= p.n) continue;
      float scale = 1.f, bv = 0.f;
      if (!split) {
        if constexpr (kScale == 1) scale = __ldg(p.scales + n);
        if (bias != nullptr) bv = Act<T>::to_float(bias[n]);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int m = m_block + wm * (BM / 2) + nt * 8 + 2 * t4 + e;
          if (m >= p.m) continue;
          const float v = acc[mt][nt][2 * hv + e];
          const int64_t o = static_cast<int64_t>(m) * p.n + n;
          if (split) {
            partial[o] = v;  // raw partial sums; the finalize kernel applies scale and bias once
          } else {
            y[o] = Act<T>::from_float(v * scale + bv);
          }
        }
      }
    }
  }
}

// Start offset of every split of every row: out[n][z] = row_offsets[n] + popcount of the row's masks before
// chunk z * split_chunks (sparse_linear_mma_offsets.cu).
cudaError_t launch_sparse_mma_offsets(const uint16_t* masks, const int64_t* row_offsets, int64_t* out, int n,
                                      int n_chunks, int splits, int split_chunks, cudaStream_t stream);

template <typename T, typename V, int BM, int kScale>
LaunchStatus launch_mma_variant(const MmaParams& p, int splits, cudaStream_t stream) {
  constexpr int bytes = sparse_mma_smem_bytes(Values<V>::kCode, BM);
  static std::atomic<bool> done[kMaxDevices];  // per instantiation: each kernel needs its own attribute
  cudaError_t err = allow_smem(sparse_mma_kernel<T, V, BM, kScale>, bytes, done);
  if (err != cudaSuccess) return err;
  if (splits > 1) {
    err = launch_sparse_mma_offsets(p.masks, p.row_offsets, p.split_offsets, p.n, p.n_chunks, splits,
                                    p.per_split * (kMmaBK / 16), stream);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((p.n + kMmaBN - 1) / kMmaBN, (p.m + BM - 1) / BM, splits);
  sparse_mma_kernel<T, V, BM, kScale><<<grid, kMmaThreads, bytes, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  return detail::launch_splitk_finalize<T>(p.workspace, splits, kScale == 1 ? p.scales : nullptr, p.bias, p.y,
                                           static_cast<int64_t>(p.m) * p.n, p.n, stream);
}

template <typename T, typename V, int kScale>
LaunchStatus launch_mma_bm(const MmaParams& p, int block_m, int splits, cudaStream_t stream) {
  switch (block_m) {
    case 32:
      return launch_mma_variant<T, V, 32, kScale>(p, splits, stream);
    case 64:
      return launch_mma_variant<T, V, 64, kScale>(p, splits, stream);
    default:
      // sparse_mma_block_m never gives fp32 values 128 rows (register spills): not instantiated.
      if constexpr (std::is_same_v<V, float>) {
        return LaunchStatus::precondition("the bitmap16 mma kernel has no 128-row block for float32 values");
      } else {
        return launch_mma_variant<T, V, 128, kScale>(p, splits, stream);
      }
  }
}

template <typename T, typename V>
LaunchStatus launch_mma_t(const MmaParams& p, bool grouped, int block_m, int splits, cudaStream_t stream) {
  if constexpr (std::is_same_v<V, int8_t>) {
    if (grouped) return launch_mma_bm<T, V, 2>(p, block_m, splits, stream);
    return launch_mma_bm<T, V, 1>(p, block_m, splits, stream);
  } else {
    (void)grouped;
    return launch_mma_bm<T, V, 0>(p, block_m, splits, stream);
  }
}

template <typename V>
LaunchStatus launch_mma(const SparseLinearArgs& a, cudaStream_t stream) {
  if (a.m <= 0 || a.n <= 0 || a.k <= 0)
    return LaunchStatus::precondition("the bitmap16 mma kernel needs M, N and K >= 1");
  if (a.x_dtype == DType::kFloat32)
    return LaunchStatus::precondition("the bitmap16 mma kernel takes bfloat16 or float16 x, not float32");
  if (reinterpret_cast<std::uintptr_t>(a.values) % 16 != 0)
    return LaunchStatus::precondition("the bitmap16 mma kernel needs 16-byte aligned values");
  constexpr bool kInt8 = std::is_same_v<V, int8_t>;
  const bool grouped = kInt8 && a.group_size != -1;
  if (kInt8 && a.scales == nullptr) return LaunchStatus::precondition("int8 values need scales");
  if (grouped && (a.group_size < 16 || a.group_size % 16 != 0))
    return LaunchStatus::precondition("the bitmap16 mma kernel needs a group size that is a multiple of 16");
  const int block_m = sparse_mma_block_m(a.m, Values<V>::kCode, a.max_smem_bytes);
  if (block_m == 0)
    return LaunchStatus::precondition("no block of the bitmap16 mma kernel fits the device's shared memory");
  const int splits = sparse_mma_splits(a.m, a.n, a.k, block_m, a.num_sms);
  if (splits > 1 && (a.workspace == nullptr || a.split_offsets == nullptr))
    return LaunchStatus::precondition("the bitmap16 mma kernel splits K but got no workspace");
  const int k_tiles = (a.k + kMmaBK - 1) / kMmaBK;
  MmaParams p;
  p.x = static_cast<const uint16_t*>(a.x);
  p.values = static_cast<const unsigned char*>(a.values);
  p.values_numel = a.values_numel;
  p.masks = a.masks;
  p.row_offsets = a.row_offsets;
  p.split_offsets = splits > 1 ? a.split_offsets : nullptr;
  p.scales = a.scales;
  p.bias = static_cast<const uint16_t*>(a.bias);
  p.y = static_cast<uint16_t*>(a.y);
  p.workspace = a.workspace;
  p.m = a.m;
  p.n = a.n;
  p.k = a.k;
  p.n_chunks = (a.k + 15) / 16;
  p.group_chunks = grouped ? a.group_size / 16 : 1;
  p.n_groups = grouped ? a.n_groups : 1;
  p.per_split = (k_tiles + splits - 1) / splits;
  p.x_aligned = a.k % 8 == 0 && reinterpret_cast<std::uintptr_t>(a.x) % 16 == 0;
  if (a.x_dtype == DType::kBFloat16)
    return launch_mma_t<__nv_bfloat16, V>(p, grouped, block_m, splits, stream);
  return launch_mma_t<__half, V>(p, grouped, block_m, splits, stream);
}

}  // namespace fastquant::cuda::sparse_detail
