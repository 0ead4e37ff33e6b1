"""Load and faults for ``fastquant serve``: SmolLM2 int8 on Ray Serve, a load generator in another process.

Phases, each against a fresh local Ray Serve application on 127.0.0.1 (one torch thread per replica):

- ``two``: 2 replicas, ``--concurrency`` streaming clients send ``--requests`` completions of mixed prompt lengths and
  ``max_tokens``: throughput (requests/s, generated tokens/s), p50/p99 latency and time to first token, errors
  (expected 0) and the share of requests each replica served (the ``X-Fastquant-Replica`` header).
- ``kill``: the same load; about a third of the way through (by the ``two`` phase's time) one replica's worker
  process is killed with SIGKILL (its PID from Ray's actor table), as a crash or the OOM killer would. The service
  must keep answering and Ray Serve must restart the replica; every request either succeeds or gets a clear
  retryable error (503 with Retry-After and a JSON error, or an error event in a started stream), counted apart
  from anything else (a dropped connection, a bare 500); none may hang (each request has a timeout, the phase a
  deadline). Reports when the replica was running again.
- ``one``: 1 replica, the same streaming load (what a second replica buys).
- ``batch`` / ``nobatch``: 2 replicas, the same requests non-streaming, which the server batches (up to
  ``--max-batch-size`` per generate call) or not (batch size 1).
- ``hf``: plain transformers ``generate`` in a loop over the same requests, one thread, no server.

The load generator is a separate process (multiprocessing, spawn) with a bounded request count and a deadline per
phase, talking to the server over loopback only. At the end of each served phase the Prometheus endpoint (Ray's
metrics export port) is scraped and its request counts are set against the client's. The load average is recorded
around each phase, with the CPU ISA (``python -m fastquant.info``) and the threads.
Writes ``results/serve-load-<UTC date>.{json,md}``.

Run: ``python benchmarks/serve_load.py --requests 400`` (the issue's size: hours on 2 shared cores) or
``--requests 6 --concurrency 2 --phases two kill --output /tmp/smoke`` for a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
PHASES = ("two", "kill", "one", "batch", "nobatch", "hf")
NAMES = {
    "two": "2 replicas",
    "kill": "2 replicas, one killed",
    "one": "1 replica",
    "batch": "2 replicas, non-streaming, batching on",
    "nobatch": "2 replicas, non-streaming, batching off",
    "hf": "HF generate loop",
}
DEPLOYMENT = "FastquantLM"
_REPORT_INTERVAL = "RAY_metrics_report_interval_ms"  # Ray's spelling: how often workers report metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def _requests(n: int, seed: int) -> list[dict[str, Any]]:
    """Mixed lengths: prompts of 8 to 400 words from the embedded play, 8 to 64 new tokens, greedy."""
    from fastquant.app.models import read_text

    words = read_text().split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.choice((8, 32, 128, 400))
        start = rng.randrange(0, len(words) - length)
        prompt = " ".join(words[start : start + length])
        out.append({"prompt": prompt, "max_tokens": rng.choice((8, 16, 32, 64)), "temperature": 0})
    return out


# ---------------------------------------------------------------------------------------------- load generator
async def _read_stream(resp: Any, rec: dict[str, Any], start: float) -> None:
    async for line in resp.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:  # the replica stopped mid-stream: the server says so in the stream
            rec["error"] = f"stream:{event['error'].get('type')}"
            continue
        if rec["ttft"] is None:
            rec["ttft"] = time.perf_counter() - start
        if event["choices"][0]["text"]:
            rec["tokens"] += 1  # one SSE chunk per decoded piece: close to the token count


async def _client_run(url: str, key: str, requests: list[dict[str, Any]], concurrency: int, timeout: float, stream):
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait({**r, "stream": stream})
    results: list[dict[str, Any]] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            rec: dict[str, Any] = {"status": None, "ttft": None, "tokens": 0, "replica": None, "error": None}
            rec["start"] = time.monotonic()
            try:
                async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as resp:
                    rec["status"], rec["replica"] = resp.status_code, resp.headers.get("x-fastquant-replica")
                    rec["retry_after"] = resp.headers.get("retry-after")
                    if resp.status_code != 200:
                        raw = await resp.aread()
                        try:
                            rec["error"] = f"http:{json.loads(raw)['error']['type']}"
                        except (ValueError, KeyError, TypeError):
                            rec["error"] = f"http:not-json:{raw[:60]!r}"
                    elif body["stream"]:
                        await _read_stream(resp, rec, start)
                    else:  # batched on the server; no time to first token seen from here
                        answer = json.loads(await resp.aread())
                        rec["tokens"] = answer.get("usage", {}).get("completion_tokens", 0)
            except httpx.HTTPError as exc:  # a dropped connection or a timeout
                rec["error"] = f"client:{type(exc).__name__}"
            rec["latency"] = time.perf_counter() - start
            rec["end"] = time.monotonic()
            results.append(rec)

    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def _load_process(url, key, requests, concurrency, timeout, stream, out_path) -> None:
    results = asyncio.run(_client_run(url, key, requests, concurrency, timeout, stream))
    Path(out_path).write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------------- summaries
def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _retryable(r: dict[str, Any]) -> bool:
    """A clear retryable error: 503 with Retry-After and a JSON error body, or the error event in a stream."""
    if r["status"] == 503:
        return r.get("retry_after") is not None and r["error"] == "http:service_unavailable"
    return r["status"] == 200 and r["error"] == "stream:service_unavailable"


def _summary(results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r["status"] == 200 and r["error"] is None]
    retryable = [r for r in results if _retryable(r)]
    other = [r for r in results if r not in ok and r not in retryable]
    replicas: dict[str, int] = {}
    for r in ok:
        replicas[r["replica"]] = replicas.get(r["replica"], 0) + 1
    kinds: dict[str, int] = {}
    for r in retryable + other:
        kind = f"{r['status']} {r['error']}"
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "requests": len(results),
        "ok": len(ok),
        "retryable_errors": len(retryable),
        "other_errors": len(other),
        "error_kinds": kinds,
        "wall_s": round(wall, 2),
        "requests_per_s": len(ok) / wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "latency_p50_s": _pct([r["latency"] for r in ok], 0.5),
        "latency_p99_s": _pct([r["latency"] for r in ok], 0.99),
        "ttft_p50_s": _pct([r["ttft"] for r in ok if r["ttft"] is not None], 0.5),
        "ttft_p99_s": _pct([r["ttft"] for r in ok if r["ttft"] is not None], 0.99),
        "share_per_replica": {k: round(v / max(len(ok), 1), 3) for k, v in sorted(replicas.items())},
        "max_latency_s": max((r["latency"] for r in results), default=None),
    }


# ---------------------------------------------------------------------------------------------- Ray side
def _replica_pids() -> dict[str, int]:
    """The live model replicas' worker processes: actor name -> PID, from Ray's actor table."""
    try:  # the state API (needs Ray's dashboard process)
        from ray.util.state import list_actors

        actors = list_actors(detail=True, filters=[("state", "=", "ALIVE")], timeout=10)
        found = {a.name: a.pid for a in actors if a.name and f"#{DEPLOYMENT}#" in a.name}
    except Exception:  # no dashboard here: the same table, read from Ray's control store (GCS)
        import ray

        table = ray._private.state.actors()  # noqa: SLF001
        found = {
            a["Name"]: a["Pid"] for a in table.values() if a["State"] == "ALIVE" and f"#{DEPLOYMENT}#" in a["Name"]
        }
    return found


def _running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["fastquant"].deployments[DEPLOYMENT]
    return deployment.replica_states.get("RUNNING", 0)


def _scrape(url: str) -> dict[str, Any]:
    """The fastquant request counters by deployment and status, generated tokens, and the batch-size and time to
    first token histograms as bucket counts (Ray's exported ``_sum`` is made of bucket midpoints: not a mean)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    counts: dict[str, float] = {}
    buckets: dict[str, dict[str, float]] = {"batch_size": {}, "time_to_first_token_seconds": {}}
    tokens = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "ray_fastquant_requests_total" and s.labels.get("path") == "/v1/completions":
                k = f"{s.labels.get('deployment')} {s.labels.get('status')}"
                counts[k] = counts.get(k, 0) + s.value
            elif s.name == "ray_fastquant_generated_tokens_total":
                tokens += s.value
            for h, per_le in buckets.items():
                if s.name == f"ray_fastquant_{h}_bucket":
                    per_le[s.labels["le"]] = per_le.get(s.labels["le"], 0) + s.value  # cumulative, summed over replicas
    return {
        "requests_by_deployment_status": counts,
        "generated_tokens": tokens,
        "batch_size_le": buckets["batch_size"],
        "ttft_s_le": buckets["time_to_first_token_seconds"],
    }


def _batches(le: dict[str, float]) -> str:
    """Batches per size range, from cumulative bucket counts ("1": 5, "2": 7 ... -> "1: 5, 2: 2 ...")."""
    out, below = [], 0.0
    for bound, n in sorted(((float(k), v) for k, v in le.items()), key=lambda kv: kv[0]):
        if n > below:
            out.append(f"<={bound:g}: {n - below:.0f}")
        below = n
    return ", ".join(out)


def _final_scrape(url: str, expected: int) -> dict[str, Any]:
    """Scrape until the counters stop moving (Ray's workers report every second here), at most 30 s."""
    last, deadline = None, time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(3)
        try:
            now = _scrape(url)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            now = {"error": repr(exc)}
        total = sum(now.get("requests_by_deployment_status", {}).values())
        if now == last and total >= expected:
            break
        last = now
    return now


def _cross_check(summary: dict[str, Any], scraped: dict[str, Any], kill: bool) -> dict[str, Any]:
    counts = scraped.get("requests_by_deployment_status", {})
    server_ok = counts.get(f"{DEPLOYMENT} 200", 0)
    ingress_503 = counts.get("Ingress 503", 0)
    check = {
        "client_ok": summary["ok"],
        "server_200": server_ok,
        "client_503": summary["error_kinds"].get("503 http:service_unavailable", 0),
        "client_stream_errors": summary["error_kinds"].get("200 stream:service_unavailable", 0),
        "ingress_503": ingress_503,
    }
    if kill:
        # The killed replica's own counters die with its process: the server may count fewer 200s than the client.
        check["agrees"] = server_ok <= summary["ok"] and ingress_503 == summary["retryable_errors"]
    else:
        check["agrees"] = server_ok == summary["ok"] and ingress_503 == 0
    return check


def _serve_phase(args, folder: Path, keys_file: Path, key: str, phase: str, requests, kill_at: float | None):
    import ray
    from ray import serve

    from fastquant.app.serve import ServeConfig, start

    replicas = 1 if phase == "one" else 2
    stream = phase not in ("batch", "nobatch")
    metrics_port = _free_port()
    os.environ[_REPORT_INTERVAL] = "1000"  # default 10 s: the final scrape would lag
    ray.init(
        address="local",
        include_dashboard=False,
        num_cpus=replicas,  # one CPU, one torch thread, per replica
        _node_ip_address="127.0.0.1",
        _metrics_export_port=metrics_port,
    )
    try:
        config = ServeConfig(
            checkpoint=str(folder),
            api_keys=str(keys_file),
            replicas=replicas,
            port=args.port,
            metrics_port=metrics_port,
            cpus_per_replica=1,
            max_tokens_cap=64,
            max_prompt_tokens=1024,
            requests_per_minute=1e9,
            max_ongoing_requests=args.concurrency,
            max_batch_size=1 if phase == "nobatch" else args.max_batch_size,
        )
        url = start(config)
        out = Path(tempfile.mkdtemp()) / "load.json"
        ctx = mp.get_context("spawn")
        proc = ctx.Process(target=_load_process, args=(url, key, requests, args.concurrency, args.timeout, stream, out))
        load_before = _loadavg()
        t0 = time.monotonic()
        proc.start()
        killed = None
        if kill_at is not None:
            while time.monotonic() - t0 < kill_at and proc.is_alive():
                time.sleep(0.2)
            pids = _replica_pids()
            name, pid = sorted(pids.items())[0]
            os.kill(pid, signal.SIGKILL)  # the replica's worker process, at once, as a crash would
            killed = {"replica": name, "pid": pid, "at_s": round(time.monotonic() - t0, 2), "pids_before": pids}
            while time.monotonic() - t0 < args.deadline:  # when is it running again (a new process)?
                now = _replica_pids()
                if len(now) == replicas and pid not in now.values() and _running_replicas() == replicas:
                    killed["running_again_at_s"] = round(time.monotonic() - t0, 2)
                    killed["pids_after"] = now
                    break
                time.sleep(0.5)
        proc.join(max(1.0, args.deadline - (time.monotonic() - t0)))
        if proc.is_alive():  # no hang: a phase past its deadline is stopped and reported
            proc.terminate()
            proc.join(10)
            raise RuntimeError(f"the load generator did not finish in {args.deadline} s")
        wall = time.monotonic() - t0
        load_after = _loadavg()
        results = json.loads(out.read_text())
        summary = _summary(results, wall)
        summary.update(
            replicas=replicas,
            stream=stream,
            max_batch_size=config.max_batch_size,
            loadavg_before=load_before,
            loadavg_after=load_after,
        )
        if killed is not None:
            after = [r for r in results if r["start"] - t0 > killed["at_s"] + 0 and r["status"] == 200]
            killed["ok_started_after_kill"] = len(after)
            killed["replicas_running_at_end"] = _running_replicas()
            summary["killed"] = killed
        scraped = _final_scrape(f"http://127.0.0.1:{metrics_port}/metrics", summary["ok"])
        summary["prometheus"] = scraped
        summary["cross_check"] = _cross_check(summary, scraped, killed is not None)
        return summary
    finally:
        serve.shutdown()
        ray.shutdown()


def _hf_phase(folder: Path, requests) -> dict[str, Any]:
    import torch
    from transformers import LogitsProcessorList

    import fastquant
    from fastquant.app.serve.batching import _FirstStep

    torch.set_num_threads(1)  # as one replica
    model, tokenizer = fastquant.from_pretrained(folder)
    latencies, ttfts, tokens = [], [], 0
    load_before = _loadavg()
    t0 = time.monotonic()
    for r in requests:
        start = time.perf_counter()
        ids = tokenizer(r["prompt"], return_tensors="pt").input_ids
        first = _FirstStep()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=r["max_tokens"],
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
                logits_processor=LogitsProcessorList([first]),
            )
        tokens += out.shape[1] - ids.shape[1]
        latencies.append(time.perf_counter() - start)
        ttfts.append(first.at - start)
    wall = time.monotonic() - t0
    return {
        "requests": len(requests),
        "ok": len(requests),
        "retryable_errors": 0,
        "other_errors": 0,
        "wall_s": round(wall, 2),
        "requests_per_s": len(requests) / wall,
        "tokens_per_s": tokens / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_p99_s": _pct(latencies, 0.99),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": _pct(ttfts, 0.99),
        "threads": 1,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
    }


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# fastquant serve load: {results['model']}",
        "",
        f"{results['settings']}. {results['date']}. CPU: {results['isa']}.",
        "",
        "| phase | ok/requests | retryable errors | other errors | req/s | tok/s | p50 s | p99 s | TTFT p50 | TTFT p99 "
        "| share per replica | load before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x):
        return "-" if x is None else f"{x:.2f}"

    for name, s in results["phases"].items():
        share = ", ".join(f"{v:.0%}" for v in s.get("share_per_replica", {}).values()) or "-"
        load = f"{s['loadavg_before'].split()[0]} -> {s['loadavg_after'].split()[0]}"
        lines.append(
            f"| {name} | {s['ok']}/{s['requests']} | {s['retryable_errors']} | {s['other_errors']} | "
            f"{s['requests_per_s']:.2f} | {s['tokens_per_s']:.1f} | {f(s['latency_p50_s'])} | "
            f"{f(s['latency_p99_s'])} | {f(s.get('ttft_p50_s'))} | {f(s.get('ttft_p99_s'))} | {share} | {load} |"
        )
    lines.append("")
    for name, s in results["phases"].items():
        if "cross_check" in s:
            c, p = s["cross_check"], s["prometheus"]
            extra = f", generated tokens {p.get('generated_tokens', 0):.0f}"
            if p.get("batch_size_le") and not s.get("stream", True):
                extra += f", batches by size: {_batches(p['batch_size_le'])}"
            lines.append(
                f"- {name}: client ok {c['client_ok']} vs Prometheus 200s {c['server_200']:.0f}; client 503s "
                f"{c['client_503']} + stream errors {c['client_stream_errors']} vs ingress 503s {c['ingress_503']:.0f}"
                f" ({'agree' if c['agrees'] else 'DISAGREE'}){extra}"
            )
        if s.get("error_kinds"):
            lines.append(f"- {name} errors: {s['error_kinds']}")
        if "killed" in s:
            k = s["killed"]
            lines.append(
                f"- {name}: SIGKILL pid {k['pid']} at {k['at_s']} s; replica running again at "
                f"{k.get('running_again_at_s', 'NOT within the deadline')} s; {k['ok_started_after_kill']} requests "
                f"started after the kill succeeded; replicas running at the end: {k['replicas_running_at_end']}"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--deadline", type=float, default=1800.0, help="per phase, seconds")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--checkpoint", help="a `fastquant compress` folder (default: SmolLM2 int8, made here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=8, help="server side, non-streaming requests")
    parser.add_argument("--output", default=str(RESULTS), help="folder for the results (%(default)s)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from fastquant.app import cli
    from fastquant.app.serve import keys

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    folder = Path(args.checkpoint) if args.checkpoint else work / "smollm2-int8"
    if not args.checkpoint and cli.main(["compress", "smollm2", "--method", "int8", "-o", str(folder)]) != 0:
        return 2
    keys_file = work / "keys.json"
    key, _ = keys.add_key(keys_file, "load")
    requests = _requests(args.requests, args.seed)
    info = subprocess.run([sys.executable, "-m", "fastquant.info"], capture_output=True, text=True, check=False)
    wanted = ("CPU features", "CPU kernels use", "int8_linear cpu float32")
    isa = "; ".join(line for line in info.stdout.splitlines() if line.startswith(wanted)) or info.stdout
    results: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct int8",
        "settings": (
            f"{args.requests} requests of mixed lengths per phase, {args.concurrency} concurrent clients, "
            f"1 torch thread and 1 Ray CPU per replica, {os.cpu_count()} cores, max batch {args.max_batch_size}"
        ),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
        "isa": isa.strip(),
        "fastquant_info": info.stdout,
        "loadavg_start": _loadavg(),
        "phases": {},
    }
    stem = Path(args.output) / f"serve-load-{time.strftime('%Y-%m-%d', time.gmtime())}"
    Path(args.output).mkdir(parents=True, exist_ok=True)
    for phase in args.phases:
        print(f"phase {phase} ... (load {_loadavg()})", flush=True)
        if phase == "hf":
            results["phases"][NAMES[phase]] = _hf_phase(folder, requests)
        else:
            kill_at = None
            if phase == "kill":
                two = results["phases"].get(NAMES["two"])
                kill_at = two["wall_s"] / 3 if two else 20.0
            results["phases"][NAMES[phase]] = _serve_phase(args, folder, keys_file, key, phase, requests, kill_at)
        # Written after every phase: a later failure keeps what was measured.
        results["loadavg_end"] = _loadavg()
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
        stem.with_suffix(".md").write_text(_markdown(results))
    print(_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
