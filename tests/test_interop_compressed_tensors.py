"""compressed-tensors out: the folder loads with transformers + compressed-tensors and computes what fastquant does.

Exactness rule: the weights transformers de-compresses equal the fastquant layers' dequantize() exactly (the format
stores the same codes and fp32 scales); logits agree within 1e-4 of the largest logit (fastquant's kernels sum in
another order than torch's matmul; measured differences are ~1e-6 relative).
"""

from __future__ import annotations

import json

import pytest
import torch

import fastquant
from fastquant.app import cli
from fastquant.interop import InteropError
from fastquant.interop.ct_out import export_compressed_tensors

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors", reason="compressed-tensors is in the test extra (Python >= 3.11)")

from interop_helpers import byte_level_tokenizer, tiny_llama, write_llama_gguf  # noqa: E402


def _load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _check(model, folder, ids) -> None:
    loaded = _load(folder)
    assert loaded.config.quantization_config is not None
    with torch.no_grad():
        a, b = loaded(ids).logits, model(ids).logits  # the first forward pass de-compresses the layers
    assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()
    for name, module in model.named_modules():
        if hasattr(module, "dequantize") and hasattr(module, "scales"):
            got = loaded.get_submodule(name).weight
            assert torch.equal(got, module.dequantize()), name


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("group_size", [None, 32, 128])
def test_int8_exports_and_loads(tmp_path, ids, group_size):
    model = tiny_llama()
    fastquant.patch(model, "int8", group_size=group_size)
    summary = export_compressed_tensors(model, tmp_path / "ct")
    layout = "per-channel" if group_size is None else f"group {group_size}"
    assert summary["schemes"] == {f"int8 {layout}": 14}
    _check(model, tmp_path / "ct", ids)


def test_untouched_head_stays_float_and_is_ignored(tmp_path, ids):
    model = tiny_llama(tie=False)
    fastquant.patch(model, "int8", group_size=32)
    summary = export_compressed_tensors(model, tmp_path / "ct")
    assert summary["float_layers"] == ["lm_head"]
    _check(model, tmp_path / "ct", ids)
    written = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert written["ignore"] == ["lm_head"] and written["format"] == "pack-quantized"


def test_sparse_model_exports_dense_with_masks_applied(tmp_path, ids):
    model = tiny_llama()
    fastquant.patch(model, "int8+sparse", sparsity=0.5, pruning="magnitude", group_size=32)
    export_compressed_tensors(model, tmp_path / "ct")
    _check(model, tmp_path / "ct", ids)  # every layer's weight equals the sparse layer's, zeros included
    assert (model.model.layers[0].mlp.up_proj.dequantize() == 0).float().mean().item() >= 0.5


def test_int4_symmetric_exports_and_loads(tmp_path, ids):
    model = tiny_llama()
    fastquant.patch(model, "int4", group_size=32, symmetric=True)
    summary = export_compressed_tensors(model, tmp_path / "ct")
    assert summary["schemes"] == {"int4 group 32": 14}
    _check(model, tmp_path / "ct", ids)


def test_int4_with_int8_activations_exports_its_weights_and_says_so(tmp_path, ids):
    model = fastquant.patch(tiny_llama(), fastquant.Int4(int8_activations=True))
    with pytest.warns(UserWarning, match="14 int4 layers round their input to int8"):
        summary = export_compressed_tensors(model, tmp_path / "ct")
    assert summary["schemes"] == {"int4 group 32": 14}
    for layer in (m for m in model.modules() if isinstance(m, fastquant.Int4Linear)):
        layer.int8_activations = False  # the exported model computes with float activations
    _check(model, tmp_path / "ct", ids)


def test_int8_with_int8_activations_exports_its_weights_and_says_so(tmp_path, ids):
    model = fastquant.patch(tiny_llama(), fastquant.Int8(group_size=32, int8_activations=True))
    with pytest.warns(UserWarning, match="^14 int8 layers round their input to int8") as caught:
        summary = export_compressed_tensors(model, tmp_path / "ct")
    assert not any("int4" in str(w.message) for w in caught)
    assert summary["schemes"] == {"int8 group 32": 14}
    for layer in (m for m in model.modules() if isinstance(m, fastquant.Int8Linear)):
        layer.int8_activations = False  # the exported model computes with float activations
    _check(model, tmp_path / "ct", ids)


def test_mixed_int8_and_int4_layers_with_int8_activations_are_counted_apart(tmp_path):
    model = fastquant.patch(
        tiny_llama(), fastquant.Int8(int8_activations=True), filter_fn=lambda module, name: ".mlp." in name
    )
    fastquant.patch(model, fastquant.Int4(int8_activations=True), filter_fn=lambda module, name: ".self_attn." in name)
    with pytest.warns(UserWarning, match="^6 int8 and 8 int4 layers round their input to int8"):
        summary = export_compressed_tensors(model, tmp_path / "ct")
    assert summary["schemes"] == {"int8 per-channel": 6, "int4 group 32": 8}


def test_model_transformers_loaded_from_gguf_exports(tmp_path, ids):
    # transformers marks a model it de-quantized from a GGUF file as quantized, and save_pretrained refuses it.
    pytest.importorskip("gguf")
    path = write_llama_gguf(tiny_llama(), tmp_path / "tiny.gguf", "Q8_0")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    fastquant.patch(model.eval(), "int8", group_size=32)
    export_compressed_tensors(model, tmp_path / "ct")
    _check(model, tmp_path / "ct", ids)


def test_int4_asymmetric_is_refused(tmp_path):
    model = tiny_llama()
    fastquant.patch(model, "int4", group_size=32, symmetric=False)
    with pytest.raises(InteropError, match="integer zero points"):
        export_compressed_tensors(model, tmp_path / "ct")


def test_float_model_is_refused(tmp_path):
    with pytest.raises(InteropError, match="no int8/int4 fastquant layers"):
        export_compressed_tensors(tiny_llama(), tmp_path / "ct")


def test_cli_export(tmp_path, ids):
    folder = tmp_path / "float"
    tiny_llama().save_pretrained(folder)
    byte_level_tokenizer(300).save_pretrained(folder)
    out = tmp_path / "c"
    assert cli.main(["compress", str(folder), "--method", "int8", "--group-size", "64", "-o", str(out)]) == 0
    assert cli.main(["export", str(out), "--format", "compressed-tensors", "-o", str(tmp_path / "ct")]) == 0
    model, _ = fastquant.from_pretrained(out)
    _check(model, tmp_path / "ct", ids)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "ct")("to be").input_ids
