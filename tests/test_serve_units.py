"""fastquant serve without Ray running: API key file, token buckets, config checks, audit log, stop sequences."""

from __future__ import annotations

import pytest

from fastquant.app.serve.keys import KeyFileError, KeyStore, TokenBucket, add_key, revoke_key


def test_bucket_allows_a_burst_then_says_how_long_to_wait():
    bucket = TokenBucket()
    assert [bucket.take("a", 6, now=100.0) for _ in range(6)] == [0.0] * 6
    assert bucket.take("a", 6, now=100.0) == pytest.approx(10.0)  # 6/minute: one every 10 s
    assert bucket.take("b", 6, now=100.0) == 0.0  # keys do not share a bucket
    assert bucket.take("a", 6, now=105.0) == pytest.approx(5.0)
    assert bucket.take("a", 6, now=110.0) == 0.0


def test_store_checks_hash_models_and_revocation(tmp_path):
    path = tmp_path / "keys.json"
    key, entry = add_key(path, "alice", models=["m1"], requests_per_minute=30)
    assert key.startswith(f"fq-{entry['id']}-") and key not in path.read_text()
    store = KeyStore(path, default_requests_per_minute=60)
    found = store.check(key)
    assert found.name == "alice" and found.allows("m1") and not found.allows("m2")
    assert found.requests_per_minute == 30
    for bad in ("", "fq", key[:-1], key + "x", key.replace("fq-", "xx-"), f"fq-{entry['id']}-"):
        assert store.check(bad) is None
    with pytest.raises(KeyFileError, match="active key named 'alice'"):
        add_key(path, "alice")
    assert revoke_key(path, "alice") == [entry["id"]]
    assert store.check(key) is None
    with pytest.raises(KeyFileError, match="no active key"):
        revoke_key(path, "alice")


def test_unreadable_key_files_are_clear_errors(tmp_path):
    with pytest.raises(KeyFileError, match="no API key file"):
        KeyStore(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(KeyFileError, match="invalid JSON"):
        KeyStore(bad)
    bad.write_text('{"keys": 3}')
    with pytest.raises(KeyFileError, match="expected"):
        KeyStore(bad)


def test_serve_config_refuses_nonsense_before_starting_anything():
    from fastquant.app.serve.config import ServeConfig

    for bad in (dict(replicas=0), dict(max_batch_size=0), dict(cpus_per_replica=0), dict(requests_per_minute=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServeConfig(checkpoint="x", api_keys="k", **bad)
    with pytest.raises(ValueError, match="over max_tokens_cap"):
        ServeConfig(checkpoint="x", api_keys="k", max_tokens_cap=8, default_max_tokens=16)


def test_audit_log_leaves_prompts_out_unless_asked(tmp_path):
    import json

    from fastquant.app.serve.audit import AuditLog

    for prompts in (False, True):
        path = tmp_path / f"audit-{prompts}.jsonl"
        AuditLog(path, prompts=prompts).request(key_id="k1", status=200, prompt="secret plan", output="ok")
        (record,) = [json.loads(line) for line in path.read_text().splitlines()]
        assert record["event"] == "request" and record["key_id"] == "k1" and record["status"] == 200
        assert ("secret plan" in path.read_text()) is prompts
        assert path.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    "pieces,stops,expected,stopped",
    [
        (["Hel", "lo wor", "ld"], ["lo w"], "Hel", True),  # a stop split across pieces
        (["ab", "c"], ["x"], "abc", False),
        (["a\nb"], ["\n", "b"], "a", True),  # the earliest match wins
        (["ST", "OP and more"], ["STOP"], "", True),
        (["no stops"], [], "no stops", False),
    ],
)
def test_stop_text_cuts_at_the_first_stop_even_across_pieces(pieces, stops, expected, stopped):
    pytest.importorskip("ray.serve")
    from fastquant.app.serve.app import _StopText

    stop = _StopText(stops)
    out = "".join(stop.feed(p) for p in pieces) + stop.flush()
    assert out == expected and stop.stopped is stopped


def test_serve_refuses_a_bad_checkpoint_or_key_file_before_starting_ray(tmp_path, capsys):
    pytest.importorskip("ray.serve")
    pytest.importorskip("cryptography")
    pytest.importorskip("transformers")
    import ray
    from test_serialization import tiny_llama

    import fastquant
    from fastquant import protect
    from fastquant.app import cli

    fastquant.save(fastquant.patch(tiny_llama(), "int8"), tmp_path / "m" / "model.fastquant.safetensors")
    _, public = protect.new_signing_key(tmp_path / "signer.pem")
    keys = tmp_path / "keys.json"
    base = ["serve", str(tmp_path / "m"), "--api-keys", str(keys)]
    assert cli.main(base) == 2
    assert "no API key file" in " ".join(capsys.readouterr().out.split())  # rich wraps lines
    add_key(keys, "ops")
    assert cli.main([*base, "--trusted-key", str(public)]) == 2
    assert "not signed" in " ".join(capsys.readouterr().out.split())  # rich wraps lines
    key = protect.new_encryption_key()
    protect.protect_file(tmp_path / "m" / "model.fastquant.safetensors", encryption_key=key)
    protect.write_key_file(tmp_path / "wrong.key", protect.new_encryption_key())
    assert cli.main([*base, "--key-file", str(tmp_path / "wrong.key")]) == 2
    assert "wrong decryption key" in " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert not ray.is_initialized()
