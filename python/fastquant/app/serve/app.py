"""The Ray Serve application: an OpenAI-compatible API over a fastquant checkpoint, with replicas, keys and metrics.

Ray Serve provides the replicas, the request routing between them (each request goes to the less loaded of two
replicas), replica restarts, autoscaling, and the Prometheus endpoint (Ray's metrics agent, at the metrics export
port); the same application runs on a multi-machine Ray cluster. This module is the glue: request checks, key
checks, generation with transformers, and the metrics and audit records of each request.

Two deployments: ``Ingress`` (the HTTP routes, no model, no CPU reserved) hands each request to a ``FastquantLM``
replica through a deployment handle. Ray Serve's own proxy answers a request whose replica died with a bare 500;
the handle call instead raises ``RayActorError`` in the ingress, which answers 503 with ``Retry-After`` and a JSON
error (or, once a stream has started, an error event in the stream): a client knows to retry, and Ray Serve
restarts the replica meanwhile. A client that goes away is recorded as status 499 (nginx's "client closed request").

Requests are refused in this order, each before any more work is done: no or unknown key (401), key not allowed
this model (403), key over its rate (429 with Retry-After), body too large (413), not UTF-8, not JSON, a field of
the wrong type or out of range (400, naming the field), unknown model (404), prompt over the token limit or
max_tokens over the cap (400). Any other failure is a 500 for that request alone: the replica keeps serving.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures (Request) at runtime.

import asyncio
import logging
import math
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from fastquant.app.serve.audit import AuditLog
from fastquant.app.serve.batching import Done, Job, ModelSlot, generate_batch, wait_uncancellable
from fastquant.app.serve.config import ServeConfig
from fastquant.app.serve.keys import ApiKey, KeyStore, TokenBucket
from fastquant.app.serve.schema import ChatRequest, CompletionRequest, RequestError, parse

logger = logging.getLogger("ray.serve")

APP_NAME = "fastquant"


api = FastAPI(title="fastquant", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class RateLimiter:
    """One token bucket per key, shared by every replica (a per-replica bucket would multiply each key's rate)."""

    def __init__(self) -> None:
        self.buckets = TokenBucket()

    def take(self, key_id: str, requests_per_minute: float) -> float:
        return self.buckets.take(key_id, requests_per_minute)


_LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
_TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
_RATE_BUCKETS = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]


class _Metrics:
    """Ray Serve metrics: exported by Ray's metrics agent with the replica, deployment and application as tags."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "fastquant_requests", description="Requests by route and HTTP status.", tag_keys=("path", "status")
        )
        self.latency = metrics.Histogram(
            "fastquant_request_latency_seconds",
            description="Request latency, until the last byte of the answer.",
            boundaries=_LATENCY_BUCKETS,
            tag_keys=("path",),
        )
        self.ttft = metrics.Histogram(
            "fastquant_time_to_first_token_seconds",
            description="From the request's arrival to its first generated token.",
            boundaries=_TTFT_BUCKETS,
            tag_keys=("path",),
        )
        self.tokens = metrics.Counter("fastquant_generated_tokens", description="Generated tokens.")
        self.tokens_per_s = metrics.Histogram(
            "fastquant_generation_tokens_per_second",
            description="Generated tokens per second of generation, per request.",
            boundaries=_RATE_BUCKETS,
        )
        self.queue = metrics.Gauge("fastquant_queue_depth", description="Requests waiting for this replica's model.")
        self.batch = metrics.Histogram(
            "fastquant_batch_size",
            description="Requests sharing one generate call (non-streaming requests).",
            boundaries=[1, 2, 4, 8, 16, 32],
        )


class _Generation:
    """One request's generation in a worker thread; the event loop reads its text pieces as they come."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        # Built in the event loop's thread: the streamer posts each piece to that loop.
        from transformers import AsyncTextIteratorStreamer, StoppingCriteria

        generation = self

        class Streamer(AsyncTextIteratorStreamer):
            def put(self, value: Any) -> None:
                if self.next_tokens_are_prompt:  # the first call carries the prompt
                    super().put(value)
                    return
                if generation.first_token_at is None:
                    generation.first_token_at = time.perf_counter()
                generation.tokens += value.numel()
                super().put(value)

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return generation.cancel.is_set()

        self.model = model
        self.streamer = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=None)
        self.stopping = Cancelled()
        self.cancel = threading.Event()
        self.first_token_at: float | None = None
        self.tokens = 0
        self.error: BaseException | None = None

    def run(self, input_ids: Any, options: dict[str, Any], seed: int | None) -> None:
        import torch
        from transformers import StoppingCriteriaList

        try:
            if seed is not None:
                torch.manual_seed(seed)
            with torch.inference_mode():
                self.model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    streamer=self.streamer,
                    stopping_criteria=StoppingCriteriaList([self.stopping]),
                    **options,
                )
        except BaseException as exc:  # reported to the request, never to the replica
            self.error = exc
            self.streamer.end()


class _StopText:
    """Cuts generated text at the first stop sequence, holding back a tail that could be the start of one.

    Not generate's ``stop_strings``: those also match across the end of the prompt, and OpenAI's ``stop`` applies
    to the generated text only. A match cancels the generation at its next token."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buffer += piece
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buffer, self.stopped = self.buffer[:cut], "", True
            return out
        keep = len(self.buffer) - self.hold
        out, self.buffer = self.buffer[: max(keep, 0)], self.buffer[max(keep, 0) :]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


def _prompt_text(req: Any) -> str | list[str]:
    return req.text() if isinstance(req, CompletionRequest) else [m.content for m in req.messages]


def _error(exc: RequestError) -> JSONResponse:
    headers = {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    body = {"error": {"message": exc.message, "type": exc.code, "param": exc.param}}
    return JSONResponse(body, status_code=exc.status, headers=headers)


CLIENT_CLOSED = 499  # nginx's "client closed request": the client went away before its answer was complete
RETRY_AFTER_S = 5  # about how long Ray Serve takes to route around a dead replica (or to restart it)
_REPLICA_GONE = (RayActorError,)  # ActorDiedError, ActorUnavailableError: the replica's process died or is unreachable


def _unavailable_body() -> dict[str, Any]:
    message = "the replica serving this request stopped; retry the request"
    return {"error": {"message": message, "type": "service_unavailable", "param": None, "code": 503}}


def _unavailable() -> JSONResponse:
    return JSONResponse(_unavailable_body(), status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})


async def forward(answer: Any, on_unavailable: Any = lambda: None) -> Response:
    """Relay a replica's answer to the client: ``answer`` is the async iterator of ``FastquantLM.call`` (a head
    ``(status, headers, streaming)``, then body chunks). A replica that dies before the head, or before the last
    chunk of a non-streamed answer, becomes a 503 with Retry-After; one that dies mid-stream ends the stream with
    an error event (the 200 is sent already), and one that dies after its stream's ``[DONE]`` changes nothing.
    ``on_unavailable`` is called once for each unavailable answer."""
    try:
        status, headers, streaming = await answer.__anext__()
        if not streaming:
            body = b"".join([_bytes(chunk) async for chunk in answer])
            return Response(body, status_code=status, headers=headers, media_type="application/json")
    except _REPLICA_GONE as exc:
        logger.warning("fastquant: replica gone before answering: %s", type(exc).__name__)
        on_unavailable()
        return _unavailable()

    async def rest() -> Any:
        import json

        finished = complete = False
        try:
            async for chunk in answer:
                data = _bytes(chunk)
                yield data
                complete = data.endswith(b"data: [DONE]\n\n")
            finished = True
        except _REPLICA_GONE as exc:
            finished = True
            if complete:  # gone after its last event: the answer is whole, and nothing may follow [DONE]
                logger.warning("fastquant: replica gone after a complete stream: %s", type(exc).__name__)
                return
            logger.warning("fastquant: replica gone mid-stream: %s", type(exc).__name__)
            on_unavailable()
            yield f"data: {json.dumps(_unavailable_body())}\n\ndata: [DONE]\n\n".encode()
        finally:
            cancel = getattr(answer, "cancel", None)
            if not finished and cancel is not None:  # the client went away: stop the replica's generation too
                cancel()

    return StreamingResponse(rest(), status_code=status, headers=headers, media_type="text/event-stream")


def _bytes(chunk: str | bytes) -> bytes:
    return chunk.encode() if isinstance(chunk, str) else chunk


def _parts(response: Response) -> tuple[int, dict[str, str], bytes]:
    headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
    return response.status_code, headers, bytes(response.body)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    """The HTTP routes: reads the body (up to the size limit), hands the request to a model replica through a
    handle, relays its answer. No model here, no CPU reserved: its work per request is small next to generation
    (one replica; if it died, Ray's proxy would answer 500s until Serve restarted it)."""

    def __init__(self, config: ServeConfig, model: DeploymentHandle) -> None:
        self.config = config
        self.model = model
        self.stream = model.options(stream=True)
        self.requests = metrics.Counter(
            "fastquant_requests", description="Requests by route and HTTP status.", tag_keys=("path", "status")
        )

    @api.get("/health")
    async def health(self) -> Any:
        try:
            return await self.model.health.remote()
        except _REPLICA_GONE:
            self.requests.inc(tags={"path": "/health", "status": "503"})
            return _unavailable()

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self._forward(request, "/v1/models", b"")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward(request, "/v1/completions", await self._body(request))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward(request, "/v1/chat/completions", await self._body(request))

    async def _body(self, request: Request) -> bytes | None:
        """The body, or None when it is over the limit (refused with 413 by the model replica, after the key
        checks, so that the order of refusals is the same whatever the body)."""
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return None
        chunks, size = [], 0
        async for chunk in request.stream():  # stop reading at the limit: a chunked body has no length up front
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _forward(self, request: Request, path: str, body: bytes | None) -> Response:
        answer = self.stream.call.remote(path, request.headers.get("authorization", ""), body)

        def unavailable() -> None:
            self.requests.inc(tags={"path": path, "status": "503"})

        return await forward(answer, unavailable)


@serve.deployment
class FastquantLM:
    def __init__(self, config: ServeConfig, limiter: DeploymentHandle) -> None:
        import torch

        import fastquant
        from fastquant import protect
        from fastquant.serialization import checkpoint_path

        self.config, self.limiter = config, limiter
        self.name = config.served_name
        torch.set_num_threads(max(1, int(config.cpus_per_replica)))
        self.keys = KeyStore(config.api_keys, config.requests_per_minute)
        self.audit = AuditLog(config.audit_log, prompts=config.audit_prompts)
        decryption_key = protect.read_key_file(config.key_file) if config.key_file else None
        self.model, self.tokenizer = fastquant.from_pretrained(
            config.checkpoint, trusted_keys=list(config.trusted_keys) or None, decryption_key=decryption_key
        )
        if self.tokenizer is None:
            raise ValueError(f"{config.checkpoint}: no tokenizer files next to the checkpoint; serving needs one")
        self.replica = serve.get_replica_context().replica_id.unique_id
        # Which replica answered: lets a load test measure how the requests were spread.
        self._served_by = {"X-Fastquant-Replica": self.replica}
        loaded = self.model._fastquant_checkpoint
        self.audit.load(
            checkpoint_path(config.checkpoint),
            signer=loaded["signer"],
            encrypted=loaded["encrypted"],
            replica=self.replica,
        )
        self.metrics = _Metrics()
        self.slot = ModelSlot(on_waiting=self.metrics.queue.set)
        self._gauge_task: asyncio.Task | None = None
        self._batched.set_max_batch_size(config.max_batch_size)
        self._batched.set_batch_wait_timeout_s(config.batch_wait_s)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos) if isinstance(eos, list) else {eos}

    # ------------------------------------------------------------------------------------------ entry points
    async def health(self) -> dict[str, str]:
        return {"status": "ok", "model": self.name, "replica": self.replica}

    async def _report_queue(self) -> None:
        # Ray's metrics agent drops a gauge that is not recorded again within a few report intervals: the queue
        # depth is recorded every second, not only when it changes, so an idle replica keeps showing its 0.
        while True:
            self.metrics.queue.set(self.slot.waiting)
            await asyncio.sleep(1.0)

    async def call(self, path: str, authorization: str, body: bytes | None) -> Any:
        """One request from the ingress: yields ``(status, headers, streaming)``, then the body in chunks."""
        if self._gauge_task is None:  # started here: the replica's event loop runs requests, not __init__
            self._gauge_task = asyncio.get_running_loop().create_task(self._report_queue())
        if path == "/v1/models":
            response: Response = await self._models(authorization)
        else:
            response = await self._serve(authorization, body, path)
        if isinstance(response, StreamingResponse):
            # The head waits for the stream's first event (its turn at the model has come): a replica that dies
            # while the request waits gives it a plain 503, not a 200 followed by an error event.
            chunks = response.body_iterator
            first = await anext(chunks, None)
            yield response.status_code, self._served_by, True
            if first is not None:
                yield first
            async for chunk in chunks:
                yield chunk
        else:
            status, headers, content = _parts(response)
            yield status, headers, False
            yield content

    async def _models(self, authorization: str) -> JSONResponse:
        try:
            await self._authorize(authorization)
        except RequestError as exc:
            self.metrics.requests.inc(tags={"path": "/v1/models", "status": str(exc.status)})
            return _error(exc)
        self.metrics.requests.inc(tags={"path": "/v1/models", "status": "200"})
        model = {"id": self.name, "object": "model", "created": 0, "owned_by": "fastquant"}
        return JSONResponse({"object": "list", "data": [model]})

    # ------------------------------------------------------------------------------------------ checks
    async def _authorize(self, header: str) -> ApiKey:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestError(401, "missing API key: send Authorization: Bearer KEY", code="invalid_api_key")
        key = self.keys.check(token.strip())
        if key is None:
            raise RequestError(401, "invalid or revoked API key", code="invalid_api_key")
        if not key.allows(self.name):
            raise RequestError(403, f"this API key is not allowed the model {self.name!r}", code="permission_denied")
        if key.requests_per_minute is not None:
            wait = await self.limiter.take.remote(key.id, key.requests_per_minute)
            if wait > 0:
                raise RequestError(
                    429,
                    f"rate limit of {key.requests_per_minute:g} requests/minute",
                    code="rate_limit",
                    retry_after=math.ceil(wait),
                )
        return key

    def _prompt_ids(self, req: CompletionRequest | ChatRequest) -> Any:
        if isinstance(req, ChatRequest):
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError(400, f"the model {self.name!r} has no chat template: use /v1/completions")
            messages = [m.model_dump() for m in req.messages]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = self.tokenizer(req.text(), return_tensors="pt").input_ids
        if ids.shape[1] > self.config.max_prompt_tokens:
            raise RequestError(
                400,
                f"the prompt has {ids.shape[1]} tokens, over the limit of {self.config.max_prompt_tokens}",
                "prompt",
            )
        if ids.shape[1] == 0:
            raise RequestError(400, "the prompt is empty", "prompt")
        return ids

    def _options(self, req: CompletionRequest | ChatRequest) -> dict[str, Any]:
        max_tokens = req.max_tokens if req.max_tokens is not None else self.config.default_max_tokens
        if max_tokens > self.config.max_tokens_cap:
            raise RequestError(
                400, f"max_tokens {max_tokens} is over the cap of {self.config.max_tokens_cap}", "max_tokens"
            )
        options: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": self.tokenizer.eos_token_id}
        if req.temperature == 0:
            options["do_sample"] = False
        else:
            options.update(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=0)
        return options

    # ------------------------------------------------------------------------------------------ serving
    async def _serve(self, authorization: str, body: bytes | None, path: str) -> Any:
        start = time.perf_counter()
        key: ApiKey | None = None
        try:
            key = await self._authorize(authorization)
            if body is None:
                limit = self.config.max_body_bytes
                raise RequestError(413, f"request body over {limit} bytes", code="request_too_large")
            schema = ChatRequest if path == "/v1/chat/completions" else CompletionRequest
            req = parse(schema, body)
            if req.model is not None and req.model != self.name:
                raise RequestError(404, f"the model {req.model!r} is not served here (this is {self.name!r})", "model")
            ids, options = self._prompt_ids(req), self._options(req)
        except RequestError as exc:
            self._record(path, exc.status, start, key)
            return _error(exc)
        except asyncio.CancelledError:  # the client went away during the checks (the rate limiter's call)
            self._record(path, CLIENT_CLOSED, start, key)
            raise
        except Exception:
            logger.exception("fastquant: request checks failed")
            self._record(path, 500, start, key)
            return _error(RequestError(500, "internal error", code="server_error"))
        if not req.stream and req.seed is None:  # a seed needs the global RNG to itself: not in a shared call
            return await self._complete_batched(req, ids, options, path, start, key)
        stream = self._generate(req, ids, options, path, start, key)
        if req.stream:
            return StreamingResponse(stream, media_type="text/event-stream", headers=self._served_by)
        pieces, finish, usage, failed = [], "length", {}, False
        async for event in stream:
            kind, value = event
            if kind == "text":
                pieces.append(value)
            elif kind == "end":
                finish, usage = value
            else:
                failed = True
        if failed:
            return _error(RequestError(500, "generation failed", code="server_error"))
        return JSONResponse(self._answer(req, path, "".join(pieces), finish, usage), headers=self._served_by)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # both set again from the config in __init__
    async def _batched(self, jobs: list[Job]) -> list[Done]:
        self.metrics.batch.observe(len(jobs))
        cancel = threading.Event()
        return await self.slot.run(
            cancel, generate_batch, self.model, self.pad_id, self.eos_ids, jobs, cancel, requests=len(jobs)
        )

    async def _complete_batched(
        self, req: Any, ids: Any, options: dict[str, Any], path: str, start: float, key: ApiKey
    ) -> JSONResponse:
        sampling = tuple(sorted((k, v) for k, v in options.items() if k not in ("max_new_tokens", "pad_token_id")))
        done: Done | None = None
        status, text = 500, ""
        job = Job(ids[0], options["max_new_tokens"], sampling)
        try:
            try:
                done = await self._batched(job)
            except asyncio.CancelledError:  # the client went away: its row of the batch stops at the next token
                job.cancel.set()
                status = CLIENT_CLOSED
                raise
            if done.error is not None:
                logger.error("fastquant: generation failed: %r", done.error)
                return _error(RequestError(500, "generation failed", code="server_error"))
            stop = _StopText(req.stops())
            text = stop.feed(self.tokenizer.decode(done.tokens, skip_special_tokens=True)) + stop.flush()
            finish = "stop" if stop.stopped or done.eos else "length"
            prompt_tokens = int(ids.shape[1])
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(done.tokens),
                "total_tokens": prompt_tokens + len(done.tokens),
            }
            status = 200
            return JSONResponse(self._answer(req, path, text, finish, usage), headers=self._served_by)
        finally:
            first = done.first_token_at if done is not None else None
            tokens = len(done.tokens) if done is not None else 0
            batch = done.batch if done is not None else None
            self._finish(path, status, start, key, req, ids, first, tokens, text, batch=batch)

    def _finish(
        self,
        path: str,
        status: int,
        start: float,
        key: ApiKey,
        req: Any,
        ids: Any,
        first: float | None,
        tokens: int,
        output: str,
        **fields: Any,
    ) -> None:
        """A generation's metrics and audit record, whichever way it ran and however it ended."""
        self._observe(path, start, first, tokens)
        self._record(
            path,
            status,
            start,
            key,
            prompt_tokens=int(ids.shape[1]),
            completion_tokens=tokens,
            prompt=_prompt_text(req),
            output=output,
            **fields,
        )

    def _observe(self, path: str, start: float, first_token_at: float | None, tokens: int) -> None:
        if first_token_at is not None:
            self.metrics.ttft.observe(first_token_at - start, tags={"path": path})
            elapsed = time.perf_counter() - first_token_at
            if tokens > 1 and elapsed > 0:
                self.metrics.tokens_per_s.observe((tokens - 1) / elapsed)
        if tokens:
            self.metrics.tokens.inc(tokens)

    def _answer(self, req: Any, path: str, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        if path == "/v1/chat/completions":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            kind, prefix = "chat.completion", "chatcmpl"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            kind, prefix = "text_completion", "cmpl"
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.name,
            "choices": [choice],
            "usage": usage,
        }

    async def _generate(self, req: Any, ids: Any, options: dict[str, Any], path: str, start: float, key: ApiKey):
        """Yields ("text", piece)... then ("end", (finish_reason, usage)) or ("error", None); as SSE when streaming."""
        import json

        loop = asyncio.get_running_loop()
        generation = _Generation(self.model, self.tokenizer)
        stop = _StopText(req.stops())
        chat = path == "/v1/chat/completions"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        pieces: list[str] = []
        status = 500

        def sse(delta: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                content = {} if delta is None else {"content": delta}
                choice = {"index": 0, "delta": {"role": "assistant", **content} if role else content}
                choice["finish_reason"] = finish
                kind = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
                kind = "text_completion"
            chunk = {"id": rid, "object": kind, "created": int(time.time()), "model": self.name, "choices": [choice]}
            return f"data: {json.dumps(chunk)}\n\n"

        def emit(text: str):
            pieces.append(text)
            return sse(text, None) if req.stream else ("text", text)

        try:
            async with self.slot.hold():
                if chat and req.stream:
                    yield sse("", None, role=True)
                worker = loop.run_in_executor(None, generation.run, ids, options, req.seed)
                try:
                    async for piece in generation.streamer:
                        out = stop.feed(piece)
                        if out:
                            yield emit(out)
                        if stop.stopped:
                            generation.cancel.set()
                finally:
                    # A client that went away stops its generation at the next token, and the model is only
                    # handed to the next request once this one's thread is done with it (however often the
                    # wait itself is cancelled).
                    generation.cancel.set()
                    await wait_uncancellable(worker)
                tail = stop.flush()
                if tail:
                    yield emit(tail)
            if generation.error is not None:
                logger.error("fastquant: generation failed: %r", generation.error)
                if req.stream:  # the 200 is sent already: say it in the stream, as OpenAI's API does
                    error = {"error": {"message": "generation failed", "type": "server_error", "param": None}}
                    yield f"data: {json.dumps(error)}\n\n"
                    yield "data: [DONE]\n\n"
                else:
                    yield ("error", None)
                return
            eos = generation.tokens < options["max_new_tokens"]
            finish = "stop" if stop.stopped or eos else "length"
            prompt_tokens = int(ids.shape[1])
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": generation.tokens,
                "total_tokens": prompt_tokens + generation.tokens,
            }
            status = 200
            if req.stream:
                yield sse(None, finish)
                yield "data: [DONE]\n\n"
            else:
                yield ("end", (finish, usage))
        except (asyncio.CancelledError, GeneratorExit):  # the client went away (cancelled, or the stream closed)
            status = CLIENT_CLOSED
            raise
        finally:
            output = "".join(pieces)
            self._finish(path, status, start, key, req, ids, generation.first_token_at, generation.tokens, output)

    def _record(self, path: str, status: int, start: float, key: ApiKey | None, **fields: Any) -> None:
        latency = time.perf_counter() - start
        self.metrics.requests.inc(tags={"path": path, "status": str(status)})
        self.metrics.latency.observe(latency, tags={"path": path})
        self.audit.request(
            key_id=key.id if key else None,
            model=self.name,
            path=path,
            status=status,
            latency_s=round(latency, 4),
            replica=self.replica,
            prompt=fields.pop("prompt", None),
            output=fields.pop("output", None),
            **fields,
        )


def build_app(config: ServeConfig) -> Any:
    """The Ray Serve application (for ``serve.run`` or a Serve config file)."""
    deployment = FastquantLM.options(
        num_replicas=config.replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.cpus_per_replica},
    )
    # The ingress takes every request the model replicas could hold, and more: Serve queues them at the handle.
    ingress = Ingress.options(max_ongoing_requests=max(1000, 2 * config.replicas * config.max_ongoing_requests))
    return ingress.bind(config, deployment.bind(config, RateLimiter.bind()))


def _check_before_deploying(config: ServeConfig) -> None:
    """What would make every replica fail as it starts, said once, here, before Ray starts: Serve would otherwise
    retry the replicas and report a failed deployment. Reads headers only (signature, key id, sizes)."""
    from fastquant import protect
    from fastquant.serialization import FastquantFormatError, checkpoint_path, read_manifest

    KeyStore(config.api_keys)
    checkpoint = checkpoint_path(config.checkpoint)
    key = protect.read_key_file(config.key_file) if config.key_file else None
    try:
        protect.check_before_loading(
            checkpoint, read_manifest(checkpoint), trusted_keys=list(config.trusted_keys) or None, decryption_key=key
        )
    except protect.ProtectionError as exc:
        raise FastquantFormatError(str(exc)) from exc


def start(config: ServeConfig, *, address: str | None = None) -> str:
    """Start serving (the Python entry point of ``fastquant serve``); returns the base URL.

    Joins the Ray cluster at ``address`` (e.g. "auto" after ``ray start --head``), or starts a local one whose
    Prometheus endpoint is ``http://HOST:METRICS_PORT/metrics``. Stop with ``ray.serve.shutdown()``.
    """
    import ray

    _check_before_deploying(config)
    if not ray.is_initialized():
        if address is not None:
            ray.init(address=address)
        else:
            ray.init(address="local", include_dashboard=False, _metrics_export_port=config.metrics_port)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    return f"http://{config.host}:{config.port}"
