"""One ``generate`` call for several concurrent requests (Ray Serve's ``@serve.batch`` gathers them).

At decode a CPU reads every weight once per step whatever the batch: B requests in one call share those reads,
so a replica produces more tokens per second than with one request at a time. Prompts are left-padded (the
attention mask hides the padding); each request gets its own ``max_tokens`` and end-of-sequence cut from the
batch's output. Requests with different sampling settings go in separate calls (generate takes one setting).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

T = TypeVar("T")


async def wait_uncancellable(future: asyncio.Future) -> None:
    """Wait until ``future`` is done, whatever cancellations arrive meanwhile (the caller re-raises its own).

    A thread running ``generate`` cannot be stopped from the event loop: until it returns it still uses the model,
    so whoever holds the model must keep holding it that long."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([future])


class ModelSlot:
    """The model, one generation at a time (generation is CPU-bound and uses every thread of the replica), and the
    number of requests waiting for it, reported to ``on_waiting`` (the queue-depth gauge) on every change.

    Every path out -- success, error, cancellation while waiting or while generating -- leaves the count right, and
    the model is handed on only once the thread that generates with it has returned."""

    def __init__(self, on_waiting: Callable[[int], None] = lambda n: None) -> None:
        self.lock = asyncio.Lock()
        self.waiting = 0
        self.on_waiting = on_waiting

    def _wait(self, n: int) -> None:
        self.waiting += n
        self.on_waiting(self.waiting)

    @contextlib.asynccontextmanager
    async def hold(self, requests: int = 1) -> AsyncIterator[None]:
        self._wait(requests)
        try:
            await self.lock.acquire()
        finally:
            self._wait(-requests)
        try:
            yield
        finally:
            self.lock.release()

    async def run(self, cancel: threading.Event, fn: Callable[..., T], *args: Any, requests: int = 1) -> T:
        """``fn(*args)`` in a worker thread with the model held. Cancelled, it sets ``cancel`` (``fn`` must stop
        soon after: generate checks it at each token) and still holds the model until ``fn`` has returned."""
        async with self.hold(requests):
            future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                cancel.set()
                await wait_uncancellable(future)
                raise


@dataclass
class Job:
    """One request: its prompt ids (1-D), how many tokens it may get, and its sampling settings."""

    ids: torch.Tensor
    max_new_tokens: int
    sampling: tuple[tuple[str, Any], ...]  # hashable: requests with equal settings share a generate call
    # Set when the request's client has gone: its row stops at the next token (the others go on).
    cancel: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)


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


class _Cancelled(StoppingCriteria):
    """Stops the rows whose request was cancelled (generate ends once every row is done)."""

    def __init__(self, events: list[threading.Event], stop_all: threading.Event | None) -> None:
        self.events, self.stop_all = events, stop_all

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        everyone = self.stop_all is not None and self.stop_all.is_set()
        return torch.tensor([everyone or e.is_set() for e in self.events], dtype=torch.bool)


def generate_batch(
    model: Any, pad_id: int, eos_ids: set[int], jobs: Sequence[Job], cancel: threading.Event | None = None
) -> list[Done]:
    """Run ``jobs`` in as few generate calls as their sampling settings allow; a failure fails only its call.

    ``cancel`` stops every call at its next token (the request holding the model was cancelled); a job's own
    ``cancel`` stops its row only (its answer is no longer wanted)."""
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
                    stopping_criteria=StoppingCriteriaList([_Cancelled([jobs[i].cancel for i in members], cancel)]),
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
