"""int4 above the op: Int4Linear, fastquant.patch(model, "int4"), GPTQ on the int4 grid, save/load, report, CLI.

The op itself (kernels vs reference, opcheck, compile, ISA levels) is tested in test_int4_linear.py. Here the
layer's output is compared with a float linear holding the layer's own dequantized weight: the same numbers
computed by torch, so the tolerance is fp32 accumulation-order noise (rtol 1e-5 of sum |x| |w|) in float32 and
one rounding of the output (2^-8 relative for bfloat16, 2^-11 for float16) in the half types.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import fastquant
from fastquant import FastquantFormatError, Int4Linear, Int8Linear, protect
from fastquant.algorithms import pruning
from fastquant.algorithms.grids import INT4_GROUP_SIZES, Int4Grid, Int8Grid, int4_codes
from fastquant.app import cli
from fastquant.kernels import extension, reference
from fastquant.serialization import read_manifest
from helpers import prune, spy_init_devices

transformers = pytest.importorskip("transformers")
from test_cli import llama_dir  # noqa: E402, F401 (a fixture)
from test_serialization import _edit_manifest, fresh_like, tiny_llama  # noqa: E402

from helpers import fixed16_block_max  # noqa: E402

DTYPE_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}


def _random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Weights with outliers and a per-row spread, never all zero (a zero weight hides scale bugs)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).add(0.1)
    w[torch.rand(n, k, generator=g) < 0.01] *= 6
    return w


def _linear(n: int, k: int, seed: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(_random_weight(n, k, seed))
        if bias:
            layer.bias.uniform_(-1, 1)
    return layer


def _assert_matches_float(layer: Int4Linear, x: torch.Tensor) -> None:
    """The layer's output vs torch's linear on its dequantized weight, in fp32, with the stated tolerance."""
    weight = layer.dequantize().float()
    bias = None if layer.bias is None else layer.bias.float()
    expected = torch.nn.functional.linear(x.float(), weight, bias)
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == x.dtype and got.shape == expected.shape
    scale = x.float().abs() @ weight.abs().T + (0 if bias is None else bias.abs())
    tol = DTYPE_RTOL[x.dtype] * scale + 1e-6 + DTYPE_RTOL[x.dtype] * expected.abs()
    rows = x[..., 0].numel()
    path = extension.int4_linear_kernel_path(
        x.device, rows, layer.out_features, layer.in_features, layer.group_size, x.dtype
    )
    if "fixed16" in path:  # x rounded to 16 bits per 32-column block: |x~ - x| <= block max / 65024
        tol = tol + (fixed16_block_max(x).float() @ weight.abs().T) / 65024
    assert bool(((got.float() - expected).abs() <= tol).all()), float((got.float() - expected).abs().max())


# ------------------------------------------------------------------------------------------ the layer
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES)
@pytest.mark.parametrize(("n", "k"), [(1, 1025), (17, 96), (33, 40), (64, 256)])
def test_from_linear_forward_matches_its_dequantized_weight(n, k, group_size, symmetric):
    linear = _linear(n, k, seed=n * k + group_size)
    layer = Int4Linear.from_linear(linear, group_size, symmetric)
    assert layer.qweight.shape == (n, -(-k // 64) * 32) and layer.qweight.dtype == torch.uint8
    assert layer.scales.shape == (n, -(-k // group_size)) and layer.scales.dtype == torch.float16
    assert (layer.offsets is None) == symmetric
    g = torch.Generator().manual_seed(k)
    for dtype in DTYPE_RTOL:
        _assert_matches_float(layer.to(dtype), torch.randn(3, 5, k, generator=g).to(dtype))
    layer.float()
    assert layer.scales.dtype == torch.float16  # a model-wide dtype move leaves the format alone
    assert layer.packed_bytes() == layer.qweight.numel() + 2 * layer.scales.numel() * (1 if symmetric else 2)
    assert layer.format == f"int4 {'sym' if symmetric else 'asym'} group={group_size}"


@pytest.mark.parametrize("symmetric", [True, False])
def test_round_to_nearest_error_is_within_a_step(symmetric):
    """Every weight lands within one step d of its value (half a step except where the grid's edge clamps:
    symmetric reaches +7d on the far side of the largest magnitude, -8d on its side), and the layer is the
    reference quantizer's result."""
    linear = _linear(40, 1000, seed=3)
    layer = Int4Linear.from_linear(linear, 64, symmetric)
    qweight, scales, offsets = reference.int4_quantize(linear.weight, 64, symmetric)
    assert torch.equal(layer.qweight, qweight) and torch.equal(layer.scales, scales)
    step = reference.expand_group_scales(layer.scales.float().abs(), 1000, 64)
    error = (layer.dequantize() - linear.weight).abs()
    assert bool((error <= step * (1 + 1e-3) + 1e-6).all())
    assert float((error <= step / 2 * (1 + 1e-3) + 1e-6).float().mean()) > 0.98


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_rounding_rule_is_round_to_nearest_s(symmetric):
    """grids.int4_codes (what GPTQ rounds each column with) gives reference.int4_quantize's codes on its own
    grid, including all-equal groups (step 0) and a partial last group."""
    w = _random_weight(9, 200, seed=11)
    w[3, 32:64] = 0.25  # one group of equal values: step 0
    w[4, :32] = 0.0
    qweight, scales, offsets = reference.int4_quantize(w, 64, symmetric)
    assert torch.equal(int4_codes(w, scales, offsets, 64), reference.int4_unpack(qweight, 200))


def test_from_codes_takes_codes_or_packed_and_refuses_bad_data():
    linear = _linear(5, 100, seed=1)
    rtn = Int4Linear.from_linear(linear, 32, symmetric=False)
    codes = reference.int4_unpack(rtn.qweight, 100)
    bias = linear.bias.detach()
    a = Int4Linear.from_codes(codes, rtn.scales, rtn.offsets, bias, 32)
    b = Int4Linear.from_codes(rtn.qweight, rtn.scales, rtn.offsets, bias, 32, in_features=100)
    for layer in (a, b):
        assert torch.equal(layer.qweight, rtn.qweight) and torch.equal(layer.dequantize(), rtn.dequantize())
        assert not layer.symmetric and layer.in_features == 100 and torch.equal(layer.bias, bias)
    with pytest.raises(ValueError, match="codes must be in 0..15"):
        Int4Linear.from_codes(codes.clone().fill_(16), rtn.scales, rtn.offsets, bias, 32)
    corrupt = rtn.qweight.clone()
    corrupt[2, -1] |= 0x10  # a code past K=100 in the last block's padding
    with pytest.raises(ValueError, match="past in_features=100 must be 0"):
        Int4Linear.from_codes(corrupt, rtn.scales, rtn.offsets, bias, 32, in_features=100)
    with pytest.raises(ValueError, match="scales must be float16"):
        Int4Linear.from_codes(codes, rtn.scales.float(), None, bias, 32)
    with pytest.raises(ValueError, match=r"offsets must be float16 of shape .*\(5, 4\)"):
        Int4Linear.from_codes(codes, rtn.scales, rtn.offsets[:, :2], bias, 32)
    with pytest.raises(ValueError, match="neither"):
        Int4Linear.from_codes(codes[:, :50], rtn.scales, None, bias, 32, in_features=100)
    with pytest.raises(ValueError, match="bias must have shape"):
        Int4Linear.from_codes(codes, rtn.scales, None, bias[:3], 32)


@pytest.mark.parametrize("group_size", [0, 16, 48, 96, 512, -1, True, 32.0])
def test_bad_group_sizes_are_value_errors(group_size):
    linear = _linear(8, 64, seed=0)
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4Linear.from_linear(linear, group_size)
    with pytest.raises(ValueError, match="group_size must be one of"):
        fastquant.patch(tiny_llama(), "int4", group_size=group_size)
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4Grid(group_size)


def test_symmetric_is_for_int4_only():
    with pytest.raises(ValueError, match="symmetric=False applies to method='int4' only"):
        fastquant.patch(tiny_llama(), "int8", symmetric=False)
    with pytest.raises(ValueError, match="symmetric must be True or False"):
        fastquant.patch(tiny_llama(), "int4", symmetric="no")


# ------------------------------------------------------------------------------------------ patch
@pytest.mark.parametrize("symmetric", [True, False])
def test_patch_matches_the_float_model_with_dequantized_weights(symmetric):
    model = tiny_llama(seed=2)
    reference_model = copy.deepcopy(model)
    assert fastquant.patch(model, "int4", symmetric=symmetric) is model
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert len(layers) == 14 and all(m.group_size == 32 for m in layers.values())
    with torch.no_grad():
        for name, layer in layers.items():
            reference_model.get_submodule(name).weight.copy_(layer.dequantize())
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(0))
    # The layers' kernel for these 38 rows: cpu_avx512_bf16 rounds x to bf16 (2^-9 per product), as int8_linear's
    # prefill does; fp32 kernels agree to 1e-4.
    path = extension.int4_linear_kernel_path(torch.device("cpu"), ids.numel(), 256, 128, 32, torch.float32)
    tol = 1e-2 if "bf16" in path else 1e-4
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference_model(ids).logits, rtol=tol, atol=tol)
    rows = {row.name: row for row in fastquant.report(model).layers}
    row = rows["model.layers.0.mlp.up_proj"]
    assert row.format == f"int4 {'sym' if symmetric else 'asym'} group=32"
    # 0.5 byte per weight plus 2 (and 2) bytes per 32 weights, against 4 bytes in float32
    assert row.bytes_after == 256 * 128 // 2 + 256 * 4 * 2 * (1 if symmetric else 2)
    assert 0.01 < row.weight_error < 0.2 and row.output_error is None
    assert "weight error" in fastquant.report(model).to_markdown()


def test_patch_with_int8_activations_rounds_every_layer_input():
    """Int4(int8_activations=True): every int4 layer rounds its input (the report says so), the model computes
    what the same layers give on reference.int8_activation_round of their inputs, and it stays close to the
    model without the rounding (a few tenths of a percent, not equal)."""
    model = tiny_llama(seed=3)
    plain = fastquant.patch(copy.deepcopy(model), "int4")
    rounded = fastquant.patch(model, fastquant.Int4(int8_activations=True))
    layers = [m for m in rounded.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 14 and all(m.int8_activations for m in layers)
    assert not any(m.int8_activations for m in plain.modules() if isinstance(m, Int4Linear))
    rows = {row.name: row for row in fastquant.report(rounded).layers}
    assert rows["model.layers.0.mlp.up_proj"].format == "int4 sym group=32 x=int8"
    layer = rounded.model.layers[0].mlp.down_proj
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.linear(reference.int8_activation_round(x), layer.dequantize())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = rounded(ids).logits, plain(ids).logits
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_int8_activations_must_be_a_bool():
    with pytest.raises(ValueError, match="int8_activations must be True or False"):
        fastquant.Int4(int8_activations="yes")
    with pytest.raises(ValueError, match="int8_activations must be True or False"):
        Int4Linear(64, 8, int8_activations=1)


def test_patched_model_follows_dtype_moves():
    model = fastquant.patch(tiny_llama(seed=4), "int4", group_size=64).to(torch.bfloat16)
    layer = model.model.layers[1].self_attn.o_proj
    assert layer.scales.dtype == torch.float16 and layer.dtype == torch.bfloat16
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert model(ids).logits.dtype == torch.bfloat16


def test_repatching_an_int4_model_is_refused():
    model = fastquant.patch(tiny_llama(), "int4")
    with pytest.raises(fastquant.AlreadyPatchedError, match="int4 sym group=32"):
        fastquant.patch(model, "int8")


def _calibration(n: int = 4, seq: int = 48, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (2, seq), generator=g) for _ in range(n)]


def _output_error(model: nn.Module, float_model: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.inference_mode():
        num = sum(float((model(b).logits - float_model(b).logits).pow(2).sum()) for b in batches)
        den = sum(float(float_model(b).logits.pow(2).sum()) for b in batches)
    return (num / den) ** 0.5


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_int4_beats_round_to_nearest_on_the_calibration_output(symmetric):
    float_model = tiny_llama(seed=5)
    batches = _calibration()
    rtn = fastquant.patch(copy.deepcopy(float_model), "int4", symmetric=symmetric)
    gptq = fastquant.patch(copy.deepcopy(float_model), "int4", symmetric=symmetric, calibration=batches, progress=False)
    assert any(isinstance(m, Int4Linear) for m in gptq.modules())
    rtn_error, gptq_error = _output_error(rtn, float_model, batches), _output_error(gptq, float_model, batches)
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)
    rows = [row for row in fastquant.report(gptq).layers if row.format.startswith("int4")]
    assert rows and all(row.output_error is not None and 0 < row.output_error < 1 for row in rows)
    assert all("GPTQ" in row.note for row in rows)


def test_gptq_column_loop_on_one_layer():
    """sparsegpt_prune with an int4 rounder: the weight it returns is exactly its codes dequantized, each group's
    scale is round-to-nearest's rule on the group as GPTQ reached it, and the output error is below RTN's."""
    g = torch.Generator().manual_seed(0)
    n, k = 48, 200  # K not a multiple of the group: the last group is partial
    w = _random_weight(n, k, seed=7)
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, k, generator=g) + 0.1 * torch.randn(512, k, generator=g)
    hessian = 2 * x.T @ x / x.shape[0]
    for symmetric in (True, False):
        grid = Int4Grid(64, symmetric)
        rounder = grid.rounder(w)
        new, keep, codes = pruning.sparsegpt_prune(w, hessian, 0.0, rounder=rounder)
        q = rounder.result()
        assert keep.all() and codes.dtype == torch.uint8 and codes.shape == (n, k) and int(codes.max()) <= 15
        assert torch.equal(codes, q.codes)
        assert torch.equal(new, grid.dequantize(q))
        assert torch.equal(int4_codes(new, q.scales, q.offsets, 64), q.codes)  # the weight sits on its grid
        # The first group's grid is RTN's on the untouched first columns (nothing was compensated into them yet).
        first = grid.rtn(w[:, :64])
        assert torch.equal(q.scales[:, 0], first.scales[:, 0])
        rtn = grid.dequantize(grid.rtn(w))
        gptq_error = pruning.relative_output_error(new, w, hessian)
        rtn_error = pruning.relative_output_error(rtn, w, hessian)
        assert gptq_error < 0.8 * rtn_error, (symmetric, gptq_error, rtn_error)


def test_gptq_act_order_on_one_layer():
    """Activation order with static groups: every group's grid is RTN's on the original weight, codes and scales
    stay in the weight's column order (the weight returned is its codes dequantized), and rounding the high-energy
    inputs first gives a lower output error than the plain order when input scales differ widely."""
    g = torch.Generator().manual_seed(2)
    n, k = 40, 160
    w = _random_weight(n, k, seed=11)
    # Inputs whose energy grows along K: the plain loop rounds the loudest columns last, with nothing left to
    # absorb their error; activation order rounds them first.
    x = torch.randn(600, k, generator=g) * torch.linspace(0.05, 3.0, k) ** 2
    hessian = 2 * x.T @ x / x.shape[0]
    for grid in (Int4Grid(32, True), Int4Grid(32, False), Int8Grid(-1), Int8Grid(32)):
        keep = torch.ones(n, k, dtype=torch.bool)
        rounder = grid.rounder(w)
        knobs = {"block_size": 64, "damp": 0.01}
        new = pruning._gptq_act_order(w, hessian, keep, rounder, knobs)
        q = rounder.result()
        assert torch.equal(new, grid.dequantize(q)), grid
        assert torch.equal(q.scales, grid.rtn(w).scales), grid  # static groups: RTN's grid of the weight
        plain_rounder = grid.rounder(w)
        plain, _, _ = pruning.sparsegpt_prune(w, hessian, 0.0, keep=keep, rounder=plain_rounder, **knobs)
        act = pruning.relative_output_error(new, w, hessian)
        assert act < pruning.relative_output_error(plain, w, hessian), grid
        assert act < pruning.relative_output_error(grid.dequantize(grid.rtn(w)), w, hessian), grid


def test_gptq_act_order_keeps_pruned_weights_zero():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 64, generator=g)
    keep = torch.rand(24, 64, generator=g) > 0.5
    x = torch.randn(200, 64, generator=g) * torch.rand(64, generator=g)
    grid = Int8Grid(32)
    new = pruning._gptq_act_order(w * keep, x.T @ x, keep, grid.rounder(w * keep), {"block_size": 16, "damp": 0.01})
    assert torch.all(new[~keep] == 0) and not torch.equal(new[keep], (w * keep)[keep])


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_patch_with_act_order_gptq(method):
    float_model = tiny_llama(seed=5)
    batches = _calibration()
    config = (fastquant.Int4 if method == "int4" else fastquant.Int8)(rounding=fastquant.GPTQ(batches, act_order=True))
    model = fastquant.patch(copy.deepcopy(float_model), config, progress=False)
    rtn = fastquant.patch(copy.deepcopy(float_model), method)
    assert _output_error(model, float_model, batches) < _output_error(rtn, float_model, batches)
    rows = [row for row in fastquant.report(model).layers if row.format.startswith(method)]
    assert rows and all("activation order" in row.note for row in rows)
    with pytest.raises(ValueError, match="act_order must be True or False"):
        fastquant.GPTQ(batches, act_order="yes")


def test_int8_grid_rounder_is_the_loop_it_replaced():
    """The int8 path through a rounder: codes * scales is the weight GPTQ returns, scales are RTN's."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 96, generator=g)
    x = torch.randn(300, 96, generator=g)
    for group_size in (-1, 32):
        scales = reference.int8_quantize(w, group_size)[1]
        new, _, codes = pruning.sparsegpt_prune(w, x.T @ x, 0.0, scales=scales, group_size=group_size)
        assert torch.equal(new, reference.int8_dequantize(codes, scales, group_size))
        rounder = Int8Grid(group_size).rounder(w)
        again, _, codes_again = pruning.sparsegpt_prune(w, x.T @ x, 0.0, rounder=rounder)
        assert torch.equal(again, new) and torch.equal(codes_again, codes)
    with pytest.raises(ValueError, match="not both"):
        pruning.sparsegpt_prune(w, x.T @ x, 0.0, scales=scales, group_size=32, rounder=Int8Grid(32).rounder(w))


def test_int4_is_not_combined_with_pruning():
    model = tiny_llama()
    with pytest.raises(ValueError, match="int4 quantization is not combined with pruning"):
        prune(model, pruning.prunable_layers(model), grid=Int4Grid(32))


def test_report_shows_errors_for_every_method():
    batches = _calibration(n=2)
    cases = {
        "int8": dict(),
        "int8-gptq": dict(calibration=batches),
        "sparse": dict(pruning="magnitude", sparsity=0.5, sparse_kernel="sparse"),
        "int8+sparse": dict(calibration=batches, sparsity=0.5, sparse_kernel="sparse"),
    }
    for label, kwargs in cases.items():
        method = label.removesuffix("-gptq")
        model = fastquant.patch(tiny_llama(seed=6), method, progress=False, **kwargs)
        rows = [r for r in fastquant.report(model).layers if r.name != "lm_head"]
        assert rows and all(r.weight_error is not None and 0 < r.weight_error < 1 for r in rows), label
        calibrated = "calibration" in kwargs
        assert all((r.output_error is not None) == calibrated for r in rows), label


# ------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize(("symmetric", "int8_activations"), [(True, False), (False, False), (True, True)])
def test_save_load_round_trip_is_bit_exact(tmp_path, symmetric, int8_activations):
    config = fastquant.Int4(group_size=64, symmetric=symmetric, int8_activations=int8_activations)
    model = fastquant.patch(tiny_llama(seed=8), config)
    path = tmp_path / "m.safetensors"
    manifest = fastquant.save(model, path)
    assert manifest["method"] == "int4"
    spec = manifest["layers"]["model.layers.0.mlp.down_proj"]
    assert spec == {
        "type": "int4",
        "in_features": 256,
        "out_features": 128,
        "bias": False,
        "group_size": 64,
        "symmetric": symmetric,
        "int8_activations": int8_activations,
        "dtype": "float32",
    }
    loaded = fastquant.load(fresh_like(model), path)
    assert loaded.model.layers[0].mlp.down_proj.int8_activations is int8_activations
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert isinstance(loaded.model.layers[0].mlp.down_proj, Int4Linear)
    ids = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_signed_and_encrypted_int4_round_trip(tmp_path, monkeypatch):
    pytest.importorskip("cryptography")
    private, public = protect.new_signing_key(tmp_path / "signer.pem")
    key = protect.new_encryption_key()
    model = fastquant.patch(tiny_llama(seed=9), "int4", symmetric=False)
    path = tmp_path / "m.safetensors"
    fastquant.save(model, path)
    protect.protect_file(path, sign_key=protect.read_signing_key(private), encryption_key=key)
    loaded = fastquant.load(fresh_like(model), path, trusted_keys=[public], decryption_key=key)
    assert loaded._fastquant_checkpoint["encrypted"] and loaded._fastquant_checkpoint["signer"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    other, _ = protect.new_signing_key(tmp_path / "other.pem")
    with pytest.raises(FastquantFormatError, match="not a trusted key"):
        fastquant.load(fresh_like(model), path, trusted_keys=[tmp_path / "other.pem.pub"], decryption_key=key)


def test_huge_int4_layer_claim_is_refused_before_allocating(tmp_path, monkeypatch):
    model = fastquant.patch(tiny_llama(), "int4")
    path = tmp_path / "m.safetensors"
    fastquant.save(model, path)
    name = "model.layers.0.mlp.up_proj"
    _edit_manifest(path, lambda m: m["layers"][name].update(in_features=5_000_000, out_features=3_000_000))
    devices = spy_init_devices(monkeypatch, Int4Linear)
    with pytest.raises(FastquantFormatError, match=f"invalid manifest entry for layer '{name}'"):
        fastquant.load(fresh_like(model), path)
    assert devices and set(devices) == {"meta"}


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (dict(symmetric=False), "needs tensor .*offsets"),
        (dict(group_size=48), "group_size must be one of"),
        (dict(group_size=64), "implies"),
        (dict(symmetric="yes"), "symmetric must be true or false"),
        (dict(int8_activations="yes"), "int8_activations must be True or False"),
        (dict(in_features=-3), "invalid manifest entry"),
    ],
)
def test_edited_int4_manifest_entries_are_refused(tmp_path, edit, match):
    model = fastquant.patch(tiny_llama(), "int4")
    path = tmp_path / "m.safetensors"
    fastquant.save(model, path)
    name = "model.layers.1.self_attn.q_proj"
    _edit_manifest(path, lambda m: m["layers"][name].update(edit))
    with pytest.raises(FastquantFormatError, match=match):
        fastquant.load(fresh_like(model), path)


def test_nonzero_padding_codes_are_refused_at_load(tmp_path):
    """K = 96 leaves half of the last 64-block as padding: a file whose padding nibbles are set (consistent
    hashes, so only the content check can see it) is refused, as corrupt packed data."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 96)).eval()
    fastquant.patch(model, "int4")
    assert isinstance(model[0], Int4Linear)
    path = tmp_path / "m.safetensors"
    fastquant.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
    tensors["0.qweight"][0, -1] |= 0xF0  # code of k = 64 + 32 + 31 = 127 > 96
    manifest = json.loads(metadata["fastquant"])
    manifest["tensors"]["0.qweight"]["sha256"] = fastquant.serialization._sha256(tensors["0.qweight"])
    metadata["fastquant"] = json.dumps(manifest, sort_keys=True)
    save_file(tensors, str(path), metadata=metadata)
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 96)).eval()
    with pytest.raises(FastquantFormatError, match="past in_features=96 must be 0"):
        fastquant.load(fresh, path)
    assert type(fresh[0]) is nn.Linear or torch.equal(fresh[0].qweight, torch.zeros_like(fresh[0].qweight))


# ------------------------------------------------------------------------------------------ CLI
def test_cli_compress_and_eval_int4(llama_dir, tmp_path):  # noqa: F811 (the fixture)
    out = tmp_path / "out"
    args = ["compress", str(llama_dir), "--method", "int4", "--group-size", "64", "--asymmetric", "-o", str(out)]
    assert cli.main(args) == 0
    manifest = read_manifest(out)
    assert manifest["method"] == "int4"
    specs = list(manifest["layers"].values())
    assert specs and all(s["type"] == "int4" and s["group_size"] == 64 and not s["symmetric"] for s in specs)
    model, _ = fastquant.from_pretrained(out)
    expected = fastquant.patch(
        transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval(), "int4", group_size=64, symmetric=False
    )
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, expected(ids).logits)

    result_path = tmp_path / "eval.json"
    args = ["eval", "--model", str(llama_dir), "--method", "int4-gptq", "--tokens", "300", "--window", "128"]
    assert cli.main([*args, "--calibration-sequences", "2", "--json", str(result_path)]) == 0
    result = json.loads(result_path.read_text())
    assert result["method"] == "int4-gptq" and result["symmetric"] is True
    assert abs(result["perplexity_delta_pct"]) < 10
    assert result["compressed_bytes"] < result["float_bytes"]


def test_cli_compress_int4_with_int8_activations(llama_dir, tmp_path):  # noqa: F811 (the fixture)
    out = tmp_path / "out"
    assert cli.main(["compress", str(llama_dir), "--method", "int4", "--int8-activations", "-o", str(out)]) == 0
    specs = list(read_manifest(out)["layers"].values())
    assert specs and all(s["type"] == "int4" and s["int8_activations"] is True for s in specs)
    model, _ = fastquant.from_pretrained(out)
    assert all(m.int8_activations for m in model.modules() if isinstance(m, Int4Linear))


def test_cli_refuses_asymmetric_int8(llama_dir, capsys):  # noqa: F811 (the fixture)
    assert cli.main(["eval", "--model", str(llama_dir), "--method", "int8", "--asymmetric"]) == 2
    assert "--asymmetric applies to the int4 methods only" in capsys.readouterr().out
    assert cli.main(["eval", "--model", str(llama_dir), "--method", "sparse", "--int8-activations"]) == 2
    assert "--int8-activations applies to the int8 and int4 methods only" in capsys.readouterr().out
    assert cli.main(["eval", "--model", str(llama_dir), "--method", "int4", "--group-size", "48"]) == 2
    assert "group_size must be one of" in capsys.readouterr().out


def test_int8_module_is_unchanged_by_the_shared_dtype_rule():
    layer = Int8Linear.from_linear(_linear(20, 64, seed=2)).to(torch.float16)
    assert layer.scales.dtype == torch.float32 and layer.dtype == torch.float16
