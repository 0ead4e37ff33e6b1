// Build facts for fastquant._C.build_info() and the run-time caps of the int8 paths (see cuda_info.h).
#include <cuda_runtime_api.h>

#include <cstdio>
#include <string>

#include "cuda/cuda_info.h"
#include "cuda/int4_linear_dispatch.h"
#include "cuda/int8_linear_dispatch.h"

#define FASTQUANT_STR2(...) #__VA_ARGS__
#define FASTQUANT_STR(...) FASTQUANT_STR2(__VA_ARGS__)

namespace fastquant::cuda {

const char* cuda_runtime_version_string() {
  static const std::string version = [] {
    int v = 0;
    if (cudaRuntimeGetVersion(&v) != cudaSuccess) {
      cudaGetLastError();  // clear it so that the next launch does not report it as its own
      return std::string("unknown");
    }
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%d.%d", v / 1000, (v % 1000) / 10);
    return std::string(buf);
  }();
  return version.c_str();
}

const char* compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  // nvcc defines __CUDA_ARCH_LIST__ as e.g. 800,900 (one entry per -gencode / CUDA_ARCHITECTURES value).
  static const std::string archs = [] {
    const std::string raw = FASTQUANT_STR(__CUDA_ARCH_LIST__);
    std::string out;
    std::string number;
    for (size_t i = 0; i <= raw.size(); ++i) {
      if (i < raw.size() && raw[i] >= '0' && raw[i] <= '9') {
        number += raw[i];
      } else if (!number.empty()) {
        if (!out.empty()) out += ",";
        out += "sm_" + std::to_string(std::stoi(number) / 10);
        number.clear();
      }
    }
    return out;
  }();
  return archs.c_str();
#else
  return "unknown";
#endif
}

FASTQUANT_DEFINE_RUNTIME_CAP(gemv_max_m, 64)
FASTQUANT_DEFINE_RUNTIME_CAP(gemm_max_m, kDefaultGemmMaxM)
FASTQUANT_DEFINE_RUNTIME_CAP(int4_gemv_max_m, kDefaultInt4GemvMaxM)
FASTQUANT_DEFINE_RUNTIME_CAP(int4_gemm_max_m, kDefaultInt4GemmMaxM)

}  // namespace fastquant::cuda
