"""Typed method configs: validated when made, and the same result as the string shortcuts they stand for."""

from __future__ import annotations

import copy

import pytest
import torch
from test_patch import make_block

import fastquant
from fastquant import GPTQ, Int8, Magnitude, Sparse, SparseGPT, Wanda


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: Int8(group_size=48), ValueError, r"group_size must be None \(per-channel\) or one of"),
        (lambda: Int8(group_size=0), ValueError, "group_size must be None"),
        (lambda: Int8(rounding="gptq"), TypeError, "rounding must be fastquant.RTN"),
        (lambda: Sparse(1.5), ValueError, r"sparsity must be in \[0, 1\)"),
        (lambda: Sparse(None), ValueError, "sparsity is required"),
        (lambda: Sparse(0.3, pattern="2:4"), ValueError, "implies sparsity 0.5"),
        (lambda: Sparse(pattern="4:2"), ValueError, "need 0 < N < M"),
        (lambda: Sparse(pruning="wanda"), TypeError, "pruning must be fastquant.SparseGPT"),
        (lambda: Sparse(values=Int8(rounding=GPTQ())), ValueError, "rounding of sparse int8 values"),
        (lambda: Sparse(values=torch.int8), TypeError, "values must be None"),
        (lambda: Sparse(kernel="fast"), ValueError, "kernel must be one of"),
    ],
)
def test_a_bad_config_fails_where_it_is_made(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_an_n_m_pattern_implies_its_sparsity():
    assert Sparse(None, "2:4").pattern == "2:4"
    assert Sparse(0.5, "2:4").sparsity == 0.5


def _same_layers(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert fastquant.report(a).to_markdown() == fastquant.report(b).to_markdown()


def test_int8_config_is_the_int8_string():
    model = make_block()
    _same_layers(
        fastquant.patch(copy.deepcopy(model), Int8(group_size=64)),
        fastquant.patch(copy.deepcopy(model), "int8", group_size=64),
    )


def test_gptq_config_is_int8_with_calibration():
    model = make_block()
    batches = [torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    _same_layers(
        fastquant.patch(copy.deepcopy(model), Int8(rounding=GPTQ(batches)), progress=False),
        fastquant.patch(copy.deepcopy(model), "int8", calibration=batches, progress=False),
    )


@pytest.mark.parametrize(
    ("config", "method", "options"),
    [
        (Sparse(0.5, pruning=Magnitude(), kernel="sparse"), "sparse", {"pruning": "magnitude"}),
        (
            Sparse(None, "2:4", pruning=Magnitude(), values=Int8(32), kernel="csr16"),
            "int8+sparse",
            {"sparsity": None, "pattern": "2:4", "pruning": "magnitude", "group_size": 32, "sparse_kernel": "csr16"},
        ),
    ],
)
def test_sparse_config_is_the_sparse_string(config, method, options):
    model = make_block()
    options = {"sparsity": 0.5, "sparse_kernel": "sparse"} | options
    _same_layers(
        fastquant.patch(copy.deepcopy(model), config, progress=False),
        fastquant.patch(copy.deepcopy(model), method, progress=False, **options),
    )


def test_calibrated_pruning_configs_carry_their_data():
    model = make_block()
    batches = [torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for config_cls, name in ((SparseGPT, "sparsegpt"), (Wanda, "wanda")):
        _same_layers(
            fastquant.patch(copy.deepcopy(model), Sparse(0.5, pruning=config_cls(batches), kernel="dense")),
            fastquant.patch(
                copy.deepcopy(model), "sparse", pruning=name, calibration=batches, sparse_kernel="dense", progress=False
            ),
        )


def test_a_config_and_keyword_options_together_are_refused():
    with pytest.raises(TypeError, match="either a method config or keyword options.*group_size"):
        fastquant.patch(make_block(), Int8(), group_size=64)
    with pytest.raises(TypeError, match="sparsity"):
        fastquant.patch(make_block(), Sparse(0.5), sparsity=0.25)


def test_prune_takes_the_sparse_config():
    model = make_block()
    masks = fastquant.prune(copy.deepcopy(model), Sparse(0.25, pruning=Magnitude()), progress=False)
    expected = fastquant.prune(copy.deepcopy(model), pruning="magnitude", sparsity=0.25, progress=False)
    assert masks.keys() == expected.keys()
    for name in masks:
        assert torch.equal(masks[name], expected[name])
    with pytest.raises(TypeError, match="config must be a fastquant.Sparse"):
        fastquant.prune(model, Int8())
