#pragma once
// Build facts of the CUDA kernels for fastquant._C.build_info(), and the run-time caps. Implemented in
// cuda_info.cu; only plain C types cross this boundary (the .cu files are built by nvcc, the pybind module
// by the host compiler).
#include <cstdint>

namespace fastquant::cuda {

// CUDA runtime version this extension runs with, e.g. "13.0" ("unknown" if the runtime cannot say).
const char* cuda_runtime_version_string();

// GPU architectures the kernels were compiled for, e.g. "sm_80,sm_90" (from nvcc's __CUDA_ARCH_LIST__).
const char* compiled_archs();

// Largest M the tensor-core GEMV takes (default 64, the whole dispatch table; 0: always dequantize +
// cuBLAS). A process-wide tuning switch for benchmarks/bench_gpu_int8.py; calls running concurrently with
// a change may take either choice (both are correct).
int64_t gemv_max_m();
void set_gemv_max_m(int64_t m);
// Largest M the fused GEMM takes (default kDefaultGemmMaxM = 512; 0: never). Same kind of switch.
int64_t gemm_max_m();
void set_gemm_max_m(int64_t m);
// Largest M the int4 tensor-core GEMV takes (default kDefaultInt4GemvMaxM = 64; 0: always dequantize +
// cuBLAS). Same kind of switch, for benchmarks/bench_gpu_int4.py.
int64_t int4_gemv_max_m();
void set_int4_gemv_max_m(int64_t m);
// Largest M the fused int4 GEMM takes (default kDefaultInt4GemmMaxM = 512; 0: never). Same kind of switch.
int64_t int4_gemm_max_m();
void set_int4_gemm_max_m(int64_t m);

}  // namespace fastquant::cuda
