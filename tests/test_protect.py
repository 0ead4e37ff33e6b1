"""Protected checkpoints: signed manifests, AES-256-GCM at rest, and every tamper case refused before loading."""

from __future__ import annotations

import json

import pytest
import torch

import fastquant
from fastquant import FastquantFormatError, Int8Linear, SparseLinear, protect
from fastquant.serialization import METADATA_KEY

pytest.importorskip("cryptography")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_serialization import _edit_manifest, fresh_like, tiny_llama  # noqa: E402

from helpers import spy_init_devices  # noqa: E402


@pytest.fixture
def sign_key(tmp_path):
    private, public = protect.new_signing_key(tmp_path / "signer.pem")
    return protect.read_signing_key(private), public


def _saved(tmp_path, method="int8", **kwargs):
    model = fastquant.patch(tiny_llama(), method, **kwargs)
    path = tmp_path / "model.fastquant.safetensors"
    fastquant.save(model, path)
    return model, path


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def _rewrite(path, edit_tensors=None, edit_manifest=None, keep_signature=True):
    """Rewrite a checkpoint's tensors and/or manifest, keeping the other header entries unless told not to."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
    manifest = json.loads(metadata[METADATA_KEY])
    if edit_tensors:
        edit_tensors(tensors, manifest)
    if edit_manifest:
        edit_manifest(manifest)
    metadata[METADATA_KEY] = json.dumps(manifest, sort_keys=True)
    if not keep_signature:
        metadata.pop(protect.SIGNATURE_KEY, None)
        metadata.pop(protect.SIGNER_KEY, None)
    save_file(tensors, str(path), metadata=metadata)


def _untouched(target):
    """A state-dict snapshot, to show that a refused load changed nothing in the model."""
    return {n: t.clone() for n, t in target.state_dict().items()}


def test_signed_round_trip_names_the_signer(tmp_path, sign_key):
    private, public = sign_key
    model, path = _saved(tmp_path)
    protect.protect_file(path, sign_key=private)
    loaded = fastquant.load(fresh_like(model), path, trusted_keys=[public])
    _assert_same(model, loaded)
    assert loaded._fastquant_checkpoint["signer"] == protect.fingerprint(protect.read_public_key(public))


SPARSE = dict(sparsity=0.6, sparse_kernel="sparse", pruning="magnitude", progress=False)


@pytest.mark.parametrize("method,kwargs", [("int8", {}), ("sparse", SPARSE)])
def test_encrypted_round_trip_is_bit_exact_and_hides_the_weights(tmp_path, sign_key, method, kwargs):
    private, public = sign_key
    model, path = _saved(tmp_path, method, **kwargs)
    key = protect.new_encryption_key()
    protect.protect_file(path, sign_key=private, encryption_key=key)
    raw = path.read_bytes()
    embedding = model.model.embed_tokens.weight.detach().numpy().tobytes()
    assert embedding[:64] not in raw
    assert key.hex() not in raw.decode("latin-1")
    loaded = fastquant.load(fresh_like(model), path, trusted_keys=[public], decryption_key=key)
    _assert_same(model, loaded)
    ids = torch.tensor([[1, 5, 9, 200, 17]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_key_from_environment_and_key_file(tmp_path, monkeypatch):
    model, path = _saved(tmp_path)
    key = protect.new_encryption_key()
    protect.protect_file(path, encryption_key=key)
    monkeypatch.setenv(protect.KEY_ENV, key.hex())
    _assert_same(model, fastquant.load(fresh_like(model), path))
    monkeypatch.delenv(protect.KEY_ENV)
    key_file = protect.write_key_file(tmp_path / "key", key)
    assert key_file.stat().st_mode & 0o077 == 0
    monkeypatch.setenv(protect.KEY_FILE_ENV, str(key_file))
    _assert_same(model, fastquant.load(fresh_like(model), path))


def test_missing_and_wrong_key_load_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(protect.KEY_ENV, raising=False)
    monkeypatch.delenv(protect.KEY_FILE_ENV, raising=False)
    model, path = _saved(tmp_path)
    key = protect.new_encryption_key()
    protect.protect_file(path, encryption_key=key)
    target = fresh_like(model)
    before = _untouched(target)
    with pytest.raises(FastquantFormatError, match="encrypted: set FASTQUANT_KEY"):
        fastquant.load(target, path)
    wrong = protect.new_encryption_key()
    with pytest.raises(FastquantFormatError, match="wrong decryption key") as info:
        fastquant.load(target, path, decryption_key=wrong)
    assert wrong.hex() not in str(info.value) and key.hex() not in str(info.value)
    monkeypatch.setenv(protect.KEY_ENV, "not hex")
    with pytest.raises(FastquantFormatError, match="64 hex characters"):
        fastquant.load(target, path)
    _assert_same_dict(before, target)


def _assert_same_dict(before, target):
    after = target.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not any(isinstance(m, (Int8Linear, SparseLinear)) for m in target.modules())


def test_tampered_ciphertext(tmp_path):
    model, path = _saved(tmp_path)
    key = protect.new_encryption_key()
    protect.protect_file(path, encryption_key=key)
    name = "model.layers.0.mlp.up_proj.qweight"

    def flip(tensors, manifest):
        t = tensors[name].clone()
        t[7] ^= 1
        tensors[name] = t
        manifest["tensors"][name]["sha256"] = fastquant.serialization._sha256(t)  # an attacker can fix the hash

    _rewrite(path, flip)
    target = fresh_like(model)
    before = _untouched(target)
    with pytest.raises(FastquantFormatError, match="up_proj.qweight.*AES-GCM authentication"):
        fastquant.load(target, path, decryption_key=key)
    _assert_same_dict(before, target)


def test_ciphertexts_moved_between_names_fail(tmp_path):
    model, path = _saved(tmp_path)
    key = protect.new_encryption_key()
    protect.protect_file(path, encryption_key=key)
    a, b = "model.layers.0.mlp.up_proj.qweight", "model.layers.0.mlp.gate_proj.qweight"

    def swap(tensors, manifest):
        tensors[a], tensors[b] = tensors[b], tensors[a]
        ta, tb = manifest["tensors"][a], manifest["tensors"][b]
        ta["sha256"], tb["sha256"] = tb["sha256"], ta["sha256"]
        ta["nonce"], tb["nonce"] = tb["nonce"], ta["nonce"]

    _rewrite(path, swap)
    with pytest.raises(FastquantFormatError, match="AES-GCM authentication"):
        fastquant.load(fresh_like(model), path, decryption_key=key)


def test_unsigned_or_untrusted_file_is_refused_when_a_signature_is_required(tmp_path, sign_key):
    _, public = sign_key
    model, path = _saved(tmp_path)
    with pytest.raises(FastquantFormatError, match="not signed"):
        fastquant.load(fresh_like(model), path, trusted_keys=[public])
    other, _ = protect.new_signing_key(tmp_path / "other.pem")
    protect.protect_file(path, sign_key=protect.read_signing_key(other))
    with pytest.raises(FastquantFormatError, match="not a trusted key"):
        fastquant.load(fresh_like(model), path, trusted_keys=[public])


def _swap_with_entries(tensors, manifest):
    # Swap two same-shaped tensors together with their manifest entries: every hash still matches.
    a, b = "model.layers.0.mlp.up_proj.qweight", "model.layers.0.mlp.gate_proj.qweight"
    tensors[a], tensors[b] = tensors[b], tensors[a]
    manifest["tensors"][a], manifest["tensors"][b] = manifest["tensors"][b], manifest["tensors"][a]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda p: _rewrite(p, edit_manifest=lambda m: m["aliases"].update({"lm_head.weight": "model.norm.weight"})),
        lambda p: _rewrite(p, _swap_with_entries),
        lambda p: _rewrite(p, edit_manifest=lambda m: m["layers"]["model.layers.1.mlp.down_proj"].update(bias=True)),
        lambda p: _rewrite(p, edit_manifest=lambda m: m.update(method="float")),
    ],
    ids=["alias", "swapped-tensors-and-entries", "layer-entry", "method"],
)
def test_any_edit_of_a_signed_manifest_is_refused(tmp_path, sign_key, tamper):
    private, public = sign_key
    model, path = _saved(tmp_path)
    protect.protect_file(path, sign_key=private)
    tamper(path)
    target = fresh_like(model)
    before = _untouched(target)
    with pytest.raises(FastquantFormatError, match="signature is invalid"):
        fastquant.load(target, path, trusted_keys=[public])
    _assert_same_dict(before, target)


def test_edited_alias_in_an_unsigned_file_is_refused(tmp_path):
    model, path = _saved(tmp_path)
    # lm_head.weight and model.embed_tokens.weight are the model's only tie: point the alias elsewhere.
    _edit_manifest(path, lambda m: m["aliases"].update({"lm_head.weight": "model.layers.0.mlp.up_proj.qweight"}))
    with pytest.raises(FastquantFormatError, match="invalid manifest entry for layer|alias"):
        fastquant.load(fresh_like(model), path)
    model = fastquant.patch(tiny_llama(tie_word_embeddings=False), "int8")
    path2 = tmp_path / "untied.safetensors"
    fastquant.save(model, path2)

    def alias(tensors, manifest):
        del tensors["lm_head.weight"], manifest["tensors"]["lm_head.weight"]
        manifest["aliases"]["lm_head.weight"] = "model.embed_tokens.weight"

    _rewrite(path2, alias)
    with pytest.raises(
        FastquantFormatError, match="alias 'lm_head.weight' -> 'model.embed_tokens.weight' is not a tie"
    ):
        fastquant.load(fresh_like(model), path2)


def test_huge_layer_claim_is_refused_before_allocating(tmp_path, monkeypatch):
    model, path = _saved(tmp_path)
    name = "model.layers.0.mlp.up_proj"
    _edit_manifest(path, lambda m: m["layers"][name].update(in_features=5_000_000))
    devices = spy_init_devices(monkeypatch, Int8Linear)
    with pytest.raises(FastquantFormatError, match=f"invalid manifest entry for layer '{name}'.*5000000"):
        fastquant.load(fresh_like(model), path)
    assert devices and set(devices) == {"meta"}


def test_csr16_masks_that_disagree_with_row_offsets_are_refused(tmp_path):
    model = fastquant.patch(tiny_llama(), "sparse", **SPARSE)
    name = "model.layers.0.mlp.up_proj"
    model.get_submodule(name).set_layout("csr16")
    path = tmp_path / "m.safetensors"
    manifest = fastquant.save(model, path)
    assert manifest["layers"][name]["layout"] == "csr16"

    def clear_a_kept_bit(tensors, manifest):
        masks = tensors[f"{name}.masks"].clone()
        row = masks[3]
        col = int((row != 0).nonzero()[0])
        word = int(row[col]) & 0xFFFF
        row[col] = torch.tensor(word & (word - 1), dtype=torch.int32).to(torch.int16)  # drop the lowest set bit
        tensors[f"{name}.masks"] = masks
        manifest["tensors"][f"{name}.masks"]["sha256"] = fastquant.serialization._sha256(masks)

    _rewrite(path, clear_a_kept_bit)
    with pytest.raises(FastquantFormatError, match=f"layer '{name}'.*row 3 keeps"):
        fastquant.load(fresh_like(model), path)
