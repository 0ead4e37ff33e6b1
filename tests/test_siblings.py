"""fastquant.siblings: layers that read the same input computed as one merged layer in the compiled decode step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastquant
from fastquant import siblings
from fastquant.kernels import ops
from fastquant.modules import Int4Linear, Int8Linear
from helpers import tiny_llama_config

FORMATS = {
    "int8 per-channel": lambda linear: Int8Linear.from_linear(linear),
    "int8 group 32 x=int8": lambda linear: Int8Linear.from_linear(linear, 32, int8_activations=True),
    "int4 sym g32": lambda linear: Int4Linear.from_linear(linear, group_size=32),
    "int4 asym g64 x=int8": lambda linear: Int4Linear.from_linear(
        linear, group_size=64, symmetric=False, int8_activations=True
    ),
}


def _members(fmt: str, in_features: int = 100, outs: tuple[int, ...] = (17, 1, 33), bias: bool = True) -> list:
    torch.manual_seed(0)
    return [FORMATS[fmt](nn.Linear(in_features, n, bias=bias)) for n in outs]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_merged_layer_computes_every_members_output_bit_for_bit_without_a_copy_of_their_weights(fmt, bias):
    members = _members(fmt, bias=bias)
    x = torch.randn(3, 100)
    alone = [m(x) for m in members]
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]

    merged = siblings.merge_rows(members)
    assert type(merged) is type(members[0]) and merged.out_features == 51
    # Bit for bit: each output column is the same dot product, and x is rounded per row either way.
    assert torch.equal(merged(x), torch.cat(alone, dim=-1))
    for m, before, state in zip(members, alone, states, strict=True):
        assert torch.equal(m(x), before)
        for name, t in m.state_dict().items():
            assert torch.equal(t, state[name])
            # The member's tensors are views of the merged layer's rows: no extra memory.
            source = merged.bias if name == "bias" else merged._buffers[name]
            assert t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()

    # Merging again copies nothing and leaves the members' tensor objects as they are (a compiled step holds them).
    tensors = [dict(m.named_buffers()) | dict(m.named_parameters()) for m in members]
    again = siblings.merge_rows(members)
    assert again.qweight.data_ptr() == merged.qweight.data_ptr()
    for m, before in zip(members, tensors, strict=True):
        now = dict(m.named_buffers()) | dict(m.named_parameters())
        assert all(now[name] is t for name, t in before.items())
    assert torch.equal(again(x), torch.cat(alone, dim=-1))


def test_inside_merged_the_group_makes_one_call_per_input_and_outside_every_layer_computes_alone(monkeypatch):
    members = _members("int8 per-channel", in_features=40, outs=(8, 3, 5))
    holder = nn.ModuleList(members)
    calls = []
    real = ops.int8_linear

    def counted(x, *args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(ops, "int8_linear", counted)
    x, other = torch.randn(2, 40), torch.randn(2, 40)
    alone = [m(x) for m in members]
    alone_other = [m(other) for m in members]
    calls.clear()

    with siblings.merged(holder, [members]):
        assert isinstance(getattr(holder, siblings._HOLDER), nn.ModuleList)
        assert all(torch.equal(m(x), a) for m, a in zip(members, alone, strict=True))
        assert calls == [(16, 40)]  # one call of the merged 16 rows
        # Another input: computed afresh; a member asked twice for the same input recomputes (its slice is gone).
        assert torch.equal(members[1](other), alone_other[1])
        assert torch.equal(members[1](other), alone_other[1])
        assert len(calls) == 3
        # An input changed in place since the first member's call is not served from the kept slices.
        y = x.clone()
        members[0](y)
        y.mul_(2)
        assert torch.equal(members[2](y), real(y, members[2].qweight, members[2].scales, members[2].bias, -1))
        assert len(calls) == 5

    calls.clear()
    assert not hasattr(holder, siblings._HOLDER) and all("forward" not in vars(m) for m in members)
    assert all(torch.equal(m(x), a) for m, a in zip(members, alone, strict=True))
    assert calls == [(8, 40), (3, 40), (5, 40)]


class _Net(nn.Module):
    """a and b read x (a group); c reads x too but in another format; d reads x twice; e reads another tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.d, self.e = (Int8Linear.from_linear(nn.Linear(64, n)) for n in (4, 6, 5, 7))
        self.c = Int4Linear.from_linear(nn.Linear(64, 3), group_size=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = (self.a(x), self.b(x), self.c(x), self.d(x), self.d(x), self.e(x + 1))
        return torch.cat([o.sum(-1, keepdim=True) for o in outs], dim=-1)


def test_find_groups_layers_of_one_format_that_read_the_very_same_tensor_once():
    net = _Net()
    groups = siblings.find(net, {"x": torch.randn(2, 64)})
    assert groups == [[net.a, net.b]]


def test_find_on_a_llama_groups_q_k_v_and_gate_up_of_every_block():
    transformers = pytest.importorskip("transformers")
    # Four key/value heads: k and v of 64 outputs (patch leaves 32-output int8 layers float).
    model = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=300, num_key_value_heads=4)).eval()
    fastquant.patch(model, "int8", progress=False)
    names = {m: n for n, m in model.named_modules()}
    groups = siblings.find(model, {"input_ids": torch.zeros((1, 1), dtype=torch.long), "use_cache": False})
    got = sorted(tuple(names[m] for m in g) for g in groups)
    want = sorted(
        g
        for i in range(model.config.num_hidden_layers)
        for g in (
            tuple(f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"),
            (f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"),
        )
    )
    assert got == want


def test_compiled_decode_with_merged_int4_projections_matches_eager_and_saves_and_loads(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    config = tiny_llama_config(vocab_size=300, max_position_embeddings=128, attention_bias=True, num_key_value_heads=4)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    fastquant.patch(model, fastquant.Int4(group_size=32, symmetric=False), progress=False)
    prompt = torch.randint(1, 300, (1, 7), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        logits = model(prompt).logits

    fastquant.compile_for_decode(model, max_cache_len=32, backend="aoti")
    attn = model.model.layers[0].self_attn
    # q, k, v (biases too) now lie back to back in one storage each; the model holds no extra layer.
    for name in ("qweight", "scales", "offsets", "bias"):
        ptrs = {getattr(getattr(attn, p), name).untyped_storage().data_ptr() for p in ("q_proj", "k_proj", "v_proj")}
        assert len(ptrs) == 1, name
    assert not hasattr(model, siblings._HOLDER)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.testing.assert_close(
            model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs), eager, rtol=0, atol=0
        )
    # The eager prefill calls all 7 layers of each of the 2 blocks; each of the 9 compiled decode steps calls 4 per
    # block (q/k/v merged, o, gate/up merged, down).
    calls = sum(e.count for e in prof.key_averages() if e.key == "fastquant::int4_linear")
    assert calls == 2 * 7 + 9 * 2 * 4
    with torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, logits, rtol=0, atol=0)

    path = tmp_path / "merged.safetensors"
    fastquant.save(model, path)
    fresh = transformers.LlamaForCausalLM(config).eval()
    fastquant.load(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(prompt).logits, logits, rtol=0, atol=0)


def test_merge_projections_must_be_a_bool():
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=300)).eval()
    with pytest.raises(ValueError, match="merge_projections"):
        fastquant.compile_for_decode(model, merge_projections="yes")


def test_a_model_the_probe_cannot_run_compiles_unmerged_with_a_warning(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=300, num_key_value_heads=4)).eval()
    fastquant.patch(model, "int8", progress=False)
    prompt = torch.randint(1, 300, (1, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)

    def probe_fails(model, probe):
        raise TypeError("forward() missing 1 required positional argument: 'pixel_values'")

    monkeypatch.setattr(siblings, "find", probe_fails)
    attn = model.model.layers[0].self_attn

    def storages() -> list[int]:
        return [getattr(attn, f"{p}_proj").qweight.untyped_storage().data_ptr() for p in "qk"]

    before = storages()
    with pytest.warns(UserWarning, match="pixel_values.*every layer runs alone"):
        fastquant.compile_for_decode(model, max_cache_len=24, backend="aoti")
    assert storages() == before  # not laid out again: nothing was merged
    with torch.no_grad():
        torch.testing.assert_close(
            model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs), eager, rtol=0, atol=0
        )
