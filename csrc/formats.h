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
// bitmap16: columns per mask word (bit j of word c is column 16 c + j).
inline constexpr int64_t kBitmap16Columns = 16;
// int4: a block of 64 columns is 32 bytes, low nibbles the first 32 columns, high nibbles the next 32.
inline constexpr int64_t kInt4BlockColumns = 64;
// int4 symmetric codes stand for q - 8.
inline constexpr int64_t kInt4SymmetricZero = 8;

}  // namespace fastquant
