#pragma once
// Raw-pointer interface between the torch glue (int8_linear.cpp) and the per-ISA kernels. The ISA
// files are compiled with their own -m flags and must include no torch headers (see CMakeLists.txt).
#include <cstdint>

namespace fastquant::cpu {

enum class ActDType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct Int8LinearProblem {
  const void* x;          // m x k activations, row-major, contiguous
  const int8_t* w;        // n x k int8 weight, row-major, contiguous
  const float* scales;    // n x n_groups fp32 scales
  const void* bias;       // n values of the activation dtype, or nullptr
  void* y;                // m x n output, activation dtype
  int64_t m, n, k;
  int64_t group_size;     // k for per-channel scales
  int64_t n_groups;       // ceil(k / group_size)
  ActDType dtype;
};

// Computes output columns [n_begin, n_end) for every row. Called concurrently on disjoint ranges.
using Int8LinearKernel = void (*)(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end);

void int8_linear_portable(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end);
#if defined(__x86_64__) || defined(_M_X64)
void int8_linear_avx2(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end);
void int8_linear_avx512(const Int8LinearProblem& p, int64_t n_begin, int64_t n_end);
#endif

// Name of the kernel the CPU op will run for this problem (reported by fastquant.report / info).
const char* int8_linear_cpu_path(int64_t m, int64_t n, int64_t k, int64_t group_size, ActDType dtype);

}  // namespace fastquant::cpu
