"""fastquant serve without Ray processes: the model slot under cancellation, cancelled rows of a batch, and what a
client gets when its replica dies (503 with Retry-After, or an error event in a started stream)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
from fastquant.app.serve.batching import Job, ModelSlot, generate_batch  # noqa: E402

GREEDY = (("do_sample", False),)


class _Gauge:
    def __init__(self) -> None:
        self.values: list[int] = []

    def __call__(self, n: int) -> None:
        self.values.append(n)


def _blocking(started: threading.Event, cancel: threading.Event, spans: list, linger: float) -> str:
    """Stands in for generate: runs until cancelled, then (like generate finishing its token) a little longer."""
    t0 = time.monotonic()
    started.set()
    assert cancel.wait(10), "never cancelled"
    time.sleep(linger)
    spans.append((t0, time.monotonic()))
    return "done"


def test_a_cancelled_generation_holds_the_model_until_its_thread_returns_and_the_gauge_ends_at_zero():
    async def scenario() -> tuple[list, _Gauge, threading.Event]:
        gauge = _Gauge()
        slot = ModelSlot(on_waiting=gauge)
        spans: list = []
        started, cancel = threading.Event(), threading.Event()
        first = asyncio.create_task(slot.run(cancel, _blocking, started, cancel, spans, 0.3))
        while not started.is_set():
            await asyncio.sleep(0.005)
        # A second request waits for the model; a third is cancelled while waiting.
        second_started, second_cancel = threading.Event(), threading.Event()
        second_cancel.set()  # runs to its end at once when it gets the model
        second = asyncio.create_task(slot.run(second_cancel, _blocking, second_started, second_cancel, spans, 0.0))
        third = asyncio.create_task(slot.run(threading.Event(), _blocking, threading.Event(), cancel, spans, 0.0))
        await asyncio.sleep(0.05)
        assert slot.waiting == 2 and gauge.values[-1] == 2
        third.cancel()
        first.cancel()  # and cancelled again while it waits for its thread: it must hold on still
        await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        with pytest.raises(asyncio.CancelledError):
            await third
        assert await second == "done"
        return spans, gauge, cancel

    spans, gauge, cancel = asyncio.run(scenario())
    assert cancel.is_set()  # cancellation reached the thread
    (a0, a1), (b0, b1) = spans
    assert b0 >= a1, "the next request ran while the cancelled one's thread still used the model"
    assert gauge.values[-1] == 0 and min(gauge.values) == 0


def test_the_gauge_is_right_after_a_failed_generation():
    def fails() -> None:
        raise RuntimeError("boom")

    async def scenario() -> ModelSlot:
        gauge = _Gauge()
        slot = ModelSlot(on_waiting=gauge)
        async with slot.hold():  # so that the failing request waits first
            task = asyncio.create_task(slot.run(threading.Event(), fails, requests=3))
            await asyncio.sleep(0.01)
            assert slot.waiting == 3 and gauge.values[-1] == 3
        with pytest.raises(RuntimeError, match="boom"):
            await task
        assert not slot.lock.locked()
        return slot

    slot = asyncio.run(scenario())
    assert slot.waiting == 0 and slot.on_waiting.values[-1] == 0


def test_a_cancelled_row_stops_and_the_others_get_their_whole_answer():
    from test_serialization import tiny_llama

    import fastquant

    model = fastquant.patch(tiny_llama(), "int8")
    g = torch.Generator().manual_seed(1)
    jobs = [Job(torch.randint(1, 512, (n,), generator=g), 12, GREEDY) for n in (3, 17)]
    alone = generate_batch(model, 0, set(), jobs[1:])[0].tokens
    jobs[0].cancel.set()
    done = generate_batch(model, 0, set(), jobs)
    assert len(done[1].tokens) == 12 and done[1].tokens == alone
    assert done[0].tokens[1:] == [0] * 11  # stopped after its first token, padded (pad id 0) from there
    everyone = threading.Event()
    everyone.set()
    stopped = generate_batch(model, 0, set(), [Job(j.ids, 12, GREEDY) for j in jobs], everyone)
    assert [len(d.tokens) for d in stopped] == [1, 1]  # generate ended after the first token


def _answer(*items, die_after: int | None = None):
    from ray.exceptions import ActorDiedError

    async def gen():
        for i, item in enumerate(items):
            if die_after is not None and i == die_after:
                raise ActorDiedError()
            yield item
        if die_after is not None and die_after >= len(items):
            raise ActorDiedError()

    return gen()


async def _body(response) -> bytes:
    if hasattr(response, "body_iterator"):
        return b"".join([c async for c in response.body_iterator])
    return bytes(response.body)


@pytest.mark.parametrize(
    "items,die_after,status,event",
    [
        ([(200, {"x-fastquant-replica": "r1"}, False), b'{"ok": 1}'], None, 200, False),
        ([(200, {}, False), b'{"ok": 1}'], 0, 503, False),  # died before answering
        ([(200, {}, False), b'{"ok": 1}'], 1, 503, False),  # died while generating a non-streamed answer
        ([(200, {}, True), b"data: a\n\n", b"data: [DONE]\n\n"], 2, 200, True),  # died mid-stream
        ([(200, {}, True), b"data: a\n\n", b"data: [DONE]\n\n"], 3, 200, False),  # died after its [DONE]
    ],
    ids=["alive", "dead before the head", "dead before the body", "dead mid-stream", "dead after the stream"],
)
def test_a_dead_replica_gives_a_retryable_error(items, die_after, status, event):
    pytest.importorskip("ray.serve")
    from fastquant.app.serve.app import RETRY_AFTER_S, forward

    calls = []

    async def scenario():
        response = await forward(_answer(*items, die_after=die_after), lambda: calls.append(1))
        return response, await _body(response)

    response, body = asyncio.run(scenario())
    assert response.status_code == status
    if status == 503:
        assert response.headers["retry-after"] == str(RETRY_AFTER_S)
        error = json.loads(body)["error"]
        assert error["type"] == "service_unavailable" and error["code"] == 503 and "retry" in error["message"]
    elif event:
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        assert events[0] == "a" and events[-1] == "[DONE]"
        assert json.loads(events[1])["error"]["type"] == "service_unavailable"
    elif items[0][2]:  # a stream the replica finished before it died: relayed whole, nothing after [DONE]
        assert body == b"data: a\n\ndata: [DONE]\n\n"
    else:
        assert body == b'{"ok": 1}' and response.headers["x-fastquant-replica"] == "r1"
    complete = die_after is None or die_after >= len(items)
    assert len(calls) == (0 if complete else 1)
