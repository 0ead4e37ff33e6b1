// See dequantize.h.
#include "dequantize.h"

#include <algorithm>

#include "formats.h"

namespace fastquant {
namespace {

// (N,) or (N, ceil(K / G)) scales as (N, K): one per weight element.
at::Tensor expand_group_scales(const at::Tensor& scales, int64_t k, int64_t group_size) {
  if (group_size == -1) return scales.unsqueeze(1).expand({-1, k});
  return scales.repeat_interleave(std::min(group_size, k), 1).narrow(1, 0, k);
}

}  // namespace

at::Tensor dequantize_int8(const at::Tensor& codes, const at::Tensor& scales, int64_t group_size) {
  return codes.to(at::kFloat) * expand_group_scales(scales.to(at::kFloat), codes.size(1), group_size);
}

namespace {

// Codes first, then scales, as the dense int8 layer of the same codes (the numerical contract).
at::Tensor scaled_values(const at::Tensor& dense, const std::optional<at::Tensor>& scales,
                         int64_t group_size) {
  return scales.has_value() ? dequantize_int8(dense, *scales, group_size) : dense.to(at::kFloat);
}

}  // namespace

at::Tensor dequantize_int4(const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& offsets, int64_t in_features,
                           int64_t group_size) {
  const int64_t n = qweight.size(0);
  const at::Tensor blocks = qweight.view({n, -1, 1, kInt4BlockColumns / 2});
  const at::Tensor codes = at::cat({blocks.bitwise_and(0xF), blocks.bitwise_right_shift(4)}, 2)
                               .reshape({n, -1})
                               .narrow(1, 0, in_features);
  const at::Tensor s = expand_group_scales(scales.to(at::kFloat), in_features, group_size);
  if (!offsets.has_value()) return s * (codes.to(at::kFloat) - kInt4SymmetricZero);
  return s * codes.to(at::kFloat) + expand_group_scales(offsets->to(at::kFloat), in_features, group_size);
}

at::Tensor dequantize_bitmap16(const at::Tensor& values, const at::Tensor& masks,
                               const at::Tensor& row_offsets, const std::optional<at::Tensor>& scales,
                               int64_t in_features, int64_t group_size) {
  const at::Tensor bits = at::arange(kBitmap16Columns, masks.options().dtype(at::kInt));
  const at::Tensor words = masks.to(at::kInt).bitwise_and(0xFFFF);
  const at::Tensor keep = words.unsqueeze(2)
                              .bitwise_right_shift(bits)
                              .bitwise_and(1)
                              .to(at::kBool)
                              .reshape({masks.size(0), masks.size(1) * kBitmap16Columns})
                              .narrow(1, 0, in_features);
  // Each (row, column)'s would-be position in values: no data-dependent shapes, so compiled graphs trace it.
  const at::Tensor position =
      row_offsets.narrow(0, 0, row_offsets.size(0) - 1).unsqueeze(1) + keep.cumsum(1) - 1;
  const at::Tensor gathered = values.take(position.clamp(0, values.numel() - 1));
  return scaled_values(at::where(keep, gathered, at::zeros({}, gathered.options())), scales, group_size);
}

at::Tensor dequantize_csr16(const at::Tensor& values, const at::Tensor& column_indices,
                            const at::Tensor& row_offsets, const std::optional<at::Tensor>& scales,
                            int64_t in_features, int64_t group_size) {
  const int64_t n = row_offsets.size(0) - 1;
  at::Tensor dense = at::zeros({n, in_features}, values.options().dtype(at::kFloat));
  if (n == 0 || in_features == 0) return scaled_values(dense, scales, group_size);
  // Every packed position is placed; those past row_offsets[N] add zero to column 0 of the last row.
  const at::Tensor position = at::arange(values.numel(), row_offsets.options().dtype(at::kLong));
  const at::Tensor rows =
      at::searchsorted(row_offsets.narrow(0, 1, n), position, false, true).clamp_max(n - 1);
  const at::Tensor valid = position < row_offsets[n];
  const at::Tensor columns = at::where(valid, column_indices.to(at::kLong).bitwise_and(0xFFFF), 0);
  const at::Tensor kept = at::where(valid, values.to(at::kFloat), 0.0);
  dense = dense.index_put_({rows, columns}, kept, /*accumulate=*/true);
  return scaled_values(dense, scales, group_size);
}

}  // namespace fastquant
