// Torch glue for fastquant::decode_attention on CUDA: the shared argument contract, then torch's own SDPA
// kernels (flash or memory-efficient attention, chosen by torch), which already serve a decode step on a GPU:
// the query rows of one key/value head attend to its cache in place, and a step is one kernel launch. An
// additive mask takes q's dtype as SDPA requires; a bool mask keeps the positions that are True. Compiled
// only when building against a CUDA torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "decode_attention_contract.h"

namespace fastquant::cuda {

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask, double scale) {
  check_decode_attention(Backend::kCuda, q, k, v, mask, scale);
  c10::cuda::CUDAGuard device_guard(q.device());
  if (q.numel() == 0) return at::empty(q.sizes(), q.options());
  if (k.size(2) == 0) return at::zeros(q.sizes(), q.options());  // nothing to attend to, as torch's SDPA
  return at::scaled_dot_product_attention(q, k, v, mask, 0.0, false, scale);
}

TORCH_LIBRARY_IMPL(fastquant, CUDA, m) { m.impl("decode_attention", &decode_attention_cuda); }

}  // namespace fastquant::cuda
