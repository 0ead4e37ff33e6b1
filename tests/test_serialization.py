"""fastquant.save / load: bit-exact round trip, tied weights stored once, clear errors on bad files."""

from __future__ import annotations

import json
import os
import stat
import struct

import pytest
import torch

import fastquant
from fastquant import FastquantFormatError, Int8Linear, SparseLinear
from fastquant.serialization import FORMAT_VERSION, METADATA_KEY, READ_FORMAT_VERSION, read_manifest
from helpers import tiny_llama_config

transformers = pytest.importorskip("transformers")


def tiny_config(**overrides):
    return tiny_llama_config(
        **{"hidden_size": 128, "intermediate_size": 256, "vocab_size": 512, "tie_word_embeddings": True, **overrides}
    )


def tiny_llama(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_config(**overrides)).eval()


def fresh_like(model):
    torch.manual_seed(1234)  # different random weights, so a load that copies nothing cannot pass
    return transformers.LlamaForCausalLM(model.config).eval()


PATCHES = {
    "int8": ("int8", dict()),
    "int8-group64": ("int8", dict(group_size=64)),
    "int8+lm_head": ("int8", dict(skip=(), quantize_tied=True)),
    "int8-x8": (fastquant.Int8(int8_activations=True), dict()),
    # sparse_kernel="sparse": the tiny layers would otherwise keep their faster dense kernels
    "sparse": ("sparse", dict(pruning="magnitude", sparsity=0.6, sparse_kernel="sparse", progress=False)),
    "sparse-2:4+lm_head": (
        "sparse",
        dict(pruning="magnitude", pattern="2:4", sparse_kernel="sparse", skip=(), quantize_tied=True),
    ),
    "int8+sparse-group32": (
        "int8+sparse",
        dict(pruning="magnitude", group_size=32, sparse_kernel="sparse", progress=False),
    ),
}


@pytest.fixture(params=list(PATCHES))
def saved(request, tmp_path):
    method, kwargs = PATCHES[request.param]
    model = fastquant.patch(tiny_llama(), method, **kwargs)
    path = tmp_path / "model.safetensors"
    fastquant.save(model, path)
    return model, path


def _rewrite_header(path, edit) -> None:
    """Rewrite a safetensors file's JSON header through ``edit(header_dict)``, keeping the tensor bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _edit_manifest(path, edit) -> None:
    def f(header):
        manifest = json.loads(header["__metadata__"][METADATA_KEY])
        edit(manifest)
        header["__metadata__"][METADATA_KEY] = json.dumps(manifest)

    _rewrite_header(path, f)


def test_round_trip_is_bit_exact(saved):
    model, path = saved
    loaded = fastquant.load(fresh_like(model), path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, SparseLinear)):
            other = loaded.get_submodule(name)
            assert type(other) is type(module) and other.group_size == module.group_size
            assert other.format == module.format
            assert getattr(other, "int8_activations", False) is getattr(module, "int8_activations", False)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_generate_after_load_matches(saved):
    model, path = saved
    loaded = fastquant.load(fresh_like(model), path)
    ids = torch.tensor([[1, 5, 9, 200, 17]])
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), loaded.generate(ids, **kwargs))


def test_manifest_records_method_layers_and_hashes(tmp_path):
    model = fastquant.patch(tiny_llama(), "int8", group_size=32)
    path = tmp_path / "m.safetensors"
    fastquant.save(model, path, method="int8")
    manifest = read_manifest(path)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["fastquant_version"] == fastquant.__version__
    assert manifest["method"] == "int8"
    quantized = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert set(manifest["layers"]) == quantized and len(quantized) == 14
    assert all(spec["group_size"] == 32 for spec in manifest["layers"].values())
    assert all(len(t["sha256"]) == 64 for t in manifest["tensors"].values())


def test_tied_weights_stored_once_and_size_is_compressed(tmp_path):
    model = fastquant.patch(tiny_llama(), "int8")  # lm_head stays tied to the float embedding
    path = tmp_path / "m.safetensors"
    manifest = fastquant.save(model, path)
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    tensor_bytes = sum(
        t.numel() * t.element_size() for n, t in model.state_dict().items() if n not in manifest["aliases"]
    )
    size = path.stat().st_size
    assert tensor_bytes <= size < tensor_bytes + 64 * 1024  # only the header on top of the stored tensors
    float_bytes = sum(p.numel() * 4 for p in tiny_llama().parameters())  # tied: counted once by parameters()
    assert size < 0.5 * float_bytes
    loaded = fastquant.load(fresh_like(model), path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_load_into_already_patched_model(saved):
    model, path = saved
    target = fresh_like(model)
    fastquant.patch(target, "int8")  # per-channel int8 everywhere but lm_head
    if any(
        isinstance(m, Int8Linear)
        and (type(model.get_submodule(n)) is not Int8Linear or m.group_size != model.get_submodule(n).group_size)
        for n, m in target.named_modules()
    ):
        with pytest.raises(FastquantFormatError, match="architecture mismatch"):
            fastquant.load(target, path)
    else:
        fastquant.load(target, path)
        assert torch.equal(target.model.layers[0].mlp.up_proj.qweight, model.model.layers[0].mlp.up_proj.qweight)
        # The option is no tensor: a layer patched before loading takes the checkpoint's.
        for name, module in target.named_modules():
            if isinstance(module, Int8Linear):
                assert module.int8_activations is model.get_submodule(name).int8_activations, name


def test_truncated_file(saved):
    model, path = saved
    raw = path.read_bytes()
    for keep in (4, 100, len(raw) - 10):
        path.write_bytes(raw[:keep])
        with pytest.raises(FastquantFormatError, match="truncated or corrupted"):
            fastquant.load(fresh_like(model), path)


def test_flipped_byte_in_a_tensor(saved):
    model, path = saved
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40  # inside the last stored tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(FastquantFormatError, match="sha256"):
        fastquant.load(fresh_like(model), path)


def test_edited_manifest_hash(saved):
    model, path = saved
    _edit_manifest(path, lambda m: m["tensors"]["model.norm.weight"].update(sha256="0" * 64))
    with pytest.raises(FastquantFormatError, match="model.norm.weight.*sha256"):
        fastquant.load(fresh_like(model), path)


def test_edited_manifest_layer_parameters(saved):
    model, path = saved
    name = "model.layers.0.mlp.up_proj"
    _edit_manifest(path, lambda m: m["layers"][name].update(group_size=128))
    expected = "architecture mismatch at 'model.layers.0.mlp.up_proj.scales'|invalid manifest entry for layer"
    with pytest.raises(FastquantFormatError, match=expected):
        fastquant.load(fresh_like(model), path)


def test_manifest_not_json(saved):
    model, path = saved

    def f(header):
        header["__metadata__"][METADATA_KEY] = "{not json"

    _rewrite_header(path, f)
    with pytest.raises(FastquantFormatError, match="not valid JSON"):
        fastquant.load(fresh_like(model), path)


def test_newer_format_version(saved):
    model, path = saved
    _edit_manifest(path, lambda m: m.update(format_version=READ_FORMAT_VERSION + 1))
    with pytest.raises(FastquantFormatError, match="format version 3.*upgrade fastquant"):
        fastquant.load(fresh_like(model), path)


def test_plain_safetensors_file_is_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    with pytest.raises(FastquantFormatError, match="without a fastquant manifest"):
        fastquant.load(tiny_llama(), path)


@pytest.mark.parametrize(
    "other",
    [dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1), dict(num_hidden_layers=3)],
    ids=["narrower", "deeper"],
)
def test_wrong_architecture(saved, other):
    _, path = saved
    with pytest.raises(FastquantFormatError, match="architecture mismatch"):
        fastquant.load(tiny_llama(**other), path)


def test_wrong_model_class(saved):
    _, path = saved
    model = transformers.LlamaModel(tiny_config())
    with pytest.raises(FastquantFormatError, match="checkpoint is for LlamaForCausalLM, got LlamaModel"):
        fastquant.load(model, path)


def test_errors_are_value_errors():
    assert issubclass(FastquantFormatError, ValueError)


def test_checkpoint_file_gets_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        fastquant.save(fastquant.patch(tiny_llama(), "int8"), tmp_path / "model.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o640


def test_missing_checkpoint_errors_name_the_file_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"expected {tmp_path / 'model.fastquant.safetensors'}"):
        fastquant.load(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_manifest(tmp_path / "model.safetensors")


# ------------------------------------------------------------------------------------------ int8_activations
def test_int8_activations_round_trips_through_the_manifest(tmp_path):
    model = fastquant.patch(tiny_llama(seed=8), fastquant.Int8(group_size=32, int8_activations=True))
    path = tmp_path / "m.safetensors"
    manifest = fastquant.save(model, path)
    assert manifest["method"] == "int8"
    assert manifest["layers"]["model.layers.0.mlp.down_proj"] == {
        "type": "int8",
        "in_features": 256,
        "out_features": 128,
        "bias": False,
        "group_size": 32,
        "dtype": "float32",
        "int8_activations": True,
    }
    loaded = fastquant.load(fresh_like(model), path)
    layers = [m for m in loaded.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 14 and all(m.int8_activations for m in layers)
    assert {r.name: r.format for r in fastquant.report(loaded).layers}["model.layers.0.mlp.down_proj"] == (
        "int8 group=32 x=int8"
    )
    plain = fastquant.patch(tiny_llama(seed=8), "int8", group_size=32)
    plain_spec = fastquant.save(plain, tmp_path / "plain.safetensors")["layers"]["model.layers.0.mlp.down_proj"]
    assert plain_spec["int8_activations"] is False
    ids = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        rounded = loaded(ids).logits
        assert torch.equal(model(ids).logits, rounded)
        assert not torch.equal(plain(ids).logits, rounded)  # the loaded layers do round their inputs


def test_int8_manifest_without_int8_activations_loads_unrounded(tmp_path):
    """Files written before the option have no key: x is used as it is."""
    model = fastquant.patch(tiny_llama(), fastquant.Int8(int8_activations=True))
    path = tmp_path / "m.safetensors"
    fastquant.save(model, path)

    def drop(manifest):
        for spec in manifest["layers"].values():
            del spec["int8_activations"]

    _edit_manifest(path, drop)
    loaded = fastquant.load(fresh_like(model), path)
    layers = [m for m in loaded.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 14 and not any(m.int8_activations for m in layers)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_edited_int8_activations_entry_is_refused(tmp_path, value):
    model = fastquant.patch(tiny_llama(), "int8")
    path = tmp_path / "m.safetensors"
    fastquant.save(model, path)
    name = "model.layers.1.self_attn.q_proj"
    _edit_manifest(path, lambda m: m["layers"][name].update(int8_activations=value))
    with pytest.raises(FastquantFormatError, match=f"layer '{name}'.*int8_activations must be True or False"):
        fastquant.load(fresh_like(model), path)
