// fp16 instantiations of the tensor-core GEMV (int8_gemv_mma.cuh); one file per dtype so the build
// compiles them in parallel.
#include "cuda/int8_gemv_mma.cuh"

namespace fastquant::cuda {

LaunchStatus launch_int8_gemv_mma_f16(const Int8GemvArgs& args, cudaStream_t stream) {
  return detail::launch_gemv<__half>(args, stream);
}

}  // namespace fastquant::cuda
