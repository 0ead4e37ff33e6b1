"""fastquant.compile_for_decode: a compiled decode step (fullgraph) with a static cache inside model.generate."""

from __future__ import annotations

import pytest
import torch

import fastquant
from helpers import tiny_llama_config

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama with int8+50% sparse MLPs and int8 attention projections: both fastquant ops in the graph."""
    config = tiny_llama_config(vocab_size=300, intermediate_size=160, max_position_embeddings=128)
    torch.manual_seed(seed)
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
    assert fastquant.compile_for_decode(model, max_cache_len=48, backend="inductor") is model
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
    with pytest.raises(ValueError, match="backend"):
        fastquant.compile_for_decode(tiny_llama(), backend="tensorrt")


def _greedy(model, prompt, mask=None, **kwargs):
    mask = torch.ones_like(prompt) if mask is None else mask
    with torch.no_grad():
        return model.generate(
            prompt, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0, **kwargs
        )


def test_aoti_decode_matches_eager_and_reuses_its_library_for_other_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    libraries = tmp_path / "fastquant-decode"
    a, b = tiny_llama(0), tiny_llama(1)
    prompt = torch.randint(1, 300, (1, 7), generator=torch.Generator().manual_seed(1))
    eager_a, eager_b = _greedy(a, prompt), _greedy(b, prompt)
    assert not torch.equal(eager_a, eager_b)

    assert fastquant.compile_for_decode(a, max_cache_len=48) is a  # aoti: the CPU default
    assert a._fastquant_decode.backend == "aoti" and a._fastquant_decode.warmup_seconds > 0
    torch.testing.assert_close(_greedy(a, prompt), eager_a, rtol=0, atol=0)
    assert len(list(libraries.glob("*/*.pt2"))) == 1

    # Another model with other weights but the same shapes loads the same library, which reads b's weights.
    fastquant.compile_for_decode(b, max_cache_len=48, backend="aoti")
    torch.testing.assert_close(_greedy(b, prompt), eager_b, rtol=0, atol=0)
    assert len(list(libraries.glob("*/*.pt2"))) == 1

    # Another cache length: the graph's code may not name it, but the library is built for it (a library of
    # the 48-slot cache would read and write past a shorter one's tensors).
    short = tiny_llama(1)
    fastquant.compile_for_decode(short, max_cache_len=20, backend="aoti")
    assert len(list(libraries.glob("*/*.pt2"))) == 2
    torch.testing.assert_close(_greedy(short, prompt), eager_b, rtol=0, atol=0)

    # A weight replaced after compiling: the next generate rebuilds the step against the new tensor.
    b.model.norm.weight = torch.nn.Parameter(b.model.norm.weight.detach() * 1.5, requires_grad=False)
    eager_b2 = _greedy(_eager_twin(b), prompt)
    torch.testing.assert_close(_greedy(b, prompt), eager_b2, rtol=0, atol=0)

    # Batch 2 with left padding: the 4-D mask is an input of the step (a new library for the new shapes).
    batch = torch.randint(1, 300, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    torch.testing.assert_close(_greedy(a, batch, mask), _greedy(_eager_twin(a), batch, mask), rtol=0, atol=0)
    # Sampling runs the same step (the library of that batch shape): tokens in range, prompt kept.
    torch.manual_seed(3)
    with torch.no_grad():
        sampled = a.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=True, top_p=0.9, pad_token_id=0)
    assert sampled.shape == (2, 12) and torch.equal(sampled[:, :6], batch)
    assert int(sampled.min()) >= 0 and int(sampled.max()) < 300

    # A deep copy gets its own libraries (loaded from the cache against its own tensors), not the original's.
    import copy
    import gc

    twin = copy.deepcopy(b)
    del b
    gc.collect()
    assert not twin.get_compiled_call.step.libraries
    torch.testing.assert_close(_greedy(twin, prompt), eager_b2, rtol=0, atol=0)

    # A call the libraries were not built for (here a dynamic cache) runs torch.compile's step, with a warning.
    step = a.get_compiled_call(None)
    ids = prompt[:, :3]
    with torch.no_grad():
        expected = _eager_twin(a)(input_ids=ids, cache=transformers.DynamicCache(config=a.config)).logits
        with pytest.warns(UserWarning, match="not an initialized static cache"):
            got = step(input_ids=ids, cache=transformers.DynamicCache(config=a.config)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _eager_twin(model):
    """The same model without the compiled decode step (shares its weights)."""
    import copy

    twin = copy.copy(model)
    twin.__dict__ = dict(model.__dict__)
    twin.__dict__.pop("get_compiled_call", None)
    twin.generation_config = copy.deepcopy(model.generation_config)
    twin.generation_config.cache_implementation = None
    twin.generation_config.compile_config = None
    return twin


@pytest.mark.parametrize("batch,heads,kv_heads,cache_len", [(1, 9, 3, 17), (2, 4, 2, 1025), (3, 6, 1, 3)])
def test_packed_sdpa_attention_matches_transformers_and_reads_the_cache_in_place(batch, heads, kv_heads, cache_len):
    from transformers.integrations.sdpa_attention import repeat_kv

    from fastquant.decode import packed_sdpa_attention

    gen = torch.Generator().manual_seed(cache_len)
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    query = torch.randn(batch, heads, 1, 64, generator=gen)
    key, value = (torch.randn(batch, kv_heads, cache_len, 64, generator=gen) for _ in range(2))
    # A static cache's boolean mask: the first tokens of each row are filled, the rest is not attended to.
    mask = torch.arange(cache_len) < torch.randint(1, cache_len + 1, (batch, 1, 1, 1), generator=gen)
    # What transformers computes when traced: keys and values expanded to every query head.
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, heads // kv_heads), repeat_kv(value, heads // kv_heads), attn_mask=mask, scale=0.125
    ).transpose(1, 2)
    got, weights = packed_sdpa_attention(module, query, key, value, mask, scaling=0.125)
    assert weights is None and got.shape == (batch, 1, heads, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    class Step(torch.nn.Module):
        def forward(self, q, k, v, m):
            return packed_sdpa_attention(module, q, k, v, m, scaling=0.125)[0]

    graph = torch.export.export(Step(), (query, key, value, mask), strict=False).graph
    targets = {str(node.target) for node in graph.nodes if node.op == "call_function"}
    assert not any("expand" in t or "repeat" in t or "clone" in t for t in targets), targets


def test_compile_for_decode_switches_sdpa_attention_only():
    from fastquant.decode import PACKED_SDPA

    model = tiny_llama()
    assert model.config._attn_implementation == "sdpa"
    fastquant.compile_for_decode(model, backend="inductor")
    assert model.config._attn_implementation == PACKED_SDPA
    assert "fastquant" not in model.config.to_json_string()  # not saved with the model's config
    eager = tiny_llama()
    eager.set_attn_implementation("eager")
    fastquant.compile_for_decode(eager, backend="inductor")
    assert eager.config._attn_implementation == "eager"


def test_the_kept_step_signature_holds_only_while_the_cache_keeps_the_same_tensors_and_shapes():
    from types import SimpleNamespace

    from fastquant.decode import _LastStep, _layouts

    layers = [
        SimpleNamespace(keys=torch.randn(1, 2, 8, 4), values=torch.randn(1, 2, 8, 4), cumulative_length=torch.ones(1))
        for _ in range(3)
    ]
    cache = SimpleNamespace(layers=layers)
    tensors = [x.keys for x in layers] + [x.values for x in layers] + [x.cumulative_length for x in layers]
    last = _LastStep(cache, (), tensors, _layouts(tensors), library=None)
    assert last.holds(cache)
    layers[0].keys.zero_()  # written in place, as every decode step does: still the same step
    assert last.holds(cache)
    layers[1].values = layers[1].values.clone()  # another tensor of the same shape: the library must be looked up
    assert not last.holds(cache)
    layers[1].values = tensors[4]
    assert last.holds(cache)
    layers[2].keys.resize_(1, 2, 4, 4)  # resized in place: the library built for 8 slots must not read it
    assert not last.holds(cache)
    layers[2].keys.resize_(1, 2, 8, 4)
    layers[2].keys.data = layers[2].keys.data.double()  # new data of another dtype under the same object
    assert not last.holds(cache)
    assert not last.holds(SimpleNamespace(layers=layers[:2]))
