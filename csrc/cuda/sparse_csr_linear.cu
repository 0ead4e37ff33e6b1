// CUDA kernel of fastquant::sparse_csr_linear ("csr16" weight: the kept values of row j are
// values[row_offsets[j] : row_offsets[j + 1]], each with a uint16 column index; see sparse_csr_linear in
// python/fastquant/kernels/reference.py). y[m][j] = sum_i x[m][col_i] * w_i (+ bias[j]), products and sums in
// fp32.
//
// The format exists for very sparse weights, whose decode GEMV is memory-bound on the values and indices
// (2 + sizeof(value) bytes per kept weight, read once), so the kernel is built around streaming them:
// - One warp per weight row, 4..16 rows per block. Lane l loads "unit" u0 + 32 r + l of 8 consecutive
//   entries: 16 bytes of indices and 8 values (32, 16 or 8 bytes), so every load instruction of the warp
//   reads 256 to 512 contiguous bytes (full sectors); 2 rounds of units (512 entries) are issued before any
//   is used. The row's first and last units are partial (lanes mask the entries outside the row). Unlike
//   bitmap16, work is per kept weight only: nothing is spent on pruned columns, however sparse the row.
// - x is staged per block in shared memory as fp32, column-major [col][m] (the bitmap16 GEMV's layout,
//   sparse_linear_gemv.cuh: one float4 gives 4 rows, a pad word per 32 columns spreads the banks), for a
//   tile of MP <= 16 rows of x. Why not gather x through the read-only cache instead: a warp's 32 gathers
//   fall on up to 32 different 128-byte lines, which L1 serves about one line per cycle, while shared memory
//   serves them in a few cycles (random bank conflicts) and gives MP rows per load. Staging costs one
//   coalesced pass over MP x K of x per block (from L2), which the cheaper gathers repay once a block's rows
//   keep more than ~5% of K in total, i.e. above ~0.3% density with 16 warps (an estimate from those
//   per-cycle rates, not measured). The first loads of the weight are issued before staging, so the two
//   overlap. Only when even one row of x does not fit in the device's shared memory (K > ~56K on H100,
//   ~40K on A100) are the gathers read from global memory (through L1), one x row per tile.
// - M is walked in tiles of MP rows inside the kernel (blockIdx.y strides over the tiles when there are too
//   few row blocks to fill the GPU): any M works; each extra tile re-reads the block's rows, mostly from L2.
//   MP is M padded to 1, 2, 4, 8 or 16, halved until the x tile fits the shared-memory budget.
// - fp32 accumulation per lane, a shuffle reduction per row; int8 group scales multiply the weight
//   (w = q * s in fp32, as the reference dequantizes), per-channel scales the finished sum.
//
// Bounds: row_offsets and column_indices are not checked on the GPU (that needs a device-to-host sync per
// call). Each row's range is clamped to [0, values_numel) and entries whose column is >= K are skipped, so
// inconsistent contents give wrong numbers but never an out-of-bounds read. The Python reference path
// checks them (ops.check_sparse_csr_linear_contents), and reference.sparse_column_indices builds valid ones.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cuda/sparse_csr_linear_launch.h"
#include "cuda/sparse_linear_gemv.cuh"  // x tile layout (xs_index, slab_floats, fma_x), value decoding
#include "static_count.h"

namespace fastquant::cuda {
namespace {

using sparse_detail::word_of;

constexpr int kCsrMaxWarps = 16;
constexpr int kUnit = 8;  // entries per lane per load: one 16-byte load of column indices
constexpr int kRounds = 2;
constexpr int kBatchUnits = 32 * kRounds;

// GUESSED (never measured: written on a machine without a GPU), as the bitmap16 GEMV's slab budget: 72 KiB
// leaves room for 3 blocks per SM on H100 (228 KiB) and 2 on A100 (164 KiB). M = 1 fits K = 17408 in it, a
// 4-row tile K = 4352.
constexpr int kCsrSmemBudgetBytes = 72 * 1024;

struct CsrParams {
  const void* x;
  const unsigned char* values;          // 16-byte aligned
  const unsigned char* column_indices;  // uint16 per entry, 16-byte aligned
  int64_t values_numel;
  const int64_t* row_offsets;
  const float* scales;
  const void* bias;
  void* y;
  int m, n, k;
  int m_tiles;           // ceil(m / MP)
  int n_groups;          // int8 group scales: the row stride of scales
  uint32_t group_magic;  // col / group_size == __umulhi(col, group_magic) (see group_magic_of)
  DType x_dtype;
};

// 8 consecutive entries: their column indices and values as raw words (float: 2 x 16 bytes; bf16/fp16: 16
// bytes; int8: 8 bytes in v[0].x, v[0].y).
template <typename V>
struct Unit {
  uint4 idx;
  uint4 v[sizeof(V) == 4 ? 2 : 1];
};

// 8 bytes of int8 values read once (see load_stream16 in sparse_linear_common.cuh for the qualifiers).
__device__ __forceinline__ uint2 load_stream8(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0,%1}, [%2];\n"
               : "=r"(v.x), "=r"(v.y)
               : "l"(p));
  return v;
}

// kWords little-endian words of which only the first valid_bytes exist in memory (the rest read as 0).
template <int kWords>
__device__ __forceinline__ void load_partial(const unsigned char* p, int valid_bytes, uint32_t (&w)[kWords]) {
#pragma unroll
  for (int i = 0; i < kWords; ++i) {
    uint32_t word = 0u;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      if (4 * i + b < valid_bytes) word |= static_cast<uint32_t>(__ldg(p + 4 * i + b)) << (8 * b);
    }
    w[i] = word;
  }
}

// Unit u, with 8 u < values_numel (the caller's u < u_end guarantees it).
template <typename V>
__device__ __forceinline__ Unit<V> load_unit(const CsrParams& p, int64_t u) {
  constexpr int kValueBytes = kUnit * static_cast<int>(sizeof(V));
  const unsigned char* ip = p.column_indices + u * (kUnit * 2);
  const unsigned char* vp = p.values + u * kValueBytes;
  Unit<V> out;
  if ((u + 1) * kUnit <= p.values_numel) {
    out.idx = sparse_detail::load_stream16(ip);
    if constexpr (kValueBytes == 32) {
      out.v[0] = sparse_detail::load_stream16(vp);
      out.v[1] = sparse_detail::load_stream16(vp + 16);
    } else if constexpr (kValueBytes == 16) {
      out.v[0] = sparse_detail::load_stream16(vp);
    } else {
      const uint2 h = load_stream8(vp);
      out.v[0] = make_uint4(h.x, h.y, 0u, 0u);
    }
  } else {
    // The ragged last unit of values (numel % 8 != 0, e.g. csr16 built without the 64 elements of padding):
    // a 16-byte load would read past the allocation.
    const int valid = static_cast<int>(p.values_numel - u * kUnit);
    uint32_t iw[4];
    load_partial<4>(ip, valid * 2, iw);
    out.idx = make_uint4(iw[0], iw[1], iw[2], iw[3]);
    uint32_t vw[kValueBytes / 4];
    load_partial<kValueBytes / 4>(vp, valid * static_cast<int>(sizeof(V)), vw);
    if constexpr (kValueBytes == 8) {
      out.v[0] = make_uint4(vw[0], vw[1], 0u, 0u);
    } else {
      out.v[0] = make_uint4(vw[0], vw[1], vw[2], vw[3]);
      if constexpr (kValueBytes == 32) out.v[1] = make_uint4(vw[4], vw[5], vw[6], vw[7]);
    }
  }
  return out;
}

// The lane's units of a batch: u, u + 32, ... (zeros past the row's last unit).
template <typename V>
__device__ __forceinline__ void load_batch(const CsrParams& p, int64_t u, int64_t u_end,
                                           Unit<V> (&raw)[kRounds]) {
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    if (u + r * 32 < u_end) {
      raw[r] = load_unit<V>(p, u + r * 32);
    } else {
      raw[r] = Unit<V>{};
    }
  }
}

// Entry q (a compile-time constant after unrolling) of a unit.
__device__ __forceinline__ uint32_t column_of(const uint4& idx, int q) {
  return (word_of(idx, q >> 1) >> ((q & 1) * 16)) & 0xFFFFu;
}

template <typename V>
__device__ __forceinline__ float value_of(const Unit<V>& u, int q) {
  if constexpr (std::is_same_v<V, float>) {
    return __uint_as_float(word_of(u.v[q >> 2], q & 3));
  } else {
    return sparse_detail::Values<V>::get(u.v[0], q);
  }
}

template <typename T>
__device__ __forceinline__ float load_x(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return __ldg(p);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(__ldg(p));
  } else {
    return __half2float(__ldg(p));
  }
}

// x rows [0, rows) of the tile (row-major, k columns) into xs as fp32 [col][MP], zeros for rows >= rows.
// Thread t takes whole columns: the global loads of each row are coalesced across the warp and the MP values
// of a column go to shared memory as float4 stores (consecutive columns: no bank conflicts).
template <typename T, int MP>
__device__ __forceinline__ void stage_x(const T* x, int k, int rows, float* xs) {
  for (int col = threadIdx.x; col < k; col += blockDim.x) {
    float v[MP];
#pragma unroll
    for (int i = 0; i < MP; ++i) v[i] = i < rows ? load_x(x + static_cast<int64_t>(i) * k + col) : 0.f;
    float* dst = xs + sparse_detail::xs_index<MP>(col);
    if constexpr (MP == 1) {
      dst[0] = v[0];
    } else if constexpr (MP == 2) {
      *reinterpret_cast<float2*>(dst) = make_float2(v[0], v[1]);
    } else {
#pragma unroll
      for (int i = 0; i < MP / 4; ++i)
        reinterpret_cast<float4*>(dst)[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
    }
  }
}

// V: value type (float, __nv_bfloat16, __half, int8_t). MP: x rows per tile (1, 2, 4, 8, 16). kStaged: x tile
// in shared memory (else MP == 1 and x gathered from global memory). kGrouped: int8 values with group scales.
template <typename V, int MP, bool kStaged, bool kGrouped>
__global__ void __launch_bounds__(kCsrMaxWarps * 32) sparse_csr_kernel(CsrParams p) {
  static_assert(kStaged || MP == 1, "the unstaged kernel reads one row of x per tile");
  constexpr bool kInt8 = std::is_same_v<V, int8_t>;
  extern __shared__ float4 xs_storage[];
  float* xs = reinterpret_cast<float*>(xs_storage);

  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  const int n = blockIdx.x * warps + (threadIdx.x >> 5);
  const bool row_ok = n < p.n;  // warp-uniform
  int64_t lo = 0;
  int64_t hi = 0;
  float channel_scale = 1.f;
  float bias = 0.f;
  const float* srow = p.scales;
  if (row_ok) {
    const int64_t begin = __ldg(p.row_offsets + n);
    const int64_t end = __ldg(p.row_offsets + n + 1);
    lo = begin > 0 ? begin : 0;
    hi = end < p.values_numel ? end : p.values_numel;
    if constexpr (kInt8 && !kGrouped) channel_scale = __ldg(p.scales + n);
    if constexpr (kGrouped) srow = p.scales + static_cast<int64_t>(n) * p.n_groups;
    if (p.bias != nullptr) bias = sparse_detail::load_act(p.bias, n, p.x_dtype);
  }
  const int64_t u_first = lo / kUnit;
  const int64_t u_end = hi > lo ? (hi + kUnit - 1) / kUnit : u_first;

  // Tiles are block-uniform (the barriers of the staging are inside).
  for (int tile = blockIdx.y; tile < p.m_tiles; tile += gridDim.y) {
    const int m0 = tile * MP;
    const int rows = min(MP, p.m - m0);
    Unit<V> raw[kRounds];
    int64_t ub = u_first;
    load_batch<V>(p, ub + lane, u_end, raw);  // in flight while x is staged

    if constexpr (kStaged) {
      __syncthreads();  // every warp is done with the previous tile
      const int64_t x_off = static_cast<int64_t>(m0) * p.k;
      switch (p.x_dtype) {
        case DType::kFloat32:
          stage_x<float, MP>(static_cast<const float*>(p.x) + x_off, p.k, rows, xs);
          break;
        case DType::kBFloat16:
          stage_x<__nv_bfloat16, MP>(static_cast<const __nv_bfloat16*>(p.x) + x_off, p.k, rows, xs);
          break;
        default:
          stage_x<__half, MP>(static_cast<const __half*>(p.x) + x_off, p.k, rows, xs);
          break;
      }
      __syncthreads();
    }

    float acc[MP];
#pragma unroll
    for (int i = 0; i < MP; ++i) acc[i] = 0.f;

    while (ub < u_end) {  // warp-uniform
#pragma unroll
      for (int r = 0; r < kRounds; ++r) {
        if (ub + r * 32 >= u_end) break;  // warp-uniform
        const int64_t e0 = (ub + r * 32 + lane) * kUnit;
        // Entries [q_lo, q_hi) of the unit belong to the row (none for lanes past its end).
        const int q_lo = lo > e0 ? static_cast<int>(lo - e0) : 0;
        const int q_hi = hi - e0 >= kUnit ? kUnit : (hi > e0 ? static_cast<int>(hi - e0) : 0);
#pragma unroll
        for (int q = 0; q < kUnit; ++q) {
          const uint32_t col = column_of(raw[r].idx, q);
          if (q >= q_lo && q < q_hi && col < static_cast<uint32_t>(p.k)) {
            float w = value_of<V>(raw[r], q);
            if constexpr (kGrouped) w *= __ldg(srow + __umulhi(col, p.group_magic));
            if constexpr (kStaged) {
              sparse_detail::fma_x<MP>(acc, xs, static_cast<int>(col), w);
            } else {
              const float xv = sparse_detail::load_act(p.x, static_cast<int64_t>(m0) * p.k + col, p.x_dtype);
              acc[0] = fmaf(w, xv, acc[0]);
            }
          }
        }
      }
      ub += kBatchUnits;
      if (ub < u_end) load_batch<V>(p, ub + lane, u_end, raw);
    }
    if (!row_ok) continue;

    float out = sparse_detail::warp_sums_by_lane<MP>(acc, lane);
    if (lane < rows) {
      sparse_detail::store_act(p.y, static_cast<int64_t>(m0 + lane) * p.n + n, out * channel_scale + bias,
                               p.x_dtype);
    }
  }
}

// Shared memory of an x tile of mp rows (the layout of sparse_detail::slab_floats).
int staged_bytes(int mp, int k) {
  const int pad = mp == 1 ? 1 : (mp == 2 ? 2 : 4);
  return (k * mp + (k / 32) * pad) * static_cast<int>(sizeof(float));
}

// ceil(2^32 / g): for col < 2^16 and 16 <= g <= 2^16, col * m = 2^32 col / g + col * e / g with e < g, and
// col * e < 2^32 keeps the floor exact. Groups past 2^16 columns hold every column in group 0.
uint32_t group_magic_of(int group_size) {
  if (group_size > 65536) return 0u;
  const uint64_t g = static_cast<uint64_t>(group_size);
  return static_cast<uint32_t>(((uint64_t{1} << 32) + g - 1) / g);
}

struct Launch {
  int warps;
  int smem_bytes;
  int max_smem_bytes;
  int num_sms;
};

template <typename V, int MP, bool kStaged, bool kGrouped>
cudaError_t launch_variant(CsrParams p, const Launch& l, cudaStream_t stream) {
  p.m_tiles = static_cast<int>((static_cast<int64_t>(p.m) + MP - 1) / MP);
  static std::atomic<bool> done[kMaxDevices];
  if (l.smem_bytes > 48 * 1024) {
    // The device's whole opt-in (a per-device constant, so one attribute call per device covers every K).
    const cudaError_t err = allow_smem(sparse_csr_kernel<V, MP, kStaged, kGrouped>, l.max_smem_bytes, done);
    if (err != cudaSuccess) return err;
  }
  const int blocks_x = (p.n + l.warps - 1) / l.warps;
  // Enough blocks for 2 per SM: with few weight rows, the tiles of x are spread over blockIdx.y.
  const int64_t want_y = (2 * static_cast<int64_t>(l.num_sms > 0 ? l.num_sms : 1) + blocks_x - 1) / blocks_x;
  int64_t blocks_y = want_y < p.m_tiles ? want_y : p.m_tiles;
  if (blocks_y > 65535) blocks_y = 65535;
  if (blocks_y < 1) blocks_y = 1;
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y));
  sparse_csr_kernel<V, MP, kStaged, kGrouped><<<grid, l.warps * 32, l.smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename V, bool kGrouped>
cudaError_t launch_tile(const CsrParams& p, int mp, bool staged, const Launch& l, cudaStream_t stream) {
  if (!staged) return launch_variant<V, 1, false, kGrouped>(p, l, stream);
  return with_power_of_two<16>(
      mp, [&](auto rows) { return launch_variant<V, decltype(rows)::value, true, kGrouped>(p, l, stream); });
}

}  // namespace

LaunchStatus launch_sparse_csr_linear(const SparseCsrLinearArgs& a, cudaStream_t stream) {
  if (a.m <= 0 || a.n <= 0 || a.k <= 0 || a.k > kSparseCsrMaxInFeatures || a.values_numel < 0)
    return LaunchStatus::precondition(
        "the csr16 kernel needs M, N >= 1, 1 <= K <= 65536 and values_numel >= 0");
  if (reinterpret_cast<std::uintptr_t>(a.values) % 16 != 0 ||
      reinterpret_cast<std::uintptr_t>(a.column_indices) % 16 != 0)
    return LaunchStatus::precondition("the csr16 kernel needs 16-byte aligned values and column indices");
  const bool int8 = a.values_dtype == DType::kInt8;
  const bool grouped = int8 && a.group_size != -1;
  if (int8 && a.scales == nullptr) return LaunchStatus::precondition("int8 values need scales");
  if (grouped && (a.group_size <= 0 || a.n_groups < (a.k + a.group_size - 1) / a.group_size))
    return LaunchStatus::precondition("the group size must be positive and the scales must cover K");

  CsrParams p;
  p.x = a.x;
  p.values = static_cast<const unsigned char*>(a.values);
  p.column_indices = reinterpret_cast<const unsigned char*>(a.column_indices);
  p.values_numel = a.values_numel;
  p.row_offsets = a.row_offsets;
  p.scales = a.scales;
  p.bias = a.bias;
  p.y = a.y;
  p.m = a.m;
  p.n = a.n;
  p.k = a.k;
  p.m_tiles = 1;
  p.n_groups = grouped ? a.n_groups : 1;
  p.group_magic = grouped ? group_magic_of(a.group_size) : 0u;
  p.x_dtype = a.x_dtype;

  // The largest tile of x rows that fits the budget; one row past it takes the device's whole opt-in shared
  // memory (one block per SM: 16 warps), and past that x is gathered from global memory.
  Launch l;
  l.max_smem_bytes = a.max_smem_bytes;
  l.num_sms = a.num_sms;
  const int budget = kCsrSmemBudgetBytes < a.max_smem_bytes ? kCsrSmemBudgetBytes : a.max_smem_bytes;
  int mp = sparse_gemv_tile_m(a.m < kSparseMaxTileM ? a.m : kSparseMaxTileM);
  while (mp > 1 && staged_bytes(mp, a.k) > budget) mp >>= 1;
  const int bytes = staged_bytes(mp, a.k);
  const bool staged = bytes <= a.max_smem_bytes;
  l.smem_bytes = staged ? bytes : 0;
  l.warps = kCsrMaxWarps;
  if (bytes <= budget) {
    // Several blocks per SM: fewer rows per block when there are too few rows to give every SM a block.
    while (l.warps > 4 && (a.n + l.warps - 1) / l.warps < a.num_sms) l.warps >>= 1;
  }

  switch (a.values_dtype) {
    case DType::kFloat32:
      return launch_tile<float, false>(p, mp, staged, l, stream);
    case DType::kBFloat16:
      return launch_tile<__nv_bfloat16, false>(p, mp, staged, l, stream);
    case DType::kFloat16:
      return launch_tile<__half, false>(p, mp, staged, l, stream);
    case DType::kInt8:
      return grouped ? launch_tile<int8_t, true>(p, mp, staged, l, stream)
                     : launch_tile<int8_t, false>(p, mp, staged, l, stream);
  }
  return LaunchStatus::precondition("unknown values dtype code");
}

}  // namespace fastquant::cuda
