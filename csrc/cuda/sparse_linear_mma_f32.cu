// Instantiations of the bitmap16 tensor-core GEMM (sparse_linear_mma.cuh) for float values; one file per
// value dtype so the build compiles them in parallel.
#include "cuda/sparse_linear_mma.cuh"

namespace fastquant::cuda {

LaunchStatus launch_sparse_mma_f32(const SparseLinearArgs& args, cudaStream_t stream) {
  return sparse_detail::launch_mma<float>(args, stream);
}

}  // namespace fastquant::cuda
