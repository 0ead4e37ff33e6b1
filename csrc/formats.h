#pragma once
// Constants of fastquant's packed weight formats (python/fastquant/kernels/reference.py packs them), shared
// by the contracts, the CPU kernels and the CUDA kernels. No torch header: kernel files include it.
#include <cstdint>

namespace fastquant {

// bitmap16: kept values end with this many elements of padding, so that the kernels' 16-wide (64-byte) loads
// of a row's last values stay inside the allocation.
inline constexpr int64_t kBitmap16Padding = 64;
// csr16: column indices are 16-bit, so K is at most 2^16.
inline constexpr int64_t kSparseCsrMaxInFeatures = int64_t{1} << 16;
// Group sizes of int8 sparse values are whole 16-column mask words (the kernels flush a group's sum per
// word).
inline constexpr int64_t kSparseGroupMultiple = 16;

}  // namespace fastquant
