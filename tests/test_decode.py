"""fastquant.compile_for_decode: a compiled decode step (fullgraph) with a static cache inside model.generate."""

from __future__ import annotations

import pytest
import torch

import fastquant
from helpers import tiny_llama_config

transformers = pytest.importorskip("transformers")


def tiny_llama() -> torch.nn.Module:
    """A 2-layer Llama with int8+50% sparse MLPs and int8 attention projections: both fastquant ops in the graph."""
    config = tiny_llama_config(vocab_size=300, intermediate_size=160, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    fastquant.patch(
        model, "int8+sparse", sparsity=0.5, pruning="magnitude", filter_fn=lambda module, name: "mlp" in name
    )
    fastquant.patch(model, "int8", filter_fn=lambda module, name: "self_attn" in name)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"Int8Linear", "SparseLinear"} <= kinds
    return model


def test_compiled_decode_matches_eager_greedy_and_samples_in_batches():
    model = tiny_llama()
    prompt = torch.randint(1, 300, (1, 7), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        eager = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    # fullgraph=True: any graph break in the decode step (a fastquant op included) raises instead of passing.
    counters = torch._dynamo.utils.counters
    counters.clear()
    assert fastquant.compile_for_decode(model, max_cache_len=48) is model
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    info = model._fastquant_decode
    assert info.fullgraph and info.max_cache_len == 48 and info.warmup_seconds > 0
    assert model.generation_config.cache_implementation == "static"
    with torch.inference_mode():
        compiled = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
        batch = torch.randint(1, 300, (2, 5), generator=torch.Generator().manual_seed(2))
        torch.manual_seed(3)
        sampled = model.generate(
            batch, attention_mask=torch.ones_like(batch), max_new_tokens=6, do_sample=True, top_p=0.9, pad_token_id=0
        )
    assert sampled.shape == (2, 11) and torch.equal(sampled[:, :5], batch)
    assert int(sampled.min()) >= 0 and int(sampled.max()) < 300


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="generate"):
        fastquant.compile_for_decode(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="max_cache_len"):
        fastquant.compile_for_decode(tiny_llama(), max_cache_len=1)
