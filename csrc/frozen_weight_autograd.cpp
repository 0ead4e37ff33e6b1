// Autograd of the four linear ops (int8_linear, int4_linear, sparse_linear, sparse_csr_linear), registered
// for the Autograd key of every device. The weight is frozen (a quantized or pruned base, LoRA-style adapters
// on top): gradients reach x and the bias, grad_x = grad_y @ W with W the dense fp32 weight.
//
// Why C++: a Python autograd kernel (torch.library.register_autograd) runs on every call that reaches the
// Autograd key, gradients or not, and costs 4-6 us on a 2-core Zen 5: as much as a small decode layer's
// kernel, and HF `generate` runs under no_grad (not inference_mode), so a compiled SmolLM2 decode step paid
// it 211 times per token. Here a call that records no gradient goes straight to the backend kernel.
//
// The weight comes from dequantize.h, the C++ twins of kernels/reference.py's dequantizers (the Python
// autograd, the oracle the tests compare with, uses those; without the extension ops.py registers it
// instead). They are ATen ops, so torch.compile traces the backward like any other.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "dequantize.h"

namespace fastquant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool records_gradient(std::initializer_list<std::optional<at::Tensor>> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  return std::any_of(tensors.begin(), tensors.end(),
                     [](const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); });
}

void save_activation_facts(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  ctx->saved_data["x_dtype"] = x.scalar_type();
  ctx->saved_data["bias_grad"] = bias.has_value() && bias->requires_grad();
}

// grad_x = grad_y @ W in fp32, in x's dtype; grad_bias = grad_y summed over rows (when the bias wants one).
std::pair<at::Tensor, at::Tensor> activation_grads(AutogradContext* ctx, const at::Tensor& grad_y,
                                                   const at::Tensor& weight) {
  const at::Tensor grad_x =
      at::matmul(grad_y.to(at::kFloat), weight).to(ctx->saved_data["x_dtype"].toScalarType());
  at::Tensor grad_bias;
  if (ctx->saved_data["bias_grad"].toBool()) grad_bias = grad_y.reshape({-1, grad_y.size(-1)}).sum(0);
  return {grad_x, grad_bias};
}

template <typename Schema>
c10::TypedOperatorHandle<Schema> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Schema>();
}

using Int8Schema = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, int64_t, bool);
using Int4Schema = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
                              int64_t, bool);
// sparse_linear and sparse_csr_linear: (x, values, index, row_offsets, scales, bias, in_features,
// group_size).
using SparseSchema = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
                                int64_t);

class Int8Linear : public torch::autograd::Function<Int8Linear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& scales, const std::optional<at::Tensor>& bias,
                            int64_t group_size, bool int8_activations) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({qweight, scales});
    ctx->saved_data["group_size"] = group_size;
    save_activation_facts(ctx, x, bias);
    return op().call(x, qweight, scales, bias, group_size, int8_activations);
  }

  // int8_activations rounds x in the forward only: its gradient passes straight through the rounding.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const auto [gx, gb] = activation_grads(
        ctx, grads[0], dequantize_int8(saved[0], saved[1], ctx->saved_data["group_size"].toInt()));
    return {gx, at::Tensor(), at::Tensor(), gb, at::Tensor(), at::Tensor()};
  }

  static c10::TypedOperatorHandle<Int8Schema> op() {
    static const auto handle = op_handle<Int8Schema>("fastquant::int8_linear");
    return handle;
  }
};

class Int4Linear : public torch::autograd::Function<Int4Linear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& scales, const std::optional<at::Tensor>& offsets,
                            const std::optional<at::Tensor>& bias, int64_t in_features, int64_t group_size,
                            bool int8_activations) {
    at::AutoDispatchBelowADInplaceOrView below;
    // An undefined tensor stands for "no offsets" (symmetric) among the saved variables.
    ctx->save_for_backward({qweight, scales, offsets.value_or(at::Tensor())});
    ctx->saved_data["in_features"] = in_features;
    ctx->saved_data["group_size"] = group_size;
    save_activation_facts(ctx, x, bias);
    return op().call(x, qweight, scales, offsets, bias, in_features, group_size, int8_activations);
  }

  // int8_activations rounds x in the forward only: its gradient passes straight through the rounding.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> offsets =
        saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const at::Tensor weight =
        dequantize_int4(saved[0], saved[1], offsets, ctx->saved_data["in_features"].toInt(),
                        ctx->saved_data["group_size"].toInt());
    const auto [gx, gb] = activation_grads(ctx, grads[0], weight);
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), gb, at::Tensor(), at::Tensor(), at::Tensor()};
  }

  static c10::TypedOperatorHandle<Int4Schema> op() {
    static const auto handle = op_handle<Int4Schema>("fastquant::int4_linear");
    return handle;
  }
};

// sparse_linear (index = bitmap16 masks) and sparse_csr_linear (index = csr16 column indices).
template <bool kCsr>
class SparseLinear : public torch::autograd::Function<SparseLinear<kCsr>> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& index, const at::Tensor& row_offsets,
                            const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& bias,
                            int64_t in_features, int64_t group_size) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({values, index, row_offsets, scales.value_or(at::Tensor())});
    ctx->saved_data["in_features"] = in_features;
    ctx->saved_data["group_size"] = group_size;
    save_activation_facts(ctx, x, bias);
    return op().call(x, values, index, row_offsets, scales, bias, in_features, group_size);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> scales =
        saved[3].defined() ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    const int64_t k = ctx->saved_data["in_features"].toInt(), g = ctx->saved_data["group_size"].toInt();
    const at::Tensor weight = kCsr ? dequantize_csr16(saved[0], saved[1], saved[2], scales, k, g)
                                   : dequantize_bitmap16(saved[0], saved[1], saved[2], scales, k, g);
    const auto [gx, gb] = activation_grads(ctx, grads[0], weight);
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), gb, at::Tensor(), at::Tensor()};
  }

  static c10::TypedOperatorHandle<SparseSchema> op() {
    static const auto handle =
        op_handle<SparseSchema>(kCsr ? "fastquant::sparse_csr_linear" : "fastquant::sparse_linear");
    return handle;
  }
};

// Each Autograd kernel: a call that records no gradient (no_grad, or nothing that requires one) runs the
// backend kernel directly; otherwise the Function records the frozen-weight backward.
at::Tensor int8_linear_autograd(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const std::optional<at::Tensor>& bias, int64_t group_size,
                                bool int8_activations) {
  if (!records_gradient({x, scales, bias})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return Int8Linear::op().call(x, qweight, scales, bias, group_size, int8_activations);
  }
  return Int8Linear::apply(x, qweight, scales, bias, group_size, int8_activations);
}

at::Tensor int4_linear_autograd(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const std::optional<at::Tensor>& offsets,
                                const std::optional<at::Tensor>& bias, int64_t in_features,
                                int64_t group_size, bool int8_activations) {
  if (!records_gradient({x, scales, offsets, bias})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return Int4Linear::op().call(x, qweight, scales, offsets, bias, in_features, group_size,
                                 int8_activations);
  }
  return Int4Linear::apply(x, qweight, scales, offsets, bias, in_features, group_size, int8_activations);
}

template <bool kCsr>
at::Tensor sparse_linear_autograd(const at::Tensor& x, const at::Tensor& values, const at::Tensor& index,
                                  const at::Tensor& row_offsets, const std::optional<at::Tensor>& scales,
                                  const std::optional<at::Tensor>& bias, int64_t in_features,
                                  int64_t group_size) {
  if (!records_gradient({x, values, scales, bias})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return SparseLinear<kCsr>::op().call(x, values, index, row_offsets, scales, bias, in_features,
                                         group_size);
  }
  return SparseLinear<kCsr>::apply(x, values, index, row_offsets, scales, bias, in_features, group_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastquant, Autograd, m) {
  m.impl("int8_linear", &int8_linear_autograd);
  m.impl("int4_linear", &int4_linear_autograd);
  m.impl("sparse_linear", &sparse_linear_autograd<false>);
  m.impl("sparse_csr_linear", &sparse_linear_autograd<true>);
}

}  // namespace fastquant
