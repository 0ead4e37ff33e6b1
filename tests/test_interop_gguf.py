"""GGUF in (fastquant.from_gguf) and out (fastquant export --format gguf) on tiny llama models made here.

Exactness rule: a layer loaded from a GGUF block type fastquant has (Q8_0, Q4_0, Q4_1) must de-quantize to exactly
gguf's own de-quantization of the tensor, rows in transformers' order (torch.equal, no tolerance). Logits of whole
models are compared with a tolerance: the kernels accumulate in another order than torch's matmul.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastquant
from fastquant import Int8Linear
from fastquant.app import cli
from fastquant.interop import InteropError
from fastquant.interop.gguf_in import GGUFFormatError
from fastquant.interop.gguf_out import export_gguf
from fastquant.kernels import reference
from fastquant.modules import Int4Linear

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from interop_helpers import byte_level_tokenizer, tiny_llama, write_llama_gguf  # noqa: E402


def _gguf_tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _transformers_model(path):
    """The reference: transformers' own GGUF loader, which de-quantizes everything to fp32."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def _linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def _assert_layers_bit_exact(ours, reference, names) -> None:
    for name in names:
        got = ours.get_submodule(name).dequantize()
        want = reference.get_submodule(name).weight
        assert torch.equal(got, want), f"{name}: max diff {(got - want).abs().max().item()}"


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _assert_logits_close(a: torch.Tensor, b: torch.Tensor) -> None:
    # Same weights, other summation order: differences of a few fp32 ulps of the largest partial sums.
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= 1e-4 * scale, (a - b).abs().max().item()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 320, (2, 23), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie", [True, False])
def test_q8_0_layers_are_int8_group32_bit_exact(tmp_path, ids, tie):
    model = tiny_llama(tie=tie)
    path = write_llama_gguf(model, tmp_path / "tiny.Q8_0.gguf", "Q8_0")
    ours = fastquant.from_gguf(path)
    ref = _transformers_model(path)
    names = _linear_names(ref)
    assert len(names) == 14
    for name in names:
        layer = ours.get_submodule(name)
        assert isinstance(layer, Int8Linear) and layer.group_size == 32 and layer.scales.dtype == torch.float32
    _assert_layers_bit_exact(ours, ref, names)
    # The head: tied -> a layer holding token_embd's codes; untied -> output.weight's.
    assert isinstance(ours.lm_head, Int8Linear)
    assert torch.equal(ours.lm_head.dequantize(), ref.lm_head.weight)
    assert torch.equal(ours.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    for name, p in ref.named_parameters():
        if p.dim() == 1:
            assert torch.equal(ours.get_parameter(name), p), name
    _assert_logits_close(_logits(ours, ids), _logits(ref, ids))
    assert "Q8_0" in fastquant.report(ours).layers[0].note


def test_q8_0_matches_gguf_dequantize_after_llama_cpp_permutation(tmp_path):
    """Independent of transformers: the Q rows come back to the model's order, and the values are gguf's."""
    model = tiny_llama()
    path = write_llama_gguf(model, tmp_path / "tiny.gguf", "Q8_0")
    ours = fastquant.from_gguf(path)
    tensors = _gguf_tensors(path)
    heads = model.config.num_attention_heads
    deq = gguf.quants.dequantize(tensors["blk.1.attn_q.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    # reverse of llama_cpp_permute: (heads, half, 2) -> (heads, 2, half)
    unpermuted = deq.reshape(heads, deq.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(deq.shape)
    assert torch.equal(ours.model.layers[1].self_attn.q_proj.dequantize(), torch.from_numpy(unpermuted))
    # and those are the original weights up to Q8_0's rounding (a wrong permutation would be far off)
    w = model.model.layers[1].self_attn.q_proj.weight
    err = (ours.model.layers[1].self_attn.q_proj.dequantize() - w).abs().max()
    assert err <= w.abs().max() / 127


def test_greedy_output_matches_the_dequantized_model(tmp_path):
    model = tiny_llama()
    path = write_llama_gguf(model, tmp_path / "tiny.gguf", "Q8_0")
    ours, ref = fastquant.from_gguf(path), _transformers_model(path)
    prompt = torch.tensor([[5, 17, 99, 3]])
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(prompt, **kwargs), ref.generate(prompt, **kwargs))


def test_other_types_are_dequantized_with_a_note(tmp_path, ids):
    model = tiny_llama()
    types = {"blk.0.attn_v.weight": "Q5_0", "blk.1.ffn_up.weight": "F16", "blk.0.ffn_down.weight": "F32"}
    path = write_llama_gguf(model, tmp_path / "mixed.gguf", "Q8_0", types=types, embed_type="F16")
    ours, ref = fastquant.from_gguf(path), _transformers_model(path)
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj", "model.layers.0.mlp.down_proj"):
        layer = ours.get_submodule(name)
        assert type(layer) is torch.nn.Linear
        assert torch.equal(layer.weight, ref.get_submodule(name).weight)
    notes = {r.name: r.note for r in fastquant.report(ours).layers}
    assert (
        "Q5_0" in notes["model.layers.0.self_attn.v_proj"]
        and "de-quantized" in notes["model.layers.0.self_attn.v_proj"]
    )
    assert "F16" in notes["model.layers.1.mlp.up_proj"]
    # F16 embedding: the tied head stays tied, in float
    assert type(ours.lm_head) is torch.nn.Linear and ours.lm_head.weight is ours.model.embed_tokens.weight
    _assert_logits_close(_logits(ours, ids), _logits(ref, ids))


def test_tied_head_can_stay_tied(tmp_path):
    path = write_llama_gguf(tiny_llama(), tmp_path / "tiny.gguf", "Q8_0")
    ours = fastquant.from_gguf(path, quantized_lm_head=False)
    assert type(ours.lm_head) is torch.nn.Linear and ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_layers_are_int4_group32_bit_exact(tmp_path, ids, qtype):
    model = tiny_llama(tie=False)
    path = write_llama_gguf(model, tmp_path / f"tiny.{qtype}.gguf", qtype, embed_type=qtype)
    ours, ref = fastquant.from_gguf(path), _transformers_model(path)
    names = _linear_names(ref) + ["lm_head"]
    for name in names:
        layer = ours.get_submodule(name)
        assert isinstance(layer, Int4Linear) and layer.group_size == 32
        assert (layer.offsets is None) == (qtype == "Q4_0")
    _assert_layers_bit_exact(ours, ref, names)
    _assert_logits_close(_logits(ours, ids), _logits(ref, ids))


# ------------------------------------------------------------------------------------------ bad files


def test_unknown_architecture_is_refused(tmp_path):
    path = write_llama_gguf(tiny_llama(), tmp_path / "x.gguf", arch="qwen2")
    with pytest.raises(InteropError, match="architecture 'qwen2' is not supported"):
        fastquant.from_gguf(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        fastquant.from_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_file_is_refused(tmp_path, keep):
    path = write_llama_gguf(tiny_llama(), tmp_path / "tiny.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFFormatError, match="truncated or corrupted"):
        fastquant.from_gguf(path)


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(GGUFFormatError, match="not a readable GGUF file"):
        fastquant.from_gguf(path)


def test_nan_block_scale_is_refused(tmp_path):
    path = write_llama_gguf(tiny_llama(), tmp_path / "tiny.gguf")
    tensor = _gguf_tensors(path)["blk.0.ffn_up.weight"]
    data = bytearray(path.read_bytes())
    data[tensor.data_offset : tensor.data_offset + 2] = np.array([np.nan], dtype=np.float16).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFFormatError, match="blk.0.ffn_up.weight: NaN/inf block scales"):
        fastquant.from_gguf(path)


def test_metadata_inconsistent_with_tensors_is_refused(tmp_path):
    path = write_llama_gguf(tiny_llama(), tmp_path / "tiny.gguf", embedding_length=160)
    with pytest.raises(GGUFFormatError, match="implies"):
        fastquant.from_gguf(path)


# ------------------------------------------------------------------------------------------ GGUF out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    byte_level_tokenizer(300).save_pretrained(folder)
    return folder


def test_export_int8_g32_as_q8_0_round_trips(tmp_path, tokenizer_dir, ids):
    model = tiny_llama(vocab_size=320)
    fastquant.patch(model, "int8", group_size=32)
    summary = export_gguf(model, tmp_path / "out.gguf", tokenizer_dir=tokenizer_dir)
    assert summary["tensor_types"]["Q8_0"] == 14 and summary["tied_lm_head"]
    assert summary["max_relative_scale_change"] <= 2**-11
    reader = gguf.GGUFReader(tmp_path / "out.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 320  # 300 tokens + padding up to the embedding's rows
    back = fastquant.from_gguf(tmp_path / "out.gguf", quantized_lm_head=False)
    for name in _linear_names(back):
        src, dst = model.get_submodule(name), back.get_submodule(name)
        assert torch.equal(dst.qweight, src.qweight), name  # codes as written, Q/K permutation undone
        assert torch.equal(dst.scales, src.scales.half().float()), name  # Q8_0 stores fp16 scales
    # With the scales rounded to fp16 as Q8_0 stores them, the original computes what the file does.
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.scales.copy_(module.scales.half().float())
    _assert_logits_close(_logits(back, ids), _logits(model, ids))


def test_export_with_int8_activations_writes_the_same_file(tmp_path, tokenizer_dir, recwarn):
    """llama.cpp rounds x to int8 per 32 columns itself (Q8_0 activations): int8_activations writes nothing else
    and says nothing."""
    plain = fastquant.patch(tiny_llama(vocab_size=320), "int8", group_size=32)
    rounded = fastquant.patch(tiny_llama(vocab_size=320), fastquant.Int8(group_size=32, int8_activations=True))
    export_gguf(plain, tmp_path / "plain.gguf", tokenizer_dir=tokenizer_dir)
    summary = export_gguf(rounded, tmp_path / "rounded.gguf", tokenizer_dir=tokenizer_dir)
    assert summary["tensor_types"]["Q8_0"] == 14
    assert (tmp_path / "rounded.gguf").read_bytes() == (tmp_path / "plain.gguf").read_bytes()
    assert not [w for w in recwarn if "int8_activations" in str(w.message)]


def test_export_int4_g32_symmetric_as_q4_0_is_bit_exact(tmp_path, tokenizer_dir, ids):
    model = tiny_llama(vocab_size=320, tie=False)
    fastquant.patch(model, "int4", group_size=32, symmetric=True, skip=())
    summary = export_gguf(model, tmp_path / "out.gguf", tokenizer_dir=tokenizer_dir)
    assert summary["tensor_types"] == {"Q4_0": 15, "F32": 6} and summary["max_relative_scale_change"] == 0
    assert summary["file_type"] == "MOSTLY_Q4_0"
    back = fastquant.from_gguf(tmp_path / "out.gguf")
    for name in [*_linear_names(back), "lm_head"]:
        src, dst = model.get_submodule(name), back.get_submodule(name)
        assert isinstance(dst, Int4Linear) and dst.offsets is None
        assert torch.equal(dst.qweight, src.qweight) and torch.equal(dst.scales, src.scales), name
    _assert_logits_close(_logits(back, ids), _logits(model, ids))


@pytest.mark.parametrize(("group_size", "symmetric"), [(32, False), (64, True)])
def test_export_refuses_int4_layouts_gguf_lacks(tmp_path, tokenizer_dir, group_size, symmetric):
    model = tiny_llama()
    fastquant.patch(model, "int4", group_size=group_size, symmetric=symmetric)
    with pytest.raises(InteropError, match="int4 group 32 symmetric .as Q4_0."):
        export_gguf(model, tmp_path / "x.gguf", tokenizer_dir=tokenizer_dir)


def test_export_copies_the_tokenizer_of_another_gguf(tmp_path, tokenizer_dir):
    model = tiny_llama(vocab_size=320)
    fastquant.patch(model, "int8", group_size=32)
    export_gguf(model, tmp_path / "a.gguf", tokenizer_dir=tokenizer_dir)
    export_gguf(model, tmp_path / "b.gguf", vocab_from=tmp_path / "a.gguf")
    a, b = gguf.GGUFReader(tmp_path / "a.gguf").fields, gguf.GGUFReader(tmp_path / "b.gguf").fields
    keys = [k for k in a if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.merges" in keys and keys == [k for k in b if k.startswith("tokenizer.")]
    for key in keys:
        assert a[key].contents() == b[key].contents(), key
    with pytest.raises(InteropError, match="no tokenizer"):
        export_gguf(model, tmp_path / "c.gguf", vocab_from=write_llama_gguf(tiny_llama(), tmp_path / "bare.gguf"))
    with pytest.raises(InteropError, match="needs a tokenizer"):
        export_gguf(model, tmp_path / "d.gguf")


def test_export_keeps_sparse_layers_dense(tmp_path, tokenizer_dir):
    model = tiny_llama(vocab_size=320)
    fastquant.patch(model, "int8+sparse", sparsity=0.5, pruning="magnitude", group_size=32)
    export_gguf(model, tmp_path / "sparse.gguf", tokenizer_dir=tokenizer_dir)
    back = fastquant.from_gguf(tmp_path / "sparse.gguf")
    src = model.model.layers[0].mlp.up_proj
    dst = back.model.layers[0].mlp.up_proj
    assert isinstance(src, fastquant.SparseLinear) and isinstance(dst, Int8Linear)
    codes = reference.sparse_unpack(src.values, src.masks, src.row_offsets, src.in_features)
    assert (codes == 0).float().mean() >= 0.5  # the pruned half are zero codes
    assert torch.equal(dst.qweight, codes) and torch.equal(dst.scales, src.scales.half().float())


@pytest.mark.parametrize("group_size", [None, 64])
def test_export_refuses_layouts_gguf_lacks(tmp_path, tokenizer_dir, group_size):
    model = tiny_llama()
    fastquant.patch(model, "int8", group_size=group_size)
    with pytest.raises(InteropError, match="int8 group 32 .as Q8_0."):
        export_gguf(model, tmp_path / "x.gguf", tokenizer_dir=tokenizer_dir)
    assert not (tmp_path / "x.gguf").exists()


def test_export_refuses_other_architectures(tmp_path, tokenizer_dir):
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=320)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(InteropError, match="llama-family"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer_dir=tokenizer_dir)


def test_cli_compress_then_export(tmp_path, tokenizer_dir, capsys):
    folder = tmp_path / "float"
    tiny_llama(vocab_size=320).save_pretrained(folder)
    byte_level_tokenizer(300).save_pretrained(folder)
    assert cli.main(["compress", str(folder), "--method", "int8", "--group-size", "32", "-o", str(tmp_path / "c")]) == 0
    assert cli.main(["export", str(tmp_path / "c"), "--format", "gguf", "-o", str(tmp_path / "c.gguf")]) == 0
    assert gguf.GGUFReader(tmp_path / "c.gguf").tensors[1].tensor_type.name in ("Q8_0", "F32")
    assert cli.main(["compress", str(folder), "--method", "int8", "-o", str(tmp_path / "pc")]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "pc"), "--format", "gguf", "-o", str(tmp_path / "pc.gguf")]) == 2
    assert "int8 per-channel" in capsys.readouterr().out


# --------------------------------------------------------------------------- llama.cpp reads the export


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(torch.exp(-logp.gather(1, ids[1:, None]).mean()))


def test_llama_cpp_perplexity_of_the_export_matches_fastquant(tmp_path, tokenizer_dir):
    """llama.cpp (llama-cpp-python, a benchmark/test extra built from source; not installed in CI, where this is
    skipped) runs the exported file: perplexity on the same tokens within 1% of fastquant's own."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (not in CI)")
    model = tiny_llama(vocab_size=320, std=0.1)
    fastquant.patch(model, "int8", group_size=32)
    export_gguf(model, tmp_path / "out.gguf", tokenizer_dir=tokenizer_dir)
    ids = torch.randint(0, 300, (96,), generator=torch.Generator().manual_seed(2))
    ours = _perplexity(_logits(model, ids[None])[0], ids)
    llm = llama_cpp.Llama(str(tmp_path / "out.gguf"), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids.tolist())
    theirs = _perplexity(torch.from_numpy(np.array(llm.scores[: ids.numel()])), ids)
    assert abs(theirs / ours - 1) < 0.01, (ours, theirs)
