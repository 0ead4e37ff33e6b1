// The fastquant._C module. Operators are reached through the torch dispatcher (torch.ops.fastquant.*);
// their schemas are defined in python/fastquant/kernels/ops.py and this library only registers kernels.
// pybind11 carries only build information and run-time switches.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "cpu/cpu_features.h"
#include "cpu/decode_attention.h"
#include "cpu/int4_linear.h"
#include "cpu/int8_linear.h"
#include "cpu/sparse_csr_linear.h"
#include "cpu/sparse_linear.h"
// Plain C++ (no CUDA): the CUDA kernel choice is compiled into every build, so it is tested without a GPU.
#include "cuda/int4_linear_dispatch.h"
#include "cuda/int8_linear_dispatch.h"
#include "cuda/sparse_linear_dispatch.h"

#ifdef FASTQUANT_WITH_CUDA
#include "cuda/cuda_info.h"
#include "cuda/sparse_csr_linear_launch.h"
#endif

namespace py = pybind11;

namespace {

using fastquant::DType;

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "bfloat16") return DType::kBFloat16;
  if (name == "float16") return DType::kFloat16;
  throw std::invalid_argument("unknown activation dtype '" + name +
                              "': expected float32, bfloat16 or float16");
}

DType parse_values_dtype(const std::string& name) {
  if (name == "int8") return DType::kInt8;
  try {
    return parse_dtype(name);
  } catch (const std::invalid_argument&) {
    throw std::invalid_argument("unknown values dtype '" + name +
                                "': expected float32, bfloat16, float16 or int8");
  }
}

// A "which kernel" query of a quantized op: the kernel's name for (m, n, k, group_size, activation dtype).
using PathQuery = const char* (*)(int64_t, int64_t, int64_t, int64_t, DType);

void def_path_query(py::module_& m, const char* name, PathQuery query, const char* doc) {
  m.def(
      name,
      [query](int64_t m_rows, int64_t n, int64_t k, int64_t group_size, const std::string& dtype) {
        return std::string(query(m_rows, n, k, group_size, parse_dtype(dtype)));
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group_size"), py::arg("dtype"), doc);
}

// The same for an op with the int8_activations option.
using RoundingPathQuery = const char* (*)(int64_t, int64_t, int64_t, int64_t, DType, bool);
void def_rounding_path_query(py::module_& m, const char* name, RoundingPathQuery query, const char* doc) {
  m.def(
      name,
      [query](int64_t m_rows, int64_t n, int64_t k, int64_t group_size, const std::string& dtype,
              bool int8_activations) {
        return std::string(query(m_rows, n, k, group_size, parse_dtype(dtype), int8_activations));
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group_size"), py::arg("dtype"),
      py::arg("int8_activations") = false, doc);
}

#ifdef FASTQUANT_WITH_CUDA
// The CUDA kernel int4_linear runs under the current caps, for x 16-byte aligned.
const char* int4_linear_cuda_path(int64_t m, int64_t n, int64_t k, int64_t group_size, DType dtype) {
  namespace fc = fastquant::cuda;
  return fc::int4_path_name(fc::plan_int4(m, n, k, group_size, dtype, /*x_ptr_aligned=*/true,
                                          fc::int4_gemv_max_m(), fc::int4_gemm_max_m()));
}
#endif

// fastquant._C.cuda_dispatch: the CUDA kernel choice as pure functions of the problem, the run-time caps and
// the device's limits (csrc/cuda/*_dispatch.h), in every build.
void def_cuda_dispatch(py::module_& parent) {
  namespace fc = fastquant::cuda;
  py::module_ m = parent.def_submodule(
      "cuda_dispatch", "Which CUDA kernel a problem takes (pure selection logic, available without CUDA)");
  m.attr("DEFAULT_GEMV_MAX_M") = 64;
  m.attr("DEFAULT_GEMM_MAX_M") = fc::kDefaultGemmMaxM;
  m.attr("DEFAULT_SPARSE_GEMV_MAX_M") = fc::kDefaultSparseGemvMaxM;
  m.attr("DEFAULT_SPARSE_MMA_MAX_M") = fc::kDefaultSparseMmaMaxM;
  m.def(
      "int8_path",
      [](int64_t m_rows, int64_t n, int64_t k, int64_t group_size, const std::string& dtype, bool x_aligned,
         bool w_aligned, int64_t gemv_max_m, int64_t gemm_max_m) {
        const fc::Int8Plan plan = fc::plan_int8(m_rows, n, k, group_size, parse_dtype(dtype), x_aligned,
                                                w_aligned, gemv_max_m, gemm_max_m);
        return std::string(fc::int8_path_name(plan));
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group_size"), py::arg("dtype"),
      py::arg("x_aligned") = true, py::arg("w_aligned") = true, py::arg("gemv_max_m") = 64,
      py::arg("gemm_max_m") = fc::kDefaultGemmMaxM,
      "Name of the CUDA kernel int8_linear runs; x_aligned / w_aligned: the data pointers are 16-byte "
      "aligned");
  m.def(
      "int8_gemv_n_tiles",
      [](int64_t m_rows, int64_t gemv_max_m) {
        return fc::int8_gemv_n_tiles(fc::choose_int8_path(m_rows, 1, 64, -1, DType::kBFloat16, gemv_max_m));
      },
      py::arg("m"), py::arg("gemv_max_m") = 64, "n=8 tiles of the int8 GEMV at this M (0: not the GEMV)");
  m.def("int8_gemv_chunks_per_step", &fc::int8_gemv_chunks_per_step, py::arg("n_tiles"),
        "64-wide k chunks a GEMV warp loads per step");
  m.def("int8_gemv_splits", &fc::int8_gemv_splits, py::arg("n"), py::arg("k"), py::arg("num_sms"),
        py::arg("n_tiles"), "K splits of the int8 GEMV");
  m.def("int8_gemv_workspace_slices", &fc::int8_gemv_workspace_slices, py::arg("splits"),
        py::arg("deterministic"), "M x N fp32 slices of the int8 GEMV's split-K workspace");
  m.attr("DEFAULT_INT4_GEMV_MAX_M") = fc::kDefaultInt4GemvMaxM;
  m.attr("DEFAULT_INT4_GEMM_MAX_M") = fc::kDefaultInt4GemmMaxM;
  m.def(
      "int4_path",
      [](int64_t m_rows, int64_t n, int64_t k, int64_t group_size, const std::string& dtype, bool x_aligned,
         int64_t gemv_max_m, int64_t gemm_max_m) {
        return std::string(fc::int4_path_name(
            fc::plan_int4(m_rows, n, k, group_size, parse_dtype(dtype), x_aligned, gemv_max_m, gemm_max_m)));
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group_size"), py::arg("dtype"),
      py::arg("x_aligned") = true, py::arg("gemv_max_m") = fc::kDefaultInt4GemvMaxM,
      py::arg("gemm_max_m") = fc::kDefaultInt4GemmMaxM,
      "Name of the CUDA kernel int4_linear runs; x_aligned: x's data pointer is 16-byte aligned");
  m.def(
      "int4_gemv_n_tiles",
      [](int64_t m_rows, int64_t gemv_max_m) {
        return fc::int4_gemv_n_tiles(fc::choose_int4_path(m_rows, 1, 64, 32, DType::kBFloat16, gemv_max_m));
      },
      py::arg("m"), py::arg("gemv_max_m") = fc::kDefaultInt4GemvMaxM,
      "n=8 tiles of the int4 GEMV at this M (0: not the GEMV)");
  m.def("int4_gemv_blocks_per_step", &fc::int4_gemv_blocks_per_step, py::arg("n_tiles"),
        "64-k packed blocks an int4 GEMV warp loads per step");
  m.def("int4_gemv_splits", &fc::int4_gemv_splits, py::arg("n"), py::arg("k"), py::arg("num_sms"),
        py::arg("n_tiles"), "K splits of the int4 GEMV");
  m.def("int4_gemm_block_m", &fc::int4_gemm_block_m, py::arg("m"), py::arg("n"), py::arg("num_sms"),
        "x rows per block of the fused int4 GEMM");
  m.def("int4_gemm_splits", &fc::int4_gemm_splits, py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("num_sms"), "K splits of the fused int4 GEMM");
  m.def(
      "sparse_path",
      [](int64_t m_rows, int64_t n, int64_t k, const std::string& values_dtype, const std::string& x_dtype,
         int64_t group_size, int64_t max_smem_bytes, int64_t gemv_max_m, int64_t mma_max_m) {
        const auto path =
            fc::choose_sparse_path(m_rows, n, k, parse_values_dtype(values_dtype), parse_dtype(x_dtype),
                                   group_size, max_smem_bytes, gemv_max_m, mma_max_m);
        return std::string(fc::sparse_path_name(path, m_rows));
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("values_dtype"), py::arg("x_dtype"),
      py::arg("group_size"), py::arg("max_smem_bytes"), py::arg("gemv_max_m") = fc::kDefaultSparseGemvMaxM,
      py::arg("mma_max_m") = fc::kDefaultSparseMmaMaxM,
      "Name of the CUDA kernel sparse_linear runs; max_smem_bytes: the device's opt-in shared memory per "
      "block");
  m.def(
      "sparse_mma_block_m",
      [](int64_t m_rows, const std::string& values_dtype, int64_t max_smem_bytes) {
        return fc::sparse_mma_block_m(m_rows, parse_values_dtype(values_dtype), max_smem_bytes);
      },
      py::arg("m"), py::arg("values_dtype"), py::arg("max_smem_bytes"),
      "x rows per block of the bitmap16 mma kernel (0: none fits)");
  m.def(
      "sparse_mma_smem_bytes",
      [](const std::string& values_dtype, int block_m) {
        return fc::sparse_mma_smem_bytes(parse_values_dtype(values_dtype), block_m);
      },
      py::arg("values_dtype"), py::arg("block_m"), "Dynamic shared memory of one bitmap16 mma block");
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
  def_cuda_dispatch(m);
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
  def_rounding_path_query(m, "int8_linear_cpu_path", &fastquant::cpu::int8_linear_cpu_path,
                          "Name of the CPU kernel int8_linear runs for this problem (finite x)");
  def_rounding_path_query(m, "int4_linear_cpu_path", &fastquant::cpu::int4_linear_cpu_path,
                          "Name of the CPU kernel int4_linear runs for this problem (finite x)");
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
      "sparse_linear_cpu_prefill_rows",
      [](int64_t k, const std::string& values_dtype, const std::string& x_dtype, int64_t group_size) {
        return fastquant::cpu::sparse_linear_cpu_prefill_rows(k, parse_values_dtype(values_dtype),
                                                              parse_dtype(x_dtype), group_size);
      },
      py::arg("k"), py::arg("values_dtype"), py::arg("x_dtype"), py::arg("group_size") = -1,
      "Rows of x from which the CPU sparse_linear takes a dedicated prefill kernel (0: none)");
  m.def(
      "sparse_csr_linear_cpu_path", [] { return std::string(fastquant::cpu::sparse_csr_linear_cpu_path()); },
      "Name of the CPU kernel sparse_csr_linear runs");
  m.def(
      "decode_attention_cpu_path", [] { return std::string(fastquant::cpu::decode_attention_cpu_path()); },
      "Name of the CPU kernel decode_attention runs");
#ifdef FASTQUANT_WITH_CUDA
  m.def("cuda_gemv_max_m", &fastquant::cuda::gemv_max_m, "Largest M the CUDA tensor-core GEMV takes");
  m.def("set_cuda_gemv_max_m", &fastquant::cuda::set_gemv_max_m, py::arg("m"),
        "Cap the M of the CUDA GEMV (0: never; 64: default); for benchmarks and tests");
  m.def("cuda_gemm_max_m", &fastquant::cuda::gemm_max_m, "Largest M the fused CUDA GEMM takes");
  m.def(
      "set_cuda_gemm_max_m", &fastquant::cuda::set_gemm_max_m, py::arg("m"),
      "Cap the M of the fused CUDA GEMM (0: never; above it dequantize + cuBLAS); for benchmarks and tests");
  m.def("int4_cuda_gemv_max_m", &fastquant::cuda::int4_gemv_max_m, "Largest M the CUDA int4 GEMV takes");
  m.def("set_int4_cuda_gemv_max_m", &fastquant::cuda::set_int4_gemv_max_m, py::arg("m"),
        "Cap the M of the CUDA int4 GEMV (0: never; 64: default); for benchmarks and tests");
  m.def("int4_cuda_gemm_max_m", &fastquant::cuda::int4_gemm_max_m,
        "Largest M the fused CUDA int4 GEMM takes");
  m.def("set_int4_cuda_gemm_max_m", &fastquant::cuda::set_int4_gemm_max_m, py::arg("m"),
        "Cap the M of the fused CUDA int4 GEMM (0: never; above it dequantize + cuBLAS); for benchmarks and "
        "tests");
  def_path_query(
      m, "int4_linear_cuda_path", &int4_linear_cuda_path,
      "Name of the CUDA kernel int4_linear runs for this problem (x 16-byte aligned), under the current cap");
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
  m.def("sparse_cuda_smem_limit", &fastquant::cuda::sparse_smem_limit,
        "Cap on the shared memory per block the CUDA sparse_linear kernels assume (0: the device's)");
  m.def(
      "set_sparse_cuda_smem_limit", &fastquant::cuda::set_sparse_smem_limit, py::arg("bytes"),
      "Cap the shared memory per block the CUDA sparse_linear kernels assume (0: the device's opt-in limit), "
      "to take a smaller GPU's block sizes and fallbacks; for tests");
#endif
}
