// The fastquant._C module. Operators are reached through the torch dispatcher (torch.ops.fastquant.*);
// their schemas are defined in python/fastquant/ops.py and this library only registers kernels.
// pybind11 carries only build information and run-time switches.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "cpu/cpu_features.h"
#include "cpu/int8_linear.h"
#include "cpu/sparse_csr_linear.h"
#include "cpu/sparse_linear.h"

#ifdef FASTQUANT_WITH_CUDA
#include "cuda/cuda_info.h"
#include "cuda/sparse_csr_linear_launch.h"
#include "cuda/sparse_linear_dispatch.h"
#endif

namespace py = pybind11;

namespace {

fastquant::cpu::ActDType parse_dtype(const std::string& name) {
  if (name == "float32") return fastquant::cpu::ActDType::kFloat32;
  if (name == "bfloat16") return fastquant::cpu::ActDType::kBFloat16;
  if (name == "float16") return fastquant::cpu::ActDType::kFloat16;
  throw std::invalid_argument("unknown activation dtype '" + name +
                              "': expected float32, bfloat16 or float16");
}

fastquant::cpu::SparseValues parse_values_dtype(const std::string& name) {
  if (name == "float32") return fastquant::cpu::SparseValues::kFloat32;
  if (name == "bfloat16") return fastquant::cpu::SparseValues::kBFloat16;
  if (name == "float16") return fastquant::cpu::SparseValues::kFloat16;
  if (name == "int8") return fastquant::cpu::SparseValues::kInt8;
  throw std::invalid_argument("unknown values dtype '" + name +
                              "': expected float32, bfloat16, float16 or int8");
}

py::dict build_info() {
  py::dict info;
  info["version"] = FASTQUANT_VERSION;
  info["torch_version"] = FASTQUANT_TORCH_VERSION;
#ifdef FASTQUANT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = fastquant::cuda::cuda_runtime_version_string();
  info["cuda_archs"] = fastquant::cuda::compiled_archs();
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::none();
#endif
  info["compiler"] = __VERSION__;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastquant native kernels (operators are registered under torch.ops.fastquant)";
  m.def("build_info", &build_info, "Versions and options this extension was built with");
  m.def("cpu_features", &fastquant::cpu::cpu_features_string, "CPU features detected at run time");
  m.def(
      "cpu_isa", [] { return std::string(fastquant::cpu::isa_name(fastquant::cpu::active_isa())); },
      "Instruction set the CPU kernels use now");
  m.def(
      "best_cpu_isa",
      [] { return std::string(fastquant::cpu::isa_name(fastquant::cpu::best_supported_isa())); },
      "Best instruction set this CPU supports");
  m.def("set_cpu_isa", &fastquant::cpu::set_isa_limit, py::arg("name"),
        "Cap the CPU kernels at an instruction set (avx512_vbmi, avx512, avx2, portable); for tests and "
        "comparisons");
  m.def(
      "int8_linear_cpu_path",
      [](int64_t m_rows, int64_t n, int64_t k, int64_t group_size, const std::string& dtype) {
        return std::string(
            fastquant::cpu::int8_linear_cpu_path(m_rows, n, k, group_size, parse_dtype(dtype)));
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group_size"), py::arg("dtype"),
      "Name of the CPU kernel int8_linear runs for this problem");
  m.def(
      "sparse_linear_cpu_path",
      [](int64_t m_rows, int64_t n, int64_t k, const std::string& values_dtype, const std::string& x_dtype,
         int64_t group_size) {
        return std::string(fastquant::cpu::sparse_linear_cpu_path(
            m_rows, n, k, parse_values_dtype(values_dtype), parse_dtype(x_dtype), group_size));
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("values_dtype"), py::arg("x_dtype"),
      py::arg("group_size") = -1, "Name of the CPU kernel sparse_linear runs for this problem");
  m.def(
      "sparse_csr_linear_cpu_path", [] { return std::string(fastquant::cpu::sparse_csr_linear_cpu_path()); },
      "Name of the CPU kernel sparse_csr_linear runs");
#ifdef FASTQUANT_WITH_CUDA
  m.def(
      "int8_linear_cuda_path",
      [](int64_t m_rows, int64_t n, int64_t k, int64_t group_size, const std::string& dtype) {
        const int code = static_cast<int>(parse_dtype(dtype));
        return std::string(fastquant::cuda::int8_linear_cuda_path(m_rows, n, k, group_size, code));
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group_size"), py::arg("dtype"),
      "Name of the CUDA kernel int8_linear runs for this problem (see csrc/cuda/int8_linear_dispatch.h)");
  m.def("cuda_gemv_max_m", &fastquant::cuda::gemv_max_m, "Largest M the CUDA tensor-core GEMV takes");
  m.def("set_cuda_gemv_max_m", &fastquant::cuda::set_gemv_max_m, py::arg("m"),
        "Cap the M of the CUDA GEMV (0: never; 64: default); for benchmarks and tests");
  m.def("cuda_gemm_max_m", &fastquant::cuda::gemm_max_m, "Largest M the fused CUDA GEMM takes");
  m.def(
      "set_cuda_gemm_max_m", &fastquant::cuda::set_gemm_max_m, py::arg("m"),
      "Cap the M of the fused CUDA GEMM (0: never; above it dequantize + cuBLAS); for benchmarks and tests");
  m.def(
      "sparse_linear_cuda_path",
      [](int64_t m_rows, int64_t n, int64_t k, const std::string& values_dtype, const std::string& x_dtype,
         int64_t group_size) {
        using fastquant::cuda::SparseValues;
        SparseValues values;
        if (values_dtype == "int8") {
          values = SparseValues::kInt8;
        } else {
          values = static_cast<SparseValues>(static_cast<int>(parse_dtype(values_dtype)));
        }
        const auto x = static_cast<fastquant::cuda::DType>(static_cast<int>(parse_dtype(x_dtype)));
        const auto path = fastquant::cuda::choose_sparse_path(m_rows, n, k, values, x, group_size,
                                                              fastquant::cuda::sparse_gemv_max_m(),
                                                              fastquant::cuda::sparse_mma_max_m());
        return std::string(fastquant::cuda::sparse_path_name(path, m_rows));
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("values_dtype"), py::arg("x_dtype"),
      py::arg("group_size") = -1,
      "Name of the CUDA kernel sparse_linear runs for this problem (see csrc/cuda/sparse_linear_dispatch.h)");
  m.def(
      "sparse_csr_linear_cuda_path", [] { return std::string(fastquant::cuda::kSparseCsrCudaPath); },
      "Name of the CUDA kernel sparse_csr_linear runs");
  m.def("sparse_cuda_gemv_max_m", &fastquant::cuda::sparse_gemv_max_m,
        "Largest M the CUDA sparse_linear GEMV (one launch or per 16 rows) takes");
  m.def("set_sparse_cuda_gemv_max_m", &fastquant::cuda::set_sparse_gemv_max_m, py::arg("m"),
        "Cap the M of the CUDA sparse_linear GEMV (0: never); for benchmarks and tests");
  m.def("sparse_cuda_mma_max_m", &fastquant::cuda::sparse_mma_max_m,
        "Largest M the CUDA sparse_linear tensor-core path takes");
  m.def("set_sparse_cuda_mma_max_m", &fastquant::cuda::set_sparse_mma_max_m, py::arg("m"),
        "Cap the M of the CUDA sparse_linear tensor-core path (0: never; above it GEMV or densify + cuBLAS); "
        "for benchmarks and tests");
#endif
}
