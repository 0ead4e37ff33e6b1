#pragma once
// The element types of fastquant's kernel interfaces: one enum for activations and stored values, shared by
// the CPU kernels (csrc/cpu), the CUDA kernels (csrc/cuda) and the Python bindings. No torch header: kernel
// files include it.

namespace fastquant {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt8 = 3 };

}  // namespace fastquant
