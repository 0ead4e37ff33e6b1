#pragma once
// Rules the kernel choice of every CUDA op shares (int8_linear_dispatch.h, int4_linear_dispatch.h,
// sparse_linear_dispatch.h). Plain C++ (no CUDA, no torch headers), like the dispatch tables that include it.
#include <atomic>
#include <cstdint>

// The geometry rules of the dispatch headers are also compile-time constants of the kernels.
#if defined(__CUDACC__)
#define FASTQUANT_HOST_DEVICE __host__ __device__
#else
#define FASTQUANT_HOST_DEVICE
#endif

namespace fastquant::cuda {

// Split-K of a tiled tensor-core GEMM with `blocks` output blocks and `k_tiles` k-tiles per block. When fewer
// than 3/4 of the SMs get a block, K is split, aiming at 2 blocks per SM: each split writes its fp32 partial
// tile to a workspace that a finalize kernel sums (3/4 of the SMs busy is close enough: the workspace round
// trip, splits x M x N x 4 bytes mostly in L2, would cost more than the idle quarter). GUESSED: at least 4
// k-tiles per split, at most 8 splits.
inline int mma_split_k(int64_t blocks, int64_t k_tiles, int num_sms) {
  if (num_sms <= 0 || 4 * blocks >= 3 * static_cast<int64_t>(num_sms)) return 1;
  int64_t splits = (2 * static_cast<int64_t>(num_sms) + blocks - 1) / blocks;
  if (splits > k_tiles / 4) splits = k_tiles / 4;
  if (splits > 8) splits = 8;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

// A process-wide run-time cap of a kernel choice (the fastquant._C.set_*_max_m switches): relaxed atomics,
// since a call running concurrently with a change may take either choice (both are correct); a negative
// value is stored as 0.
class RuntimeCap {
 public:
  explicit constexpr RuntimeCap(int64_t initial) : value_(initial) {}
  int64_t get() const { return value_.load(std::memory_order_relaxed); }
  void set(int64_t value) { value_.store(value < 0 ? 0 : value, std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> value_;
};

// Defines a RuntimeCap with this initial value and the functions that read and set it, `int64_t name()` and
// `void set_name(int64_t)` (declared in cuda_info.h and sparse_linear_dispatch.h). At namespace scope in one
// source file.
#define FASTQUANT_DEFINE_RUNTIME_CAP(name, initial) \
  namespace {                                       \
  RuntimeCap g_##name{initial};                     \
  }                                                 \
  int64_t name() { return g_##name.get(); }         \
  void set_##name(int64_t value) { g_##name.set(value); }

}  // namespace fastquant::cuda
