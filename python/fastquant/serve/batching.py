"""One ``generate`` call for several concurrent requests (Ray Serve's ``@serve.batch`` gathers them).

At decode a CPU reads every weight once per step whatever the batch: B requests in one call share those reads,
so a replica produces more tokens per second than with one request at a time. Prompts are left-padded (the
attention mask hides the padding); each request gets its own ``max_tokens`` and end-of-sequence cut from the
batch's output. Requests with different sampling settings go in separate calls (generate takes one setting).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList


@dataclass
class Job:
    """One request: its prompt ids (1-D), how many tokens it may get, and its sampling settings."""

    ids: torch.Tensor
    max_new_tokens: int
    sampling: tuple[tuple[str, Any], ...]  # hashable: requests with equal settings share a generate call


@dataclass
class Done:
    tokens: list[int]
    first_token_at: float | None  # perf_counter when the batch's first token was ready
    batch: int  # how many requests shared the generate call
    eos: bool = False
    error: BaseException | None = field(default=None, repr=False)


class _FirstStep(LogitsProcessor):
    """A logits processor that changes nothing: generate calls it after each forward pass, so its first call
    marks the first token (the time to first token of every request in the call)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def generate_batch(model: Any, pad_id: int, eos_ids: set[int], jobs: Sequence[Job]) -> list[Done]:
    """Run ``jobs`` in as few generate calls as their sampling settings allow; a failure fails only its call."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.sampling, []).append(i)
    done: list[Done | None] = [None] * len(jobs)
    for sampling, members in groups.items():
        first = _FirstStep()
        width = max(jobs[i].ids.numel() for i in members)
        ids = torch.full((len(members), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(members), width), dtype=torch.long)
        for row, i in enumerate(members):
            n = jobs[i].ids.numel()
            ids[row, width - n :] = jobs[i].ids
            mask[row, width - n :] = 1
        try:
            with torch.inference_mode():
                out = model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=max(jobs[i].max_new_tokens for i in members),
                    pad_token_id=pad_id,
                    logits_processor=LogitsProcessorList([first]),
                    **dict(sampling),
                )
        except Exception as exc:  # reported to these requests only
            for i in members:
                done[i] = Done([], None, len(members), error=exc)
            continue
        for row, i in enumerate(members):
            tokens = out[row, width:].tolist()[: jobs[i].max_new_tokens]
            end = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
            if end is not None:
                tokens = tokens[: end + 1]
            done[i] = Done(tokens, first.at, len(members), eos=end is not None)
    return [d for d in done if d is not None]
