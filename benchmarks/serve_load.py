"""Load and faults for ``fastquant serve``: SmolLM2 int8 on Ray Serve, a load generator in another process.

Phases, each against a fresh local Ray Serve application on 127.0.0.1:

1. ``replicas=2``: ``--concurrency`` streaming clients send ``--requests`` completions of mixed prompt lengths and
   ``max_tokens``; reports throughput (requests/s, generated tokens/s), p50/p99 latency and time to first token,
   errors (expected 0) and the share of requests each replica served (the ``X-Fastquant-Replica`` header).
2. The same load, and once a third of it is done one replica's process is killed (``ray.kill``). The service
   must keep answering and Ray Serve must restart the replica: every request either succeeds or gets an HTTP
   error or a dropped connection (counted apart: a client retries those); none may hang (each request has a
   timeout, the whole phase a deadline). Reports whether the replica count was back to 2 at the end.
3. ``replicas=1``, the same load (what a second replica buys on this machine).
4. Plain transformers ``generate`` in a loop over the same requests, in this process (no server).

The load generator runs in a separate process (multiprocessing, spawn) with a bounded request count and a
deadline per phase, and talks to the server over loopback only. Writes ``results/serve-load-<UTC date>.{json,md}``.

Run: ``python benchmarks/serve_load.py`` (defaults: 400 requests, 16 clients; tens of minutes on 2 cores) or
``--requests 8 --concurrency 2 --phases two kill --output /tmp/smoke`` for a smoke run. Dynamic batching
(non-streaming requests only): ``--no-stream --phases two`` against ``--no-stream --max-batch-size 1 --phases two``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
PHASES = ("two", "kill", "one", "hf")


def _requests(n: int, seed: int, stream: bool) -> list[dict[str, Any]]:
    """Mixed lengths: prompts of 8 to 400 words from the embedded play, 8 to 64 new tokens, greedy."""
    from fastquant.models import read_text

    words = read_text().split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.choice((8, 32, 128, 400))
        start = rng.randrange(0, len(words) - length)
        out.append(
            {
                "prompt": " ".join(words[start : start + length]),
                "max_tokens": rng.choice((8, 16, 32, 64)),
                "stream": True,
            }
        )
    return out


async def _read_stream(resp: Any, rec: dict[str, Any], start: float) -> None:
    async for line in resp.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        if rec["ttft"] is None:
            rec["ttft"] = time.perf_counter() - start
        if json.loads(line[6:])["choices"][0]["text"]:
            rec["tokens"] += 1  # one SSE chunk per decoded piece: close to the token count


async def _client_run(url: str, key: str, requests: list[dict[str, Any]], concurrency: int, timeout: float):
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    results: list[dict[str, Any]] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            rec: dict[str, Any] = {"status": None, "ttft": None, "tokens": 0, "replica": None, "error": None}
            try:
                async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as resp:
                    rec["status"], rec["replica"] = resp.status_code, resp.headers.get("x-fastquant-replica")
                    if body["stream"]:
                        await _read_stream(resp, rec, start)
                    else:  # batched on the server; no time to first token seen from here
                        answer = json.loads(await resp.aread())
                        rec["tokens"] = answer.get("usage", {}).get("completion_tokens", 0)
            except httpx.HTTPError as exc:  # a dropped connection or a timeout: retryable, counted apart
                rec["error"] = type(exc).__name__
            rec["latency"] = time.perf_counter() - start
            rec["end"] = time.monotonic()
            results.append(rec)

    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def _load_process(url, key, requests, concurrency, timeout, out_path) -> None:
    results = asyncio.run(_client_run(url, key, requests, concurrency, timeout))
    Path(out_path).write_text(json.dumps(results))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _summary(results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r["status"] == 200 and r["error"] is None]
    replicas: dict[str, int] = {}
    for r in ok:
        replicas[r["replica"]] = replicas.get(r["replica"], 0) + 1
    return {
        "requests": len(results),
        "ok": len(ok),
        "http_errors": sorted({r["status"] for r in results if r["status"] not in (200, None)}),
        "http_error_count": sum(r["status"] not in (200, None) for r in results),
        "dropped": sum(r["error"] is not None for r in results),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "latency_p50_s": _pct([r["latency"] for r in ok], 0.5),
        "latency_p99_s": _pct([r["latency"] for r in ok], 0.99),
        "ttft_p50_s": _pct([r["ttft"] for r in ok if r["ttft"] is not None], 0.5),
        "ttft_p99_s": _pct([r["ttft"] for r in ok if r["ttft"] is not None], 0.99),
        "share_per_replica": {k: v / max(len(ok), 1) for k, v in sorted(replicas.items())},
    }


def _replicas() -> list[str]:
    """The live FastquantLM replica actors, by name (Ray's named actors: no dashboard needed)."""
    import ray

    prefix = "SERVE_REPLICA::fastquant#FastquantLM#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def _running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["fastquant"].deployments["FastquantLM"]
    return deployment.replica_states.get("RUNNING", 0)


def _serve_phase(args, folder: Path, keys_file: Path, key: str, replicas: int, requests, kill: bool) -> dict[str, Any]:
    import ray
    from ray import serve

    from fastquant.serve import ServeConfig, start

    ray.init(address="local", include_dashboard=False, num_cpus=args.cpus, _node_ip_address="127.0.0.1")
    try:
        config = ServeConfig(
            checkpoint=str(folder),
            api_keys=str(keys_file),
            replicas=replicas,
            port=args.port,
            cpus_per_replica=args.cpus / replicas,
            max_tokens_cap=64,
            requests_per_minute=1e9,
            max_ongoing_requests=args.concurrency,
            max_batch_size=args.max_batch_size,
        )
        url = start(config)
        out = Path(tempfile.mkdtemp()) / "load.json"
        ctx = mp.get_context("spawn")
        proc = ctx.Process(target=_load_process, args=(url, key, requests, args.concurrency, args.timeout, out))
        t0 = time.monotonic()
        proc.start()
        killed = None
        if kill:
            # Kill once about a third of the expected time has passed (bounded wait), while clients are busy.
            time.sleep(min(args.deadline / 3, max(5.0, len(requests) / 3 / max(args.concurrency, 1))))
            name = _replicas()[0]
            # ray.kill ends the replica's worker process at once (no graceful shutdown), like a crash would.
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            killed = {"replica": name, "at_s": time.monotonic() - t0}
        proc.join(args.deadline)
        if proc.is_alive():  # no hang: a phase past its deadline is stopped and reported
            proc.terminate()
            proc.join(10)
            raise RuntimeError(f"the load generator did not finish in {args.deadline} s")
        wall = time.monotonic() - t0
        summary = _summary(json.loads(out.read_text()), wall)
        if kill:
            deadline = time.monotonic() + 120
            while _running_replicas() < replicas and time.monotonic() < deadline:
                time.sleep(1)
            summary.update(killed=killed, replicas_alive_after=_running_replicas())
        return summary
    finally:
        serve.shutdown()
        ray.shutdown()


def _hf_phase(folder: Path, requests) -> dict[str, Any]:
    import torch

    import fastquant

    model, tokenizer = fastquant.from_pretrained(folder)
    latencies, tokens = [], 0
    t0 = time.monotonic()
    for r in requests:
        start = time.perf_counter()
        ids = tokenizer(r["prompt"], return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=r["max_tokens"], do_sample=False, pad_token_id=0)
        tokens += out.shape[1] - ids.shape[1]
        latencies.append(time.perf_counter() - start)
    wall = time.monotonic() - t0
    return {
        "requests": len(requests),
        "ok": len(requests),
        "wall_s": wall,
        "requests_per_s": len(requests) / wall,
        "tokens_per_s": tokens / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_p99_s": _pct(latencies, 0.99),
    }


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# fastquant serve load: {results['model']}, {results['settings']}",
        "",
        "| phase | ok/requests | HTTP errors | dropped | req/s | tok/s | p50 s | p99 s | TTFT p50 | TTFT p99 | share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    for name, s in results["phases"].items():
        share = ", ".join(f"{v:.0%}" for v in s.get("share_per_replica", {}).values()) or "-"
        lines.append(
            f"| {name} | {s['ok']}/{s['requests']} | {s.get('http_error_count', 0)} {s.get('http_errors', '')} | "
            f"{s.get('dropped', 0)} | {s['requests_per_s']:.2f} | {s['tokens_per_s']:.1f} | {f(s['latency_p50_s'])} | "
            f"{f(s['latency_p99_s'])} | {f(s.get('ttft_p50_s'))} | {f(s.get('ttft_p99_s'))} | {share} |"
        )
    kill = results["phases"].get("kill")
    if kill:
        lines += ["", f"kill: {kill['killed']}, replicas alive after: {kill['replicas_alive_after']}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs given to Ray (split by replicas)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--deadline", type=float, default=3600.0, help="per phase, seconds")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--checkpoint", help="a `fastquant compress` folder (default: SmolLM2 int8, made here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-stream",
        action="store_true",
        help="non-streaming requests, which the server batches (compare --max-batch-size 1 with the default)",
    )
    parser.add_argument("--max-batch-size", type=int, default=8, help="server side, non-streaming requests")
    parser.add_argument("--output", default=str(RESULTS), help="folder for the results (%(default)s)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from fastquant import cli
    from fastquant.serve import keys

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    folder = Path(args.checkpoint) if args.checkpoint else work / "smollm2-int8"
    if not args.checkpoint and cli.main(["compress", "smollm2", "--method", "int8", "-o", str(folder)]) != 0:
        return 2
    keys_file = work / "keys.json"
    key, _ = keys.add_key(keys_file, "load")
    requests = _requests(args.requests, args.seed, stream=not args.no_stream)
    results: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct int8",
        "settings": (
            f"{args.requests} requests, {args.concurrency} clients, {args.cpus} CPUs, "
            + ("non-streaming, batches up to " + str(args.max_batch_size) if args.no_stream else "streaming")
        ),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "phases": {},
    }
    for phase in args.phases:
        print(f"phase {phase} ...", flush=True)
        if phase == "hf":
            results["phases"]["hf generate loop"] = _hf_phase(folder, requests)
        else:
            replicas = 1 if phase == "one" else 2
            name = {"two": "2 replicas", "kill": "2 replicas, one killed", "one": "1 replica"}[phase]
            results["phases"][name] = _serve_phase(args, folder, keys_file, key, replicas, requests, phase == "kill")
    Path(args.output).mkdir(parents=True, exist_ok=True)
    stem = Path(args.output) / f"serve-load-{time.strftime('%Y-%m-%d', time.gmtime())}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    table = _markdown(results)
    stem.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
