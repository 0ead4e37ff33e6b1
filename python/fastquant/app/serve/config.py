"""The settings of ``fastquant serve``, importable without Ray (the command line reads its defaults here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeConfig:
    """What ``fastquant serve`` runs (most fields have a command-line option of the same name)."""

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
    # Non-streaming requests arriving together can share one generate call (fastquant.app.serve.batching). Off (1)
    # by default: on CPU replicas (1 thread each) one padded generate over requests of mixed lengths served 0.71x the
    # requests/s of one call per request (benchmarks/results/serve-load-2026-12-07.md); it pays where a step is
    # bound by reading the weights, as on a GPU: set --max-batch-size there.
    max_batch_size: int = 1
    batch_wait_s: float = 0.01
    trusted_keys: tuple[str, ...] = ()  # Ed25519 public key files; when given, the checkpoint must be signed
    key_file: str | None = None  # AES key file of an encrypted checkpoint (else $FASTQUANT_KEY[_FILE])
    audit_log: str | None = None
    audit_prompts: bool = False

    def __post_init__(self) -> None:
        # Refused here, in the command's process, rather than by every replica as it starts.
        counts = ("replicas", "max_body_bytes", "max_prompt_tokens", "max_tokens_cap", "default_max_tokens")
        for name in (*counts, "max_ongoing_requests", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.cpus_per_replica > 0:
            raise ValueError(f"cpus_per_replica must be positive, got {self.cpus_per_replica}")
        if self.requests_per_minute is not None and not self.requests_per_minute > 0:
            raise ValueError(f"requests_per_minute must be positive, got {self.requests_per_minute}")
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(
                f"default_max_tokens {self.default_max_tokens} is over max_tokens_cap {self.max_tokens_cap}"
            )

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.checkpoint).resolve().name
