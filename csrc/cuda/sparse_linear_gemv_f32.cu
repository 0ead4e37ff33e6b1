// Instantiations of the bitmap16 decode GEMV (sparse_linear_gemv.cuh) for float values; one file per value
// dtype so the build compiles them in parallel.
#include "cuda/sparse_linear_gemv.cuh"

namespace fastquant::cuda {

LaunchStatus launch_sparse_gemv_f32(const SparseLinearArgs& args, cudaStream_t stream) {
  return sparse_detail::launch_gemv<float>(args, stream);
}

}  // namespace fastquant::cuda
