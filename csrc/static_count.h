#pragma once
// Run-time counts turned into compile-time ones, for kernels whose tile sizes are template parameters (each
// size compiles to its own fully unrolled body with its accumulators in registers). Plain C++17 templates:
// the ISA-specific CPU files and the CUDA launchers (host code) both include it; each instantiation lives in
// the translation unit of its caller, so a kernel compiled for one ISA never calls code compiled for another.
#include <cstdint>
#include <type_traits>
#include <utility>

namespace fastquant {

template <int N>
using StaticCount = std::integral_constant<int, N>;

// f(StaticCount<min(n, Max)>{}) for n >= 1; nothing for n <= 0 (e.g. no rows left over after whole tiles).
template <int Max, typename F>
inline void with_count(int64_t n, F&& f) {
  static_assert(Max >= 1, "counts start at 1");
  if (n <= 0) return;
  if constexpr (Max == 1) {
    f(StaticCount<1>{});
  } else if (n >= Max) {
    f(StaticCount<Max>{});
  } else {
    with_count<Max - 1>(n, std::forward<F>(f));
  }
}

// f(StaticCount<p>{}) with p the largest power of two <= min(n, Max) (1 for n < 1): the tile sizes of the
// CUDA launchers, which instantiate powers of two only. Returns what f returns.
template <int Max, typename F>
inline decltype(auto) with_power_of_two(int64_t n, F&& f) {
  static_assert(Max >= 1 && (Max & (Max - 1)) == 0, "Max must be a power of two");
  if constexpr (Max == 1) {
    return f(StaticCount<1>{});
  } else {
    if (n >= Max) return f(StaticCount<Max>{});
    return with_power_of_two<Max / 2>(n, std::forward<F>(f));
  }
}

}  // namespace fastquant
