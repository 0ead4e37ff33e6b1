"""fastquant.patch with the sparse methods, fastquant.prune, and the measured sparse-vs-dense kernel choice."""

from __future__ import annotations

import copy

import pytest
import torch
from test_patch import make_block
from torch import nn

import fastquant
from fastquant import Int8Linear, SparseLinear
from fastquant.kernels import extension, kernel_choice, reference
from fastquant.kernels.kernel_choice import KernelChoice

# 16 rows of activations: the dense int8 kernel's exact fp32 path everywhere, whatever torch's float32 matmul
# precision (above 16 rows, under "medium", the AVX-512 kernel rounds activations to bf16, which the comparison
# below does not allow for).
TOKENS = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0))


def pruned_float_copy(model: nn.Module) -> nn.Module:
    """The float model a sparse-patched model stands for: same layers, dense pruned weights."""
    dense = make_block()
    for name in ("up", "down"):
        layer = model.get_submodule(name)
        weight = layer.dequantize() if isinstance(layer, (SparseLinear, Int8Linear)) else layer.weight
        dense.get_submodule(name).weight.data.copy_(weight)
    return dense


@pytest.mark.parametrize("sparse_kernel", ["sparse", "csr16", "dense", "auto"])
@pytest.mark.parametrize("method", ["sparse", "int8+sparse"])
def test_patched_model_computes_with_its_pruned_weights(method, sparse_kernel):
    model = fastquant.patch(
        make_block(), method, pruning="magnitude", sparsity=0.6, sparse_kernel=sparse_kernel, progress=False
    )
    for name in ("up", "down"):
        layer = model.get_submodule(name)
        expected_type = {
            "sparse": SparseLinear,
            "csr16": SparseLinear,
            "dense": Int8Linear if method == "int8+sparse" else nn.Linear,
        }
        if sparse_kernel in expected_type:
            assert type(layer) is expected_type[sparse_kernel], name
        if sparse_kernel in ("sparse", "csr16"):
            assert layer.layout == {"sparse": "bitmap16", "csr16": "csr16"}[sparse_kernel], name
        weight = layer.dequantize() if isinstance(layer, (SparseLinear, Int8Linear)) else layer.weight
        assert (weight == 0).float().mean().item() == pytest.approx(0.6, abs=1 / 256), name
    with torch.no_grad():
        # Same numbers, different kernels: only fp32 summation order differs.
        torch.testing.assert_close(model(TOKENS), pruned_float_copy(model)(TOKENS), rtol=1e-4, atol=1e-4)


def test_sparse_layer_keeps_the_float_values_exactly():
    model = make_block()
    weight = model.up.weight.detach().clone()
    fastquant.patch(model, "sparse", pruning="magnitude", sparsity=0.5, sparse_kernel="sparse", progress=False)
    dense = model.up.dequantize()
    kept = dense != 0
    assert torch.equal(dense[kept], weight[kept])  # pruning removes weights, never changes the kept ones
    assert "sparse 50% unstructured bitmap16, float32 values" in repr(model.up)


def test_report_shows_choice_format_and_bytes():
    model = fastquant.patch(
        make_block(), "int8+sparse", pruning="magnitude", sparsity=0.7, sparse_kernel="sparse", progress=False
    )
    rows = {row.name: row for row in fastquant.report(model).layers}
    up = rows["up"]
    assert up.format == "sparse 70% unstructured bitmap16, int8 per-channel values"
    # values (30% of 512x256 int8 + 64 padding) + masks (512 x 16 int16) + offsets (513 int64) + scales
    assert up.bytes_after == (512 * 256 - round(0.7 * 512 * 256)) + 64 + 512 * 16 * 2 + 513 * 8 + 512 * 4
    assert "70% pruned" in up.note and rows["lm_head"].note == "skipped by name"

    auto = fastquant.patch(make_block(), "sparse", pruning="magnitude", sparsity=0.5, progress=False)
    note = {row.name: row.note for row in fastquant.report(auto).layers}["up"]
    assert "kernel kept: sparse bitmap16" in note and ", csr16 " in note and "at 1 token" in note
    for layer in auto.modules():
        if isinstance(layer, SparseLinear):  # the layout the choice kept, with indices only where csr16 runs
            assert (layer.layout == "csr16") == (layer.column_indices is not None)


def test_kernel_choice_description():
    choice = KernelChoice("dense", "bitmap16", "int8", {"bitmap16": 0.2, "csr16": 0.3}, dense_ms=0.1, sparsity=0.5)
    assert choice.describe() == (
        "50% pruned; dense int8 kernel kept: sparse bitmap16 0.200 ms, csr16 0.300 ms vs dense int8 0.100 ms at "
        "1 token, weights from memory (2.00x)"
    )
    choice = KernelChoice("sparse", "csr16", "float", {"bitmap16": 0.4, "csr16": 0.1}, dense_ms=0.3, sparsity=0.9)
    assert choice.describe().startswith("90% pruned; sparse csr16 kernel kept:") and choice.describe().endswith(
        "(3.00x)"
    )


def test_kernel_choice_times_copies_that_do_not_fit_in_cache():
    """The choice is timed on weights streamed from memory: the rotation's copies total at least twice the
    last-level cache, each with its own storage, each computing the same thing."""
    cache = kernel_choice.last_level_cache_bytes(torch.device("cpu"))
    assert cache >= 2**20  # every x86 or Arm server CPU has at least 1 MiB of last-level cache
    layer = SparseLinear.from_pruned(nn.Linear(256, 384), torch.rand(384, 256) < 0.5)
    copies = kernel_choice._copies_from_memory(layer, torch.device("cpu"))
    assert copies[0] is layer
    per_copy = kernel_choice._weight_bytes(layer)
    assert len(copies) * per_copy >= 2 * cache or len(copies) == kernel_choice.MAX_COPIES
    assert len({c.values.data_ptr() for c in copies}) == len(copies)
    x = torch.randn(1, 256)
    with torch.no_grad():
        assert all(torch.equal(c(x), layer(x)) for c in copies[:3])


def test_two_to_four_pattern():
    model = fastquant.patch(
        make_block(), "sparse", pruning="magnitude", pattern="2:4", sparsity=None, sparse_kernel="sparse"
    )
    groups = model.up.dequantize().reshape(512, -1, 4)
    assert bool(((groups != 0).sum(-1) <= 2).all())
    assert "2:4" in model.up.format


def test_tied_weight_is_copied_before_pruning():
    model = make_block()
    model.lm_head.weight = model.embed.weight
    embed_before = model.embed.weight.detach().clone()
    fastquant.patch(
        model, "sparse", pruning="magnitude", skip=(), quantize_tied=True, sparse_kernel="sparse", progress=False
    )
    assert isinstance(model.lm_head, SparseLinear)
    assert torch.equal(model.embed.weight, embed_before)  # the embedding is not pruned with it


def test_prune_keeps_dense_layers_and_returns_masks():
    model = make_block()
    masks = fastquant.prune(model, pruning="magnitude", sparsity=0.25, progress=False)
    assert set(masks) == {"up", "down"}  # lm_head skipped by name, tiny too small
    assert type(model.up) is nn.Linear
    assert torch.equal(model.up.weight != 0, masks["up"])
    assert masks["up"].float().mean().item() == pytest.approx(0.75, abs=1 / 256)


def test_calibrated_pruning_needs_calibration():
    with pytest.raises(ValueError, match="calibration"):
        fastquant.patch(make_block(), "sparse", pruning="wanda")


def test_calibrated_pruning_runs_on_model_inputs():
    model = make_block()
    batches = [torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    fastquant.patch(model, "int8+sparse", pruning="sparsegpt", calibration=batches, sparse_kernel="sparse")
    assert isinstance(model.up, SparseLinear) and model.up.sparsity == pytest.approx(0.5, abs=1 / 256)
    with torch.no_grad():
        assert torch.isfinite(model(TOKENS)).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.5), "sparsity"),
        (dict(sparsity=float("nan")), "sparsity"),
        (dict(pattern="3:5"), "5"),
        (dict(pruning="random"), "pruning"),
        (dict(sparse_kernel="fastest"), "sparse_kernel"),
        (dict(group_size=64), "group_size applies to the int8 methods"),
    ],
)
def test_bad_sparse_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastquant.patch(make_block(), "sparse", progress=False, **{"pruning": "magnitude", **kwargs})


def test_nan_weight_names_the_layer():
    model = make_block()
    with torch.no_grad():
        model.up.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layer 'up'.*NaN/inf"):
        fastquant.patch(model, "sparse", pruning="magnitude")


def test_compiled_sparse_model_matches_eager():
    model = fastquant.patch(make_block(), "int8+sparse", pruning="magnitude", sparse_kernel="sparse", progress=False)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(TOKENS), model(TOKENS), rtol=1e-5, atol=1e-5)


def test_dtype_moves_keep_fp32_scales_and_cast_float_values():
    model = fastquant.patch(make_block(), "int8+sparse", pruning="magnitude", sparse_kernel="sparse", progress=False)
    model.to(torch.bfloat16)
    assert model.up.scales.dtype == torch.float32 and model.up.values.dtype == torch.int8
    assert model.up.masks.dtype == torch.int16 and model.up.row_offsets.dtype == torch.int64
    with torch.no_grad():
        assert model(TOKENS).dtype == torch.bfloat16
    floats = fastquant.patch(make_block(), "sparse", pruning="magnitude", sparse_kernel="sparse", progress=False).to(
        torch.bfloat16
    )
    assert floats.up.values.dtype == torch.bfloat16
    packed = reference.sparse_pack(floats.up.dequantize())
    assert torch.equal(packed[1], floats.up.masks)


def test_int8_with_calibration_uses_gptq_rounding():
    """GPTQ trades weight error for output error: on the calibration inputs the layer's output is closer to the
    float layer's than round-to-nearest gets, although its weights are further away."""
    torch.manual_seed(0)
    mixing = torch.randn(64, 256) / 8
    batches = [torch.randn(32, 64) @ mixing for _ in range(4)]  # correlated inputs: GPTQ has something to use
    float_model = nn.Sequential(nn.Linear(256, 512))
    rtn = fastquant.patch(copy.deepcopy(float_model), "int8", skip=())
    gptq = fastquant.patch(copy.deepcopy(float_model), "int8", skip=(), calibration=batches, progress=False)
    assert isinstance(gptq[0], Int8Linear) and "GPTQ" in fastquant.report(gptq).layers[0].note
    x = torch.cat(batches)
    with torch.no_grad():
        expected = float_model(x)
        rtn_error = (rtn(x) - expected).norm()
        gptq_error = (gptq(x) - expected).norm()
    assert gptq_error < 0.8 * rtn_error


@pytest.mark.parametrize("fp32_precision", ["highest", "medium"], indirect=True)
def test_csr16_layer_prefills_with_bitmap16_where_that_has_a_prefill_kernel(fp32_precision):
    """A csr16 layer with int8 values hands calls of more than 16 rows to the bitmap16 op where that op has
    the bf16 prefill path (AVX-512, fp32 activations under "medium" only): same weights, so the same result
    as the bitmap16 layout."""
    model = fastquant.patch(
        make_block(), "int8+sparse", pruning="magnitude", sparsity=0.9, sparse_kernel="csr16", progress=False
    )
    layer = model.up
    bitmap = copy.deepcopy(layer).set_layout("bitmap16")
    path = extension.sparse_linear_kernel_path(
        torch.device("cpu"), 17, layer.out_features, layer.in_features, torch.int8, torch.float32
    )
    assert layer.bitmap16_prefill_rows == (17 if path == "cpu_avx512_bf16_tiles" else 0)
    with torch.no_grad():
        for rows in (1, 16, 17, 40):
            x = torch.randn(rows, layer.in_features)
            y, y_bitmap = layer(x), bitmap(x)
            if layer.bitmap16_prefill_rows and rows >= layer.bitmap16_prefill_rows:
                torch.testing.assert_close(y, y_bitmap, rtol=0, atol=0)
            else:
                torch.testing.assert_close(y, y_bitmap, rtol=1e-5, atol=1e-5)


def test_small_layers_keep_bitmap16_without_timing(monkeypatch):
    def no_timing(*args):
        raise AssertionError("a layer below MIN_TIMED_WEIGHTS was timed")

    monkeypatch.setattr(fastquant.patching, "choose_kernel", no_timing)
    model = nn.Sequential(nn.Linear(128, 256))  # 32K weights: compressed, but too small to time
    assert 4096 <= 128 * 256 < kernel_choice.MIN_TIMED_WEIGHTS
    fastquant.patch(model, "sparse", pruning="magnitude", skip=(), progress=False)
    assert isinstance(model[0], SparseLinear) and model[0].layout == "bitmap16"
    assert "kept untimed" in fastquant.report(model).layers[0].note
