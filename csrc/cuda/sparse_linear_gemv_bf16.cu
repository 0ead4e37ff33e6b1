// Instantiations of the bitmap16 decode GEMV (sparse_linear_gemv.cuh) for __nv_bfloat16 values; one file per
// value dtype so the build compiles them in parallel.
#include "cuda/sparse_linear_gemv.cuh"

namespace fastquant::cuda {

LaunchStatus launch_sparse_gemv_bf16(const SparseLinearArgs& args, cudaStream_t stream) {
  return sparse_detail::launch_gemv<__nv_bfloat16>(args, stream);
}

}  // namespace fastquant::cuda
