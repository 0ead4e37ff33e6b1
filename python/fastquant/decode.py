"""Fast generation: the decode step of a transformers model compiled once, with a static KV cache.

At batch 1 a decode step of a small model is dominated by what runs around the matmuls: ~35 Python-dispatched
ops per layer (RMSNorm, rotary, SiLU, residual adds, KV-cache appends), each a few microseconds. Compiling the
step with a KV cache of fixed shape turns the whole forward into one graph (pointwise ops fused into C++ loops
by Inductor, the fastquant ops called directly), and the static cache removes the per-token reallocation of
a growing one. ``generate`` stays transformers' own: greedy, sampling, stopping criteria and streamers work
unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeCompileInfo:
    """What :func:`compile_for_decode` set up, and the seconds its warm-up took (compilation included)."""

    mode: str
    fullgraph: bool
    max_cache_len: int | None
    warmup_seconds: float | None


def compile_for_decode(
    model: nn.Module,
    *,
    max_cache_len: int | None = None,
    fullgraph: bool = True,
    mode: str | None = None,
) -> nn.Module:
    """Make ``model.generate`` run a compiled decode step with a static KV cache; returns the model.

    Works on any transformers causal LM whose attention supports a static cache (Llama, Mistral, Qwen2,
    SmolLM2, ...), patched by :func:`fastquant.patch` or not. Compiling takes tens of seconds on a small CPU
    (Inductor's on-disk cache makes it faster in later processes). With ``max_cache_len`` it happens here, on
    a 2-token dummy prompt, and the time is logged and kept in ``model._fastquant_decode``; without it the first
    ``generate`` compiles. A cache longer than any before it, a new batch size or a new dtype recompiles, so
    size the cache once for the longest request (prompt plus new tokens). Attention reads the whole static
    cache at every step: an oversized cache costs time.

    Args:
        max_cache_len: static cache length in tokens; None sizes it by the first call's prompt plus
            ``max_new_tokens`` (a later, longer call grows it and recompiles).
        fullgraph: require one graph for the whole decode step (an error instead of a silent graph break).
        mode: ``torch.compile`` mode; by default ``"reduce-overhead"`` on CUDA (CUDA graphs replay the step),
            ``"default"`` elsewhere.
    """
    from transformers import CompileConfig, GenerationMixin

    if not isinstance(model, GenerationMixin) or getattr(model, "generation_config", None) is None:
        raise TypeError(f"compile_for_decode needs a transformers model with generate(), got {type(model).__name__}")
    if max_cache_len is not None and max_cache_len < 2:
        raise ValueError(f"max_cache_len must be at least 2 tokens, got {max_cache_len}")
    device = next(model.parameters()).device
    if mode is None:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    config = CompileConfig(fullgraph=fullgraph, dynamic=False, mode=mode)
    # transformers compiles automatically only on accelerators; the CPU decode step gains as much (it is
    # overhead-bound at batch 1), so ask for it on every device.
    config._compile_all_devices = True
    generation = model.generation_config
    generation.cache_implementation = "static"
    generation.compile_config = config
    generation.max_cache_len = max_cache_len

    warmup_seconds = None
    if max_cache_len is not None:
        start = time.perf_counter()
        prompt = torch.zeros((1, 2), dtype=torch.long, device=device)
        # Two new tokens: the prefill runs eagerly, the second step compiles (and runs) the decode graph. Under
        # generate's own no_grad, as a user's call runs: the graph is guarded on the grad mode.
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=2,
            min_new_tokens=2,
            do_sample=False,
            pad_token_id=0,
        )
        warmup_seconds = time.perf_counter() - start
        log.info("fastquant.compile_for_decode: decode step compiled in %.1f s", warmup_seconds)
    model._fastquant_decode = DecodeCompileInfo(mode, fullgraph, max_cache_len, warmup_seconds)
    return model
