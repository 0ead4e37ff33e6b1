// Instantiations of the bitmap16 tensor-core GEMM (sparse_linear_mma.cuh) for __nv_bfloat16 values; one file
// per value dtype so the build compiles them in parallel.
#include "cuda/sparse_linear_mma.cuh"

namespace fastquant::cuda {

LaunchStatus launch_sparse_mma_bf16(const SparseLinearArgs& args, cudaStream_t stream) {
  return sparse_detail::launch_mma<__nv_bfloat16>(args, stream);
}

}  // namespace fastquant::cuda
