"""Measure what compression costs and buys on a real model: quality, speed, size.

Every compression method the CLI knows lives in :data:`METHODS`; ``fastquant demo``/``eval``/``compress``
iterate over or look up that registry, so a new method (sparse, int8+sparse) is one entry here, and one
name in :data:`fastquant.choices.CLI_METHODS` (which the CLI lists without importing torch).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastquant.choices import CALIBRATED_METHODS, DEFAULT_PRUNING
from fastquant.configs import Int4, Int8
from fastquant.patching import patch
from fastquant.progress import progress_bar


@dataclass
class MethodOptions:
    """What the command line can say about a method; each method reads the fields it needs."""

    group_size: int | None = None  # None: per-channel for int8, 32 for int4
    symmetric: bool = True  # int4 only: False adds a per-group offset
    int8_activations: bool = False  # int8 and int4: layers round their input to int8 per 32 columns
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    pruning: str = DEFAULT_PRUNING
    # Model inputs for Wanda/SparseGPT, made on first use (tokenizing the calibration text costs a little).
    calibration: Callable[[], list] | None = None
    progress: bool | None = None  # None: bars on a terminal only


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    # apply(float model, options) compresses the model in place and returns it
    apply: Callable[[nn.Module, MethodOptions], nn.Module]


def _sparse(method: str) -> Callable[[nn.Module, MethodOptions], nn.Module]:
    def apply(model: nn.Module, options: MethodOptions) -> nn.Module:
        _symmetric_only(options, method)
        if options.int8_activations:
            raise ValueError(f"method {method!r}: --int8-activations applies to the int8 and int4 methods only")
        needs_data = options.pruning in CALIBRATED_METHODS
        if needs_data and options.calibration is None:
            raise ValueError(f"pruning={options.pruning!r} needs calibration data (a tokenizer and a text)")
        return patch(
            model,
            method,
            group_size=options.group_size,
            sparsity=options.sparsity,
            pattern=options.pattern,
            pruning=options.pruning,
            calibration=options.calibration() if needs_data else None,
            progress=options.progress,
        )

    return apply


def _symmetric_only(options: MethodOptions, name: str) -> None:
    if not options.symmetric:
        raise ValueError(f"method {name!r}: --asymmetric applies to the int4 methods only")


def _int8(name: str, **kwargs) -> Callable[[nn.Module, MethodOptions], nn.Module]:
    def apply(model: nn.Module, options: MethodOptions) -> nn.Module:
        _symmetric_only(options, name)
        calibrated = name.endswith("-gptq")
        config = Int8.from_method(options.group_size, options.calibration() if calibrated else None)
        config = dataclasses.replace(config, int8_activations=options.int8_activations)
        return patch(model, config, progress=options.progress if calibrated else None, **kwargs)

    return apply


def _int4(calibrated: bool) -> Callable[[nn.Module, MethodOptions], nn.Module]:
    def apply(model: nn.Module, options: MethodOptions) -> nn.Module:
        config = Int4.from_method(options.group_size, options.symmetric, options.calibration() if calibrated else None)
        config = dataclasses.replace(config, int8_activations=options.int8_activations)
        return patch(model, config, progress=options.progress if calibrated else None)

    return apply


METHODS: dict[str, Method] = {
    "int8": Method(
        "int8",
        "int8 weight-only, per-channel (per-group with --group-size); tied lm_head left in float",
        _int8("int8"),
    ),
    "int8+lm_head": Method(
        "int8+lm_head",
        "int8 as above, plus a separate int8 copy of the tied lm_head (the embedding keeps its float weight)",
        _int8("int8+lm_head", skip=(), quantize_tied=True),
    ),
    "int4": Method(
        "int4",
        "int4 weight-only, fp16 scale per group of 32 (--group-size), symmetric (--asymmetric: plus an offset), "
        "round to nearest; lm_head in float",
        _int4(calibrated=False),
    ),
    "int8-gptq": Method(
        "int8-gptq",
        "int8 per-channel with GPTQ rounding (errors compensated on Hamlet calibration text); lm_head in float",
        _int8("int8-gptq"),
    ),
    "int4-gptq": Method(
        "int4-gptq",
        "int4 as above with GPTQ rounding (errors compensated on Hamlet calibration text); lm_head in float",
        _int4(calibrated=True),
    ),
    "sparse": Method(
        "sparse",
        "pruned (default: SparseGPT, 50% unstructured, calibrated on Hamlet), float values in the bitmap16 "
        "sparse format where its kernel beats dense",
        _sparse("sparse"),
    ),
    "int8+sparse": Method(
        "int8+sparse",
        "pruned as above and int8-quantized (SparseGPT compensates the rounding too), sparse int8 kernel where "
        "it beats dense int8",
        _sparse("int8+sparse"),
    ),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {sorted(METHODS)}")
    return METHODS[name]


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, each storage counted once (tied weights are one tensor)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    window: int = 512,
    stride: int = 256,
    progress: Callable | None = None,
) -> float:
    """Sliding-window perplexity: each window of ``window`` tokens scores only the tokens no earlier window
    scored, so each token counts once and (after the first window) sees ``window - stride`` tokens or more
    of context."""
    ids = input_ids.reshape(1, -1)
    n = ids.shape[1]
    nll_sum, count, prev_end = 0.0, 0, 0
    starts = list(range(0, max(n - window, 0) + 1, stride))
    if starts[-1] + window < n:
        starts.append(n - window)
    for begin in starts:
        end = min(begin + window, n)
        chunk = ids[:, begin:end]
        logits = model(chunk).logits[0, :-1].float()
        targets = chunk[0, 1:]
        first_new = max(prev_end - begin - 1, 0)  # predictions of tokens already scored by an earlier window
        losses = torch.nn.functional.cross_entropy(logits[first_new:], targets[first_new:], reduction="none")
        nll_sum += losses.double().sum().item()
        count += losses.numel()
        prev_end = end
        if progress is not None:
            progress()
    return math.exp(nll_sum / count)


def perplexity_steps(n_tokens: int, window: int = 512, stride: int = 256) -> int:
    starts = list(range(0, max(n_tokens - window, 0) + 1, stride))
    return len(starts) + (1 if starts[-1] + window < n_tokens else 0)


def sentences(text: str, limit: int = 256, min_chars: int = 30) -> list[str]:
    """Sentences of the play's dialogue (speaker names and stage directions dropped), in order."""
    start = text.find("\nACT")  # skip the title page and the list of characters
    body = re.sub(r"\[[^\]]*\]", " ", text[start if start >= 0 else 0 :])  # stage directions, even multi-line
    lines = [ln.strip() for ln in body.splitlines()]
    speech = " ".join(ln for ln in lines if ln and not ln.isupper() and not ln.startswith(("ACT", "SCENE")))
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+", speech)]
    return [s for s in parts if len(s) >= min_chars][:limit]


@torch.inference_mode()
def sentence_embeddings(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled, L2-normalized token embeddings (the sentence-transformers recipe for MiniLM)."""
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def embedding_cosine(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity(reference, other, dim=-1)
    return {"mean": cos.mean().item(), "min": cos.min().item()}


class _StepClock:
    """A logits processor that records when each generated token's logits are ready: the first stamp ends
    prefill, the gaps between the others are pure decode steps."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def decode_speed(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 64) -> dict[str, float]:
    """Greedy batch-1 generation with HF ``generate``, as users call it (under generate's own no_grad): decode
    tokens/s over ``new_tokens`` steps."""
    from transformers import LogitsProcessorList

    prompt_ids = prompt_ids.reshape(1, -1)
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt_ids))
    # eos_token_id=None: exactly new_tokens steps (min_new_tokens would add a logits processor that scans the
    # whole vocabulary at every step, which generation without it does not pay).
    kwargs["eos_token_id"] = None
    model.generate(prompt_ids, max_new_tokens=4, **kwargs)  # warm-up: allocations, caches
    clock = _StepClock()
    start = time.perf_counter()
    out = model.generate(
        prompt_ids,
        max_new_tokens=new_tokens,
        logits_processor=LogitsProcessorList([clock]),
        **kwargs,
    )
    end = time.perf_counter()
    steps = len(clock.stamps) - 1
    decode_s = clock.stamps[-1] - clock.stamps[0]
    return {
        "decode_tokens_per_s": steps / decode_s,
        "generate_tokens_per_s": (out.shape[1] - prompt_ids.shape[1]) / (end - start),
        "decode_ms_per_token": 1000 * decode_s / steps,
        "tokens": out[0, prompt_ids.shape[1] :].tolist(),
    }


@torch.inference_mode()
def prefill_speed(model: nn.Module, input_ids: torch.Tensor, repeats: int = 2) -> dict[str, float]:
    """One forward pass over ``input_ids`` (batch 1): best of ``repeats`` after a warm-up."""
    ids = input_ids.reshape(1, -1)
    model(ids[:, :16])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids)
        best = min(best, time.perf_counter() - start)
    return {"prefill_tokens_per_s": ids.shape[1] / best, "prefill_tokens": ids.shape[1]}


@dataclass
class SpeedRounds:
    """One model's decode and prefill speed, one measurement per round."""

    decode_tokens_per_s: list[float] = field(default_factory=list)
    prefill_tokens_per_s: list[float] = field(default_factory=list)
    greedy_tokens: list[int] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(getattr(self, key))


def cpu_model() -> str:
    """The processor's name (Linux), for results that say which machine made them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    """The 1-minute load average (runnable threads, ours included), or NaN where the OS has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def interleaved_speed(
    models: dict[str, nn.Module],
    prompt_ids: torch.Tensor,
    prefill_ids: torch.Tensor,
    decode_tokens: int,
    rounds: int,
    progress: bool | None = None,
    label: str = "speed",
) -> dict[str, SpeedRounds]:
    """Decode and prefill speed of several models in alternating rounds: each round measures every model once,
    in an order that reverses from one round to the next, so a clock change or a neighbour's burst of work
    falls on all of them alike and the per-round ratios between models stay fair."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    out = {name: SpeedRounds() for name in models}
    names = list(models)
    with progress_bar(total=rounds * len(names), desc=label, progress=progress, leave=False) as bar:
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                decode = decode_speed(models[name], prompt_ids, decode_tokens)
                prefill = prefill_speed(models[name], prefill_ids, repeats=1)
                out[name].decode_tokens_per_s.append(decode["decode_tokens_per_s"])
                out[name].prefill_tokens_per_s.append(prefill["prefill_tokens_per_s"])
                out[name].greedy_tokens = decode["tokens"]
                bar.update()
    return out
