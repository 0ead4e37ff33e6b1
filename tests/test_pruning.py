"""Pruning algorithms (fastquant.pruning): exact counts, N:M validity, Wanda/SparseGPT behaviour, int8, sequential
calibration on tiny transformers models, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastquant.algorithms import pruning
from fastquant.algorithms.pruning import (
    dense_target_weight,
    magnitude_mask,
    refit_kept_weights,
    sparsegpt_prune,
    wanda_mask,
)
from fastquant.kernels import reference
from helpers import prune, tiny_llama_config


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Activations like a transformer's hidden states: most energy in a few directions (strongly correlated
    features), uneven feature scales, plus a little independent noise so X^T X is full rank."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(max(k // 4, 1), k, generator=g)
    scale = torch.exp(torch.randn(k, generator=g))
    low_rank = torch.randn(tokens, mix.shape[0], generator=g) @ mix
    return (low_rank + 0.1 * torch.randn(tokens, k, generator=g)) * scale


def random_weight(n: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def layer_case(n: int, k: int, pattern: str) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """An (n, k) weight, 1024 correlated input rows and the sparsity that goes with ``pattern`` (None for N:M)."""
    return random_weight(n, k), correlated_inputs(1024, k), 0.5 if pattern == "unstructured" else None


def pruned_per_group(mask: torch.Tensor, m: int) -> torch.Tensor:
    n, k = mask.shape
    return (~mask).reshape(n, k // m, m).sum(-1)


def tiny_llama(seed: int = 0, layers: int = 2):
    import transformers

    config = tiny_llama_config(vocab_size=96, num_hidden_layers=layers, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def token_batches(n: int = 3, batch: int = 2, seq: int = 16, vocab: int = 96) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


# -------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("shape", [(1, 16), (3, 17), (17, 64), (24, 301)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_exact_pruned_counts_unstructured(shape, sparsity):
    n, k = shape
    w = random_weight(n, k)
    x = correlated_inputs(64, k)
    assert (~magnitude_mask(w, sparsity)).sum() == round(sparsity * n * k)
    per_row = (~wanda_mask(w, x.norm(dim=0), sparsity)).sum(1)
    assert torch.equal(per_row, torch.full((n,), round(sparsity * k)))
    _, mask, _ = sparsegpt_prune(w, x.T @ x, sparsity, block_size=16)
    assert (~mask).sum() == round(sparsity * n * k)


def test_magnitude_prunes_the_smallest():
    w = random_weight(33, 70)
    mask = magnitude_mask(w, 0.4)
    assert w.abs()[~mask].max() <= w.abs()[mask].min()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_n_m_masks_are_valid(pattern):
    n_keep, m = map(int, pattern.split(":"))
    n, k = 24, 96
    w = random_weight(n, k)
    x = correlated_inputs(128, k)
    masks = {
        "magnitude": magnitude_mask(w, None, pattern),
        "wanda": wanda_mask(w, x.norm(dim=0), 1 - n_keep / m, pattern),  # the implied sparsity is accepted
        "sparsegpt": sparsegpt_prune(w, x.T @ x, None, pattern, block_size=20)[1],  # 20: groups must not straddle
    }
    for name, mask in masks.items():
        counts = pruned_per_group(mask, m)
        assert bool((counts >= m - n_keep).all()), name
        assert bool((counts == m - n_keep).all()), name  # exactly M-N pruned on random weights
    # magnitude within each group: every pruned |w| <= every kept |w| of the same group
    groups = w.abs().reshape(n, k // m, m)
    keep = masks["magnitude"].reshape(n, k // m, m)
    pruned_max = groups.masked_fill(keep, -1).amax(-1)
    kept_min = groups.masked_fill(~keep, float("inf")).amin(-1)
    assert bool((pruned_max <= kept_min).all())


def test_global_magnitude_total_count_and_threshold():
    # Coarse values make many ties at the threshold: the count must still be exact.
    weights = [torch.round(random_weight(n, k, seed) * 4) / 4 for n, k, seed in [(16, 32, 1), (8, 100, 2), (40, 24, 3)]]
    total = sum(w.numel() for w in weights)
    for sparsity in (0.0, 0.25, 0.5, 0.9):
        masks = pruning.global_magnitude_masks(weights, sparsity)
        assert sum(int((~m).sum()) for m in masks) == round(sparsity * total)
        if sparsity > 0:
            pruned_max = max(w.abs()[~m].max() for w, m in zip(weights, masks, strict=True) if (~m).any())
            kept_min = min(w.abs()[m].min() for w, m in zip(weights, masks, strict=True))
            assert pruned_max <= kept_min
    # The budget is shared: a layer of large weights keeps far more than one of small weights.
    masks = pruning.global_magnitude_masks([random_weight(32, 32, 1) * 10, random_weight(32, 32, 2)], 0.5)
    assert (~masks[0]).sum() < 200 and (~masks[1]).sum() > 800  # about 13% and 87% of 1024


# --------------------------------------------------------------------------------------------- wanda
def test_wanda_scores_weight_times_input_norm():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norm = torch.tensor([10.0, 1.0, 1.0, 1.0])  # feature 0 is large: its small weight matters most
    # scores row 0: [10, 2, 3, 4]; row 1: [40, 3, 2, 1]. Magnitude prunes the two 1.0s.
    assert torch.equal(wanda_mask(w, norm, 0.25), torch.tensor([[True, False, True, True], [True, True, True, False]]))
    assert torch.equal(magnitude_mask(w, 0.25), torch.tensor([[False, True, True, True], [True, True, True, False]]))
    # 2:4: row 0 keeps the two highest scores (col 0: 10, col 3: 4), magnitude keeps cols 2 and 3
    assert torch.equal(wanda_mask(w, norm, None, "2:4")[0], torch.tensor([True, False, False, True]))
    assert torch.equal(magnitude_mask(w, None, "2:4")[0], torch.tensor([False, False, True, True]))


# ----------------------------------------------------------------------------------------- sparsegpt
def output_error(x: torch.Tensor, w: torch.Tensor, w_new: torch.Tensor) -> float:
    return float((x @ w.T - x @ w_new.T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_magnitude_and_wanda_on_layer_output(pattern):
    w, x, sparsity = layer_case(96, 128, pattern)
    mag = w * magnitude_mask(w, sparsity, pattern)
    wan = w * wanda_mask(w, x.norm(dim=0), sparsity, pattern)
    sgpt, mask, codes = sparsegpt_prune(w, 2 * x.T @ x, sparsity, pattern, block_size=32)
    assert codes is None
    assert bool((sgpt[~mask] == 0).all())
    assert (~mask).sum() == (mag == 0).sum()  # the same budget
    e_mag, e_wan, e_sgpt = (output_error(x, w, v) for v in (mag, wan, sgpt))
    assert e_sgpt < 0.7 * e_wan and e_wan < e_mag, (e_mag, e_wan, e_sgpt)


def test_sparsegpt_dead_inputs_are_zeroed_not_nan():
    n, k = 16, 32
    w = random_weight(n, k)
    x = correlated_inputs(256, k)
    x[:, [3, 17]] = 0  # features that never fire
    new, mask, _ = sparsegpt_prune(w, x.T @ x, 0.25)
    assert bool(torch.isfinite(new).all())
    assert bool((new[:, [3, 17]] == 0).all())
    assert not bool(mask[:, [3, 17]].any())  # zero-score weights go first
    assert (~mask).sum() == round(0.25 * n * k)


def test_sparsegpt_hessian_scale_does_not_matter():
    w = random_weight(16, 48)
    x = correlated_inputs(200, 48)
    a = sparsegpt_prune(w, x.T @ x, 0.5)
    b = sparsegpt_prune(w, 2 * x.T @ x / 200, 0.5)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- int8
@pytest.mark.parametrize("pruning_method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_codes_zero_where_pruned_and_scales_shape(pruning_method, group_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(80, 48), nn.ReLU(), nn.Linear(48, 24)).eval()
    original = copy.deepcopy(model)
    layers = {"0": model[0], "2": model[2]}
    calibration = [torch.randn(4, 80) for _ in range(3)]
    result = prune(model, layers, pruning=pruning_method, calibration=calibration, int8=True, group_size=group_size)
    for name, layer in layers.items():
        r = result[name]
        n, k = layer.weight.shape
        assert r.qweight.dtype == torch.int8 and r.qweight.shape == (n, k)
        assert r.scales.dtype == torch.float32
        assert r.scales.shape == ((n,) if group_size is None else (n, -(-k // group_size)))
        assert bool((r.qweight[~r.mask] == 0).all())
        assert (~r.mask).sum() == round(0.5 * n * k) or pruning_method == "wanda"
        assert int(r.qweight.abs().max()) <= 127
        gs = -1 if group_size is None else group_size
        # the layer's float weight is what the int8 layer computes
        torch.testing.assert_close(layer.weight.data, reference.int8_dequantize(r.qweight, r.scales, gs))
        if pruning_method != "sparsegpt":
            # the grid is the int8 path's grid for the pruned weight (SparseGPT's comes from its refitted weight)
            pruned = original.get_submodule(name).weight.detach() * r.mask
            torch.testing.assert_close(r.scales, reference.int8_quantize(pruned, gs)[1])


def test_sparsegpt_int8_compensates_rounding():
    n, k = 64, 128
    w = random_weight(n, k)
    x = correlated_inputs(1024, k)
    q, scales = reference.int8_quantize(w)
    # coarse scales make rounding error comparable to pruning error
    scales = scales * 8
    joint, mask, codes = sparsegpt_prune(w, x.T @ x, 0.5, scales=scales)
    torch.testing.assert_close(joint, codes.float() * scales[:, None])
    plain, mask2, _ = sparsegpt_prune(w, x.T @ x, 0.5)
    rounded = torch.round(plain / scales[:, None]).clamp(-127, 127) * scales[:, None]
    assert output_error(x, w, joint) < output_error(x, w, rounded)


def test_sparsegpt_int8_refit_beats_no_refit(monkeypatch):
    torch.manual_seed(0)
    x = correlated_inputs(512, 96)
    errors = {}
    for iterations in (0, pruning.REFIT_ITERATIONS):
        monkeypatch.setattr(pruning, "REFIT_ITERATIONS", iterations)
        layer = nn.Linear(96, 40, bias=False)
        layer.weight.data = random_weight(40, 96)
        dense = layer.weight.detach().clone()
        r = prune(layer, {"": layer}, pruning="sparsegpt", calibration=[x], int8=True)[""]
        assert (~r.mask).sum() == round(0.5 * 40 * 96) and bool((r.qweight[~r.mask] == 0).all())
        errors[iterations] = output_error(x, dense, reference.int8_dequantize(r.qweight, r.scales, -1))
        if iterations == 0:  # without the refit the grid is the int8 path's grid for SparseGPT's pruned weight
            pruned, mask, _ = sparsegpt_prune(dense, 2 * x.T @ x / x.shape[0], 0.5)
            assert torch.equal(mask, r.mask)
            torch.testing.assert_close(r.scales, reference.int8_quantize(pruned)[1])
    assert errors[pruning.REFIT_ITERATIONS] < 0.95 * errors[0], errors


# ---------------------------------------------------------------------------------------------- refit
def direct_refit(w: torch.Tensor, keep: torch.Tensor, h: torch.Tensor, damp: float) -> torch.Tensor:
    """Row by row in float64: the kept set's normal equations Hd_SS w_S = (Hd w)_S, Hd = H + damp * mean(diag H) I."""
    h = h.double()
    hd = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    target = w.double() @ hd
    out = torch.zeros_like(w, dtype=torch.float64)
    for i in range(w.shape[0]):
        s = keep[i]
        if s.any():
            out[i, s] = torch.linalg.solve(hd[s][:, s], target[i, s])
    return out.float()


@pytest.mark.parametrize("shape", [(1, 16), (5, 23), (17, 64)])
def test_refit_matches_direct_solve(shape):
    n, k = shape
    w = random_weight(n, k)
    x = correlated_inputs(300, k)
    h = x.T @ x
    keep = torch.rand(n, k, generator=torch.Generator().manual_seed(3)) < torch.linspace(0.2, 0.8, n)[:, None]
    keep[0] = False  # a row that keeps nothing stays zero
    start = w * keep
    got = refit_kept_weights(w, start, keep, h, damp=0.01, iterations=3 * k)
    # fp32 CG vs a float64 direct solve: agreement to 1e-3 of the row's scale (the system is well conditioned
    # after dampening; CG in exact arithmetic ends in at most K steps, 3K absorbs fp32 round-off)
    want = direct_refit(w, keep, h, 0.01)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    assert bool((got[~keep] == 0).all())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_refit_lowers_sparsegpt_layer_error(pattern):
    w, x, sparsity = layer_case(48, 128, pattern)
    sgpt, keep, _ = sparsegpt_prune(w, x.T @ x, sparsity, pattern, block_size=32)
    refit = refit_kept_weights(w, sgpt, keep, x.T @ x)
    assert bool((refit[~keep] == 0).all())
    assert output_error(x, w, refit) < 0.98 * output_error(x, w, sgpt)
    # SparseGPT with the mask given uses that mask
    again, keep_again, _ = sparsegpt_prune(refit, x.T @ x, sparsity, pattern, keep=keep)
    assert torch.equal(keep_again, keep) and bool((again[~keep] == 0).all())


def test_refit_without_iterations_or_signal_returns_masked_start():
    w = random_weight(6, 20)
    keep = torch.rand(6, 20, generator=torch.Generator().manual_seed(0)) < 0.5
    start = w * 1.5
    torch.testing.assert_close(refit_kept_weights(w, start, keep, torch.eye(20), iterations=0), start * keep)
    torch.testing.assert_close(refit_kept_weights(w, start, keep, torch.zeros(20, 20)), start * keep)
    everything = torch.ones_like(keep)
    torch.testing.assert_close(refit_kept_weights(w, start, everything, torch.eye(20)), w)  # the dense optimum


def test_refit_and_keep_shape_errors():
    w = random_weight(6, 20)
    keep = torch.ones(6, 20, dtype=torch.bool)
    with pytest.raises(ValueError, match="one shape"):
        refit_kept_weights(w, w, keep[:, :10], torch.eye(20))
    with pytest.raises(ValueError, match="hessian must have shape"):
        refit_kept_weights(w, w, keep, torch.eye(19))
    with pytest.raises(ValueError, match="keep must have the weight's shape"):
        sparsegpt_prune(w, torch.eye(20), 0.5, keep=keep[:3])


# ---------------------------------------------------------------------------------------- dense target
def test_dense_target_weight_is_the_weight_when_inputs_agree():
    w = random_weight(12, 40)
    x = correlated_inputs(400, 40)
    torch.testing.assert_close(dense_target_weight(w, x.T @ x, x.T @ x), w, rtol=1e-4, atol=1e-4)


def test_dense_target_objective_differs_by_a_constant():
    """For any W', ||W' Xp^T - W Xd^T||^2 + d ||W' - W||^2 - (W' - W_t)(H + dI)(W' - W_t)^T is one constant."""
    n, k, damp = 8, 24, 0.01
    w = random_weight(n, k).double()
    xp = correlated_inputs(300, k, seed=1).double()
    xd = xp + 0.3 * correlated_inputs(300, k, seed=2).double()  # the dense model's inputs: close, not equal
    h, cross = xp.T @ xp, xd.T @ xp
    d = damp * float(h.diagonal().mean())
    target = dense_target_weight(w.float(), h.float(), cross.float(), damp).double()

    def gap(candidate):
        direct = ((candidate @ xp.T - w @ xd.T) ** 2).sum() + d * ((candidate - w) ** 2).sum()
        delta = candidate - target
        return float(direct - (delta @ (h + d * torch.eye(k, dtype=h.dtype)) * delta).sum())

    g = torch.Generator().manual_seed(4)
    gaps = [gap(torch.randn(n, k, generator=g, dtype=torch.float64)) for _ in range(3)]
    scale = float(((w @ xd.T) ** 2).sum())
    assert max(gaps) - min(gaps) < 1e-3 * scale, gaps


def test_dense_target_lowers_model_output_error(monkeypatch):
    calibration = token_batches(n=4, batch=2, seq=16)
    dense = tiny_llama(layers=3)
    with torch.no_grad():
        want = torch.cat([dense(ids).logits for ids in calibration])
    errors = {}
    for dense_target in (False, True):
        monkeypatch.setattr(pruning, "DENSE_TARGET", dense_target)
        model = copy.deepcopy(dense)
        prune(model, pruning.prunable_layers(model), sparsity=0.6, pruning="sparsegpt", calibration=calibration)
        with torch.no_grad():
            errors[dense_target] = float((torch.cat([model(ids).logits for ids in calibration]) - want).norm())
    assert errors[True] < errors[False], errors


# ---------------------------------------------------------------------------------- sequential / models
@pytest.mark.parametrize("pruning_method", ["magnitude", "global-magnitude", "wanda", "sparsegpt"])
def test_tiny_llama_every_layer_pruned_and_model_runs(pruning_method):
    model = tiny_llama()
    layers = pruning.prunable_layers(model)
    assert len(layers) == 2 * 7 and "lm_head" not in layers
    pattern, sparsity = ("2:4", None) if pruning_method in ("wanda", "sparsegpt") else ("unstructured", 0.5)
    result = prune(
        model, layers, sparsity=sparsity, pattern=pattern, pruning=pruning_method, calibration=token_batches()
    )
    assert set(result) == set(layers)
    for name, layer in layers.items():
        mask = result[name].mask
        assert mask.shape == layer.weight.shape and mask.dtype == torch.bool
        assert bool((layer.weight[~mask] == 0).all()), name
        assert result[name].qweight is None and result[name].scales is None
        if pattern == "2:4":
            assert bool((pruned_per_group(mask, 4) == 2).all())
    total = sum(m.mask.numel() for m in result.values())
    assert sum(int((~m.mask).sum()) for m in result.values()) == total // 2
    with torch.no_grad():
        logits = model(token_batches(1)[0]).logits
    assert bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("pruning_method", ["wanda", "sparsegpt"])
def test_decoder_fast_path_matches_generic_path(pruning_method, monkeypatch):
    # The dense target needs the block path's second stream; without it the two paths compute the same thing.
    monkeypatch.setattr(pruning, "DENSE_TARGET", False)
    base = tiny_llama(seed=3)
    calibration = token_batches()
    outcomes = []
    for fast_path in (True, False):
        monkeypatch.setattr(pruning, "DECODER_FAST_PATH", fast_path)
        model = copy.deepcopy(base)
        layers = pruning.prunable_layers(model)
        assert pruning._decoder_blocks(model, layers) is not None
        result = prune(model, layers, pruning=pruning_method, calibration=calibration, int8=True, group_size=None)
        outcomes.append((result, {n: layer.weight.detach().clone() for n, layer in layers.items()}))
    (fast, fast_w), (generic, generic_w) = outcomes
    for name in fast:
        assert torch.equal(fast[name].mask, generic[name].mask), name
        assert torch.equal(fast[name].qweight, generic[name].qweight), name
        torch.testing.assert_close(fast_w[name], generic_w[name], rtol=1e-5, atol=1e-6)


def test_calibration_is_sequential():
    """The last layer's statistics come from the model whose earlier layers are already pruned."""
    model = tiny_llama(layers=1)
    original_down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    calibration = token_batches()
    layers = pruning.prunable_layers(model)
    result = prune(model, layers, pruning="wanda", calibration=calibration)
    sumsq = torch.zeros(128)

    def hook(module, args):
        sumsq.add_(args[0].reshape(-1, 128).pow(2).sum(0))

    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(hook)
    with torch.no_grad():
        for ids in calibration:
            model(ids)
    handle.remove()
    expected = wanda_mask(original_down, sumsq.sqrt(), 0.5)
    assert torch.equal(result["model.layers.0.mlp.down_proj"].mask, expected)


def test_dict_calibration_ignores_padding_and_conv1d_is_transposed():
    import transformers

    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=64)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).eval()
    ids = token_batches(2)
    attention = [torch.ones_like(t) for t in ids]
    attention[1][1, 10:] = 0  # right padding
    repadded = [t.clone() for t in ids]
    repadded[1][1, 10:] = (repadded[1][1, 10:] + 7) % 96

    def run(token_ids, with_mask: bool, method: str = "wanda"):
        model = copy.deepcopy(base)
        layers = pruning.prunable_layers(model)
        assert pruning._decoder_blocks(model, layers) is None  # GPT-2 takes the generic path
        calibration = [
            {"input_ids": t, "attention_mask": a} if with_mask else t for t, a in zip(token_ids, attention, strict=True)
        ]
        result = prune(model, layers, pruning=method, calibration=calibration)
        return model, result

    model, result = run(ids, True, "sparsegpt")
    c_attn = model.transformer.h[0].attn.c_attn
    mask = result["transformer.h.0.attn.c_attn"].mask
    assert mask.shape == (192, 64)  # (out, in), although Conv1D stores the weight as (in, out)
    assert bool((c_attn.weight.t()[~mask] == 0).all())
    assert (~mask).sum() == 192 * 32
    with torch.no_grad():
        assert bool(torch.isfinite(model(ids[0]).logits).all())

    # Padding is excluded from the statistics: other padding tokens give the same masks ...
    a, b = run(ids, True)[1], run(repadded, True)[1]
    assert all(torch.equal(a[name].mask, b[name].mask) for name in a)
    # ... while counting the padded positions as tokens would change them.
    a, b = run(ids, False)[1], run(repadded, False)[1]
    assert not all(torch.equal(a[name].mask, b[name].mask) for name in a)


def test_bf16_weights_and_float_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16)).to(torch.bfloat16).eval()
    layers = {"0": model[0], "2": model[2]}
    calibration = [torch.randn(8, 64, dtype=torch.bfloat16) for _ in range(2)]
    result = prune(model, layers, sparsity=None, pattern="4:8", pruning="sparsegpt", calibration=calibration)
    for name, layer in layers.items():
        assert layer.weight.dtype == torch.bfloat16
        assert bool((pruned_per_group(result[name].mask, 8) == 4).all())
        assert bool((layer.weight[~result[name].mask] == 0).all())


def test_shared_layer_listed_twice_is_pruned_once():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    result = prune(model, {"0": model[0], "2": model[2]})
    assert result["0"] is result["2"]
    assert int((shared.weight == 0).sum()) == 512


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("sparsity", [float("nan"), -0.1, 1.0, 1.5, None, True, "0.5"])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        prune(sparsity=sparsity)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"'2:4' implies sparsity 0.5.*sparsity=0.6"):
        prune(pattern="2:4", sparsity=0.6)
    with pytest.raises(ValueError, match=r"layer '0'.*K=30.*M=4"):
        prune(pattern="2:4", sparsity=None)
    with pytest.raises(ValueError, match=r"layer '0'.*K=30.*M=8"):
        prune(pattern="4:8", sparsity=0.5)
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(ValueError, match=r"calibration data is required.*token ids.*dicts of keyword"):
            prune(pruning=method)
        with pytest.raises(ValueError, match="empty"):
            prune(pruning=method, calibration=[])
        with pytest.raises(ValueError, match=r"calibration item 0 is a list"):
            prune(pruning=method, calibration=[[1, 2, 3]])
    with pytest.raises(ValueError, match=r"unknown pruning 'obs'.*magnitude.*global-magnitude.*wanda.*sparsegpt"):
        prune(pruning="obs")
    with pytest.raises(ValueError, match=r"unknown pattern '2-4'.*unstructured.*N:M"):
        prune(pattern="2-4")
    with pytest.raises(ValueError, match=r"0 < N < M"):
        prune(pattern="4:4", sparsity=None)
    with pytest.raises(ValueError, match=r"global-magnitude.*unstructured"):
        prune(pruning="global-magnitude", pattern="2:4", sparsity=None, layers={})
    with pytest.raises(ValueError, match="group_size"):
        prune(int8=True, group_size=48)
    with pytest.raises(ValueError, match=r"layer 'act'.*ReLU"):
        prune(layers={"act": nn.ReLU()})
    model = nn.Sequential(nn.Linear(32, 8))
    with torch.no_grad():
        model[0].weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"layer '0'.*1 NaN/inf"):
        prune(model=model)

    # a layer that never runs on the calibration inputs cannot be calibrated
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(32, 8)
            self.spare = nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = WithSpare()
    with pytest.raises(ValueError, match=r"never ran.*spare"):
        prune(
            model=model,
            layers={"used": model.used, "spare": model.spare},
            pruning="wanda",
            calibration=[torch.randn(2, 32)],
        )


def test_calibration_from_text():
    class CharTokenizer:
        def __call__(self, text, return_tensors=None):
            class Out:
                input_ids = torch.tensor([[ord(c) % 96 for c in text]])

            return Out()

    batches = pruning.calibration_from_text(CharTokenizer(), n_sequences=5, seq_len=64, batch_size=2)
    assert [tuple(b.shape) for b in batches] == [(2, 64), (2, 64), (1, 64)]
    assert len(pruning.calibration_text()) > 50_000
    with pytest.raises(ValueError, match="fewer than seq_len"):
        pruning.calibration_from_text(CharTokenizer(), text="short", seq_len=64)
