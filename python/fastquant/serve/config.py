"""The settings of ``fastquant serve``, importable without Ray (the command line reads its defaults here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeConfig:
    """What ``fastquant serve`` runs; every field has a command-line option of the same name."""

    checkpoint: str
    api_keys: str
    model_name: str | None = None  # default: the checkpoint folder's name
    replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_port: int = 8080
    cpus_per_replica: float = 1.0
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_tokens_cap: int = 512
    default_max_tokens: int = 16
    requests_per_minute: float | None = 60.0  # per key, unless its entry in the key file says otherwise
    max_ongoing_requests: int = 16  # per replica, running or waiting; Ray Serve queues the rest
    # Non-streaming requests arriving together share one generate call (fastquant.serve.batching); 1 turns it off.
    max_batch_size: int = 8
    batch_wait_s: float = 0.01
    trusted_keys: tuple[str, ...] = ()  # Ed25519 public key files; when given, the checkpoint must be signed
    key_file: str | None = None  # AES key file of an encrypted checkpoint (else $FASTQUANT_KEY[_FILE])
    audit_log: str | None = None
    audit_prompts: bool = False

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.checkpoint).resolve().name
