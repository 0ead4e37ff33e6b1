"""API keys for ``fastquant serve``: a JSON file the operator manages, holding only hashes of the keys.

A key is ``fq-<id>-<secret>``: the id (8 hex characters) names the key in logs and metrics and finds its entry; the
secret is 32 random bytes. Keys are random and long, so a plain SHA-256 is enough to make the file useless to a
reader (a slow password hash protects guessable secrets, which these are not); hashes are compared in constant time.

    {"keys": [{"id": "3f9a0c1d", "name": "alice", "sha256": "...", "models": ["*"],
               "requests_per_minute": 60, "created": "2026-01-01T00:00:00Z", "revoked": null}]}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEY_PREFIX = "fq"


class KeyFileError(ValueError):
    """The API key file cannot be read or changed as asked."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    models: tuple[str, ...]
    requests_per_minute: float | None

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_entries(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: not a fastquant API key file (invalid JSON: {exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeyFileError(f"{path}: not a fastquant API key file (expected {{'keys': [...]}})")
    return data["keys"]


def _write_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"keys": entries}, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)  # atomic: a serving replica never reads half a file


def add_key(
    path: str | os.PathLike, name: str, *, models: list[str] | None = None, requests_per_minute: float | None = None
) -> tuple[str, dict[str, Any]]:
    """Create a key named ``name``; returns the key (shown once, never stored) and its file entry."""
    path = Path(path)
    if not name or not name.isprintable():
        raise KeyFileError("a key name must be non-empty printable text")
    if requests_per_minute is not None and not requests_per_minute > 0:
        raise KeyFileError(f"requests_per_minute must be positive, got {requests_per_minute}")
    entries = read_entries(path)
    if any(e.get("name") == name and not e.get("revoked") for e in entries):
        raise KeyFileError(f"{path}: an active key named {name!r} exists (revoke it first)")
    ids = {e.get("id") for e in entries}
    key_id = secrets.token_hex(4)
    while key_id in ids:
        key_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    key = f"{KEY_PREFIX}-{key_id}-{secret}"
    entry = {
        "id": key_id,
        "name": name,
        "sha256": _hash(key),
        "models": models or ["*"],
        "requests_per_minute": requests_per_minute,
        "created": _now(),
        "revoked": None,
    }
    _write_entries(path, [*entries, entry])
    return key, entry


def revoke_key(path: str | os.PathLike, name_or_id: str) -> list[str]:
    """Revoke every active key with this name or id; returns their ids. The entries stay, for the audit trail."""
    path = Path(path)
    entries = read_entries(path)
    hit = [e for e in entries if name_or_id in (e.get("name"), e.get("id")) and not e.get("revoked")]
    if not hit:
        raise KeyFileError(f"{path}: no active key named or with id {name_or_id!r}")
    for e in hit:
        e["revoked"] = _now()
    _write_entries(path, entries)
    return [e["id"] for e in hit]


class KeyStore:
    """Checks presented keys against the file, re-reading it when it changes (a revoke applies without restart)."""

    def __init__(self, path: str | os.PathLike, default_requests_per_minute: float | None = None) -> None:
        self.path = Path(path)
        self.default_requests_per_minute = default_requests_per_minute
        self._stamp: tuple[int, int] | None = None
        self._entries: dict[str, dict[str, Any]] = {}
        self._reload()

    def _reload(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise KeyFileError(f"no API key file at {self.path} (create one: fastquant serve keys add)") from None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._entries = {e["id"]: e for e in read_entries(self.path) if isinstance(e, dict) and "id" in e}
            self._stamp = stamp

    def check(self, key: str) -> ApiKey | None:
        """The key's identity, or None for an unknown, malformed or revoked key."""
        self._reload()
        parts = key.split("-", 2)
        if len(parts) != 3 or parts[0] != KEY_PREFIX:
            return None
        entry = self._entries.get(parts[1])
        if entry is None or entry.get("revoked") or not hmac.compare_digest(entry.get("sha256", ""), _hash(key)):
            return None
        rate = entry.get("requests_per_minute")
        return ApiKey(
            id=entry["id"],
            name=str(entry.get("name", "")),
            models=tuple(entry.get("models") or ("*",)),
            requests_per_minute=float(rate) if rate is not None else self.default_requests_per_minute,
        )


class TokenBucket:
    """Per-key request budget: ``rate`` requests per minute, bursts up to ``rate``; says how long to wait when empty."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last update, monotonic)

    def take(self, key_id: str, requests_per_minute: float, now: float | None = None) -> float:
        """0 when the request may go ahead, else the seconds until it may."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key_id, (requests_per_minute, now))
        tokens = min(requests_per_minute, tokens + (now - last) * requests_per_minute / 60)
        if tokens >= 1:
            self._buckets[key_id] = (tokens - 1, now)
            return 0.0
        self._buckets[key_id] = (tokens, now)
        return (1 - tokens) * 60 / requests_per_minute
