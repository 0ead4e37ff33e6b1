// fp16 instantiations of the int4 tensor-core GEMV (int4_linear_gemv.cuh); one file per dtype so the build
// compiles them in parallel.
#include "cuda/int4_linear_gemv.cuh"

namespace fastquant::cuda {

LaunchStatus launch_int4_gemv_mma_f16(const Int4GemvArgs& args, cudaStream_t stream) {
  return int4_detail::launch_gemv<__half>(args, stream);
}

}  // namespace fastquant::cuda
