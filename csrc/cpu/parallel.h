#pragma once
// parallel_ranges: the threading shim of the CPU glue (int8_linear.cpp, sparse_linear.cpp).
//
// at::parallel_for is a header template whose OpenMP backend only runs in parallel when the including file
// is compiled with -fopenmp; CMakeLists.txt does not pass it, so without this shim every call ran on one
// core. When _OPENMP is not defined, run the region through libgomp's entry point (what
// `#pragma omp parallel` compiles to) in the OpenMP runtime torch already loaded, so the team is torch's
// own intra-op pool and torch.set_num_threads applies. If the symbols are absent, run serially.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>

extern "C" {
void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) __attribute__((weak));
int omp_get_thread_num(void) __attribute__((weak));
int omp_get_num_threads(void) __attribute__((weak));
}

namespace fastquant::cpu {
namespace parallel_detail {

template <typename F>
struct ParallelCtx {
  const F* f;
  int64_t n;
  std::atomic_flag err = ATOMIC_FLAG_INIT;
  std::exception_ptr eptr;
};

template <typename F>
void parallel_trampoline(void* data) {
  auto* ctx = static_cast<ParallelCtx<F>*>(data);
  const int64_t nt = std::min<int64_t>(omp_get_num_threads(), ctx->n);
  const int64_t tid = omp_get_thread_num();
  const int64_t chunk = (ctx->n + nt - 1) / nt;
  const int64_t begin = tid * chunk;
  if (tid >= nt || begin >= ctx->n) return;
  try {
    (*ctx->f)(begin, std::min(ctx->n, begin + chunk));
  } catch (...) {
    if (!ctx->err.test_and_set()) ctx->eptr = std::current_exception();
  }
}

}  // namespace parallel_detail

// f(begin, end) over [0, n) split in contiguous, near-equal ranges, one per thread. An exception thrown
// by f on any thread is rethrown here.
template <typename F>
void parallel_ranges(int64_t n, const F& f) {
#ifdef _OPENMP
  at::parallel_for(0, n, 1, f);
#else
  if (n <= 1 || at::get_num_threads() <= 1 || at::in_parallel_region() || !GOMP_parallel ||
      !omp_get_thread_num || !omp_get_num_threads) {
    f(0, n);
    return;
  }
  parallel_detail::ParallelCtx<F> ctx;
  ctx.f = &f;
  ctx.n = n;
  // num_threads 0: the runtime's current team size, which torch.set_num_threads sets.
  GOMP_parallel(&parallel_detail::parallel_trampoline<F>, &ctx, 0, 0);
  if (ctx.eptr) std::rethrow_exception(ctx.eptr);
#endif
}

// Rows [0, n) in blocks of `grain` over parallel_ranges, for kernels that check each row before reading it:
// kernel(row_begin, row_end) returns the first row it refused (having stopped there) or -1. Returns the first
// refused row over all threads, or n when every row was computed.
template <typename Kernel>
int64_t parallel_rows_first_refused(int64_t n, int64_t grain, const Kernel& kernel) {
  std::atomic<int64_t> first{n};
  parallel_ranges((n + grain - 1) / grain, [&](int64_t begin, int64_t end) {
    const int64_t refused = kernel(begin * grain, std::min(end * grain, n));
    if (refused < 0) return;
    int64_t cur = first.load();
    while (refused < cur && !first.compare_exchange_weak(cur, refused)) {
    }
  });
  return first.load();
}

}  // namespace fastquant::cpu
