// Split-K start offsets of the bitmap16 tensor-core GEMM (sparse_linear_mma.cuh). A plain (non-template)
// kernel, so it lives in one translation unit: defined in the header that the four per-dtype GEMM files
// include, it would be defined four times and the extension would not link.
#include "cuda/sparse_linear_mma.cuh"

namespace fastquant::cuda::sparse_detail {
namespace {

// Start offset of every split of every row: split_offsets[n][z] = row_offsets[n] + popcount of the row's
// masks before chunk 4 * z * per_split. One warp per row, 32 chunks per step with a warp scan; the masks are
// read once (1/8 byte per weight) and are then in L2 for the GEMM.
__global__ void sparse_mma_offsets_kernel(const uint16_t* masks, const int64_t* row_offsets, int64_t* out,
                                          int n, int n_chunks, int splits, int split_chunks) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= n) return;  // warp-uniform; no block barrier
  const uint16_t* mrow = masks + static_cast<int64_t>(row) * n_chunks;
  int64_t* orow = out + static_cast<int64_t>(row) * splits;
  const int64_t base = __ldg(row_offsets + row);
  if (lane == 0) orow[0] = base;
  const int last = (splits - 1) * split_chunks;  // no split starts past this chunk
  int64_t run = base;
  for (int c0 = 0; c0 < n_chunks && c0 <= last; c0 += 32) {
    const int c = c0 + lane;
    const int cnt = c < n_chunks ? __popc(static_cast<uint32_t>(__ldg(mrow + c))) : 0;
    const int incl = warp_inclusive_scan(cnt, lane);
    if (c > 0 && c % split_chunks == 0 && c / split_chunks < splits)
      orow[c / split_chunks] = run + incl - cnt;
    run += __shfl_sync(kFullMask, incl, 31);
  }
  // Splits that start at or past n_chunks have no k-tile; give them the row's end anyway.
  for (int z = 1 + lane; z < splits; z += 32) {
    if (z * split_chunks >= n_chunks) orow[z] = __ldg(row_offsets + row + 1);
  }
}

}  // namespace

cudaError_t launch_sparse_mma_offsets(const uint16_t* masks, const int64_t* row_offsets, int64_t* out, int n,
                                      int n_chunks, int splits, int split_chunks, cudaStream_t stream) {
  constexpr int kWarps = 8;
  sparse_mma_offsets_kernel<<<(n + kWarps - 1) / kWarps, kWarps * 32, 0, stream>>>(
      masks, row_offsets, out, n, n_chunks, splits, split_chunks);
  return cudaGetLastError();
}

}  // namespace fastquant::cuda::sparse_detail
