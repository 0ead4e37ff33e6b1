"""API key file and per-key token buckets of fastquant serve (no Ray needed)."""

from __future__ import annotations

import pytest

from fastquant.serve.keys import KeyFileError, KeyStore, TokenBucket, add_key, revoke_key


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
    from fastquant.serve.config import ServeConfig

    for bad in (dict(replicas=0), dict(max_batch_size=0), dict(cpus_per_replica=0), dict(requests_per_minute=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServeConfig(checkpoint="x", api_keys="k", **bad)
    with pytest.raises(ValueError, match="over max_tokens_cap"):
        ServeConfig(checkpoint="x", api_keys="k", max_tokens_cap=8, default_max_tokens=16)
