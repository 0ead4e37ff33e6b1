#pragma once
// Checks every fastquant op shares, for the torch glue of its CPU and CUDA kernels alike, so that both
// backends refuse the same arguments with the same words (python/fastquant/kernels/ops.py words them alike
// for the fake and reference kernels). Includes torch headers: glue files only, never a kernel file.
#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "dtypes.h"

namespace fastquant {

enum class Backend { kCpu, kCuda };

// A tensor argument by name; `tensor` is null for an optional argument passed as None.
// dtypes and shapes as Python prints them (torch.float32, (3, 40)): the messages read as the Python checks'.
inline std::string py_dtype(at::ScalarType t) {
  struct Name {
    at::ScalarType type;
    const char* name;
  };
  static constexpr Name kNames[] = {{at::kFloat, "torch.float32"}, {at::kDouble, "torch.float64"},
                                    {at::kHalf, "torch.float16"},  {at::kBFloat16, "torch.bfloat16"},
                                    {at::kChar, "torch.int8"},     {at::kByte, "torch.uint8"},
                                    {at::kShort, "torch.int16"},   {at::kInt, "torch.int32"},
                                    {at::kLong, "torch.int64"},    {at::kBool, "torch.bool"}};
  for (const Name& n : kNames) {
    if (n.type == t) return n.name;
  }
  return std::string("torch.") + c10::toString(t);
}

inline std::string py_shape(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

struct NamedTensor {
  const char* name;
  const at::Tensor* tensor;
};

inline const at::Tensor* optional_arg(const std::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

// A CPU kernel takes tensors on the CPU only; a CUDA kernel takes them all on x's device (the first one).
inline void check_devices(const char* op, Backend backend, std::initializer_list<NamedTensor> tensors) {
  const at::Device device = tensors.begin()->tensor->device();
  bool ok = backend == Backend::kCpu ? device.is_cpu() : device.is_cuda();
  for (const NamedTensor& t : tensors) ok = ok && (t.tensor == nullptr || t.tensor->device() == device);
  if (ok) return;
  std::string got;
  for (const NamedTensor& t : tensors) {
    if (t.tensor == nullptr) continue;
    got += (got.empty() ? "" : ", ") + std::string(t.name) + " on " + t.tensor->device().str();
  }
  TORCH_CHECK(false, op, " (", backend == Backend::kCpu ? "CPU" : "CUDA", " kernel): all tensors must be on ",
              backend == Backend::kCpu ? "the CPU" : "one CUDA device", ", got ", got);
}

// x: the activations, float32, bfloat16 or float16, at least 1-D.
inline DType check_activations(const char* prefix, const at::Tensor& x) {
  DType d = DType::kFloat32;
  switch (x.scalar_type()) {
    case at::kFloat:
      break;
    case at::kBFloat16:
      d = DType::kBFloat16;
      break;
    case at::kHalf:
      d = DType::kFloat16;
      break;
    default:
      TORCH_CHECK(false, prefix, " x must be float32, bfloat16 or float16, got ", py_dtype(x.scalar_type()));
  }
  TORCH_CHECK(x.dim() >= 1, prefix, " x must have at least 1 dimension, got a scalar");
  return d;
}

// Rows of x as a matrix (all dimensions but the last), correct also when the last one is 0.
inline int64_t activation_rows(const at::Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return m;
}

// ceil(k / group_size) without the overflow of (k + group_size - 1) for group sizes near INT64_MAX.
inline int64_t group_count(int64_t k, int64_t group_size) {
  return k / group_size + (k % group_size != 0 ? 1 : 0);
}

// group_size: -1 (per-channel) or a positive multiple of `multiple` (1: any positive value).
inline void check_group_size(const char* prefix, int64_t group_size, int64_t multiple) {
  if (multiple == 1) {
    TORCH_CHECK(group_size == -1 || group_size > 0, prefix,
                " group_size must be -1 (per-channel) or positive, got ", group_size);
  } else {
    TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % multiple == 0), prefix,
                " group_size must be -1 (per-channel) or a positive multiple of ", multiple, ", got ",
                group_size);
  }
}

// float32 scales of a weight (what, e.g. "qweight") of n rows and k columns: (N,) per channel, (N, groups)
// per group. Returns the number of groups (1 per channel).
inline int64_t check_scales(const char* prefix, const at::Tensor& scales, const char* what, int64_t n,
                            int64_t k, int64_t group_size) {
  TORCH_CHECK(scales.scalar_type() == at::kFloat, prefix, " scales must be float32, got ",
              py_dtype(scales.scalar_type()));
  if (group_size == -1) {
    TORCH_CHECK(scales.dim() == 1 && scales.size(0) == n, prefix,
                " per-channel scales must have shape (N,) = (", n, ",), got ", py_shape(scales.sizes()));
    return 1;
  }
  const int64_t n_groups = group_count(k, group_size);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == n_groups, prefix,
              " group-wise scales for ", what, " (", n, ", ", k, ") and group_size ", group_size,
              " must have shape (", n, ", ", n_groups, "), got ", py_shape(scales.sizes()));
  return n_groups;
}

inline void check_bias(const char* prefix, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                       int64_t n) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), prefix, " bias dtype ", py_dtype(bias->scalar_type()),
              " must match x dtype ", py_dtype(x.scalar_type()));
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, prefix, " bias must have shape (", n, ",), got ",
              py_shape(bias->sizes()));
}

inline void check_in_features(const char* prefix, const at::Tensor& x, int64_t k, const char* what) {
  TORCH_CHECK(x.size(-1) == k, prefix, " x has ", x.size(-1), " input features (shape ", py_shape(x.sizes()),
              ") but ", what);
}

// x against an in_features argument.
inline void check_in_features(const char* prefix, const at::Tensor& x, int64_t in_features) {
  check_in_features(prefix, x, in_features, ("in_features is " + std::to_string(in_features)).c_str());
}

// The output of a linear op: x's shape with the last dimension replaced by n, in x's dtype.
inline at::Tensor empty_output(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = n;
  return at::empty(sizes, x.options());
}

// Outputs that need no kernel: empty ones, and those of K = 0 (the bias, or zeros), filled here. True when y
// is complete.
inline bool output_without_kernel(at::Tensor& y, int64_t k, const std::optional<at::Tensor>& bias) {
  if (y.numel() == 0) return true;
  if (k != 0) return false;
  if (bias.has_value()) {
    y.copy_(bias->expand_as(y));
  } else {
    y.zero_();
  }
  return true;
}

}  // namespace fastquant
