"""fastquant serve: a signed and encrypted tiny checkpoint served by Ray Serve (2 replicas) over real HTTP on loopback.

Ray is started by the module fixture on 127.0.0.1 and shut down after; every wait is bounded in time.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("cryptography")
httpx = pytest.importorskip("httpx")
transformers = pytest.importorskip("transformers")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fastquant import protect  # noqa: E402
from fastquant.app import cli  # noqa: E402
from fastquant.app.serve import keys  # noqa: E402
from helpers import tiny_llama_config  # noqa: E402

MAX_PROMPT_TOKENS = 64
MAX_TOKENS_CAP = 32
MAX_BODY = 4096
_REPORT_INTERVAL = "RAY_metrics_report_interval_ms"  # Ray's spelling: how often workers report metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model_folder(folder):
    """A tiny Llama with a byte-level BPE tokenizer (any UTF-8 text encodes) and a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fastquant.app.models import read_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([read_text()[:20000]], trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray
    from ray import serve

    from fastquant.app.serve import ServeConfig, start

    root = tmp_path_factory.mktemp("serve")
    _tiny_model_folder(root / "float")
    signer, public = protect.new_signing_key(root / "signer.pem")
    key_file = root / "aes.key"
    out = root / "tiny-int8"
    argv = ["compress", str(root / "float"), "--method", "int8", "-o", str(out)]
    assert cli.main([*argv, "--sign-key", str(signer), "--encrypt", "--key-file", str(key_file)]) == 0
    api_keys = root / "keys.json"
    alice, _ = keys.add_key(api_keys, "alice", requests_per_minute=6000)
    bob, _ = keys.add_key(api_keys, "bob", models=["another-model"])
    carol, _ = keys.add_key(api_keys, "carol", requests_per_minute=2)
    dave, _ = keys.add_key(api_keys, "dave")

    metrics_port = _free_port()
    previous = os.environ.get(_REPORT_INTERVAL)
    os.environ[_REPORT_INTERVAL] = "500"  # default 10 s
    ray.init(
        address="local",
        include_dashboard=False,
        num_cpus=2,
        _metrics_export_port=metrics_port,
        _node_ip_address="127.0.0.1",
    )
    config = ServeConfig(
        checkpoint=str(out),
        api_keys=str(api_keys),
        replicas=2,
        port=_free_port(),
        metrics_port=metrics_port,
        cpus_per_replica=0.5,
        max_body_bytes=MAX_BODY,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        max_tokens_cap=MAX_TOKENS_CAP,
        trusted_keys=(str(public),),
        key_file=str(key_file),
        audit_log=str(root / "audit.jsonl"),
        max_batch_size=8,  # batching is off by default; this server tests it on
    )
    try:
        url = start(config)
        with httpx.Client(base_url=url, timeout=60) as client:
            yield dict(
                client=client,
                url=url,
                config=config,
                folder=out,
                key_file=key_file,
                public=public,
                api_keys=api_keys,
                alice=alice,
                bob=bob,
                carol=carol,
                dave=dave,
                metrics=f"http://127.0.0.1:{metrics_port}/metrics",
                audit=root / "audit.jsonl",
            )
    finally:
        serve.shutdown()
        ray.shutdown()
        if previous is None:
            del os.environ[_REPORT_INTERVAL]
        else:
            os.environ[_REPORT_INTERVAL] = previous


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def _local_greedy(server, prompt_ids, max_tokens):
    """What the served model must answer: the same checkpoint loaded here, greedy."""
    import torch

    import fastquant

    if "local" not in server:
        server["local"] = fastquant.from_pretrained(
            server["folder"], trusted_keys=[server["public"]], decryption_key=protect.read_key_file(server["key_file"])
        )
    model, tokenizer = server["local"]
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), tokenizer


def test_health_models_and_both_replicas_answer(server):
    c = server["client"]
    replicas = set()
    for _ in range(40):
        r = c.get("/health")
        assert r.status_code == 200 and r.json()["model"] == "tiny-int8"
        replicas.add(r.json()["replica"])
        if len(replicas) == 2:
            break
    assert len(replicas) == 2
    assert c.get("/v1/models").status_code == 401
    r = c.get("/v1/models", headers=_auth(server["alice"]))
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["tiny-int8"]


def test_completion_matches_local_greedy_generation(server):
    prompt = "Where should this music be?"
    r = server["client"].post(
        "/v1/completions",
        headers=_auth(server["alice"]),
        json={"model": "tiny-int8", "prompt": prompt, "max_tokens": 8, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-fastquant-replica"]
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny-int8"
    _, tokenizer = _local_greedy(server, [0], 1)
    prompt_ids = tokenizer(prompt).input_ids
    expected, _ = _local_greedy(server, prompt_ids, 8)
    choice = body["choices"][0]
    assert choice["text"] == expected
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] == ("length" if usage["completion_tokens"] == 8 else "stop")


def _sse(response):
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_gives_the_same_text_as_non_streaming(server, path):
    c = server["client"]
    if path == "/v1/completions":
        body = {"prompt": "Full fathom five thy father lies", "max_tokens": 12, "temperature": 0}
    else:
        body = {"messages": [{"role": "user", "content": "Hello, who is there?"}], "max_tokens": 12, "temperature": 0}
    whole = c.post(path, headers=_auth(server["alice"]), json=body)
    assert whole.status_code == 200, whole.text
    streamed = c.post(path, headers=_auth(server["alice"]), json={**body, "stream": True})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(streamed)
    choice = whole.json()["choices"][0]
    if path == "/v1/completions":
        text, got = choice["text"], "".join(ch["choices"][0]["text"] for ch in chunks)
    else:
        assert choice["message"]["role"] == "assistant" and whole.json()["object"] == "chat.completion"
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
        text, got = choice["message"]["content"], "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
    assert got == text and len(text) > 0
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_stop_sequence_cuts_the_text(server):
    c = server["client"]
    body = {"prompt": "What cares these roarers for the name of king?", "max_tokens": 16, "temperature": 0}
    full = c.post("/v1/completions", headers=_auth(server["alice"]), json=body).json()["choices"][0]["text"]
    assert len(full) >= 6
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    for stream in (False, True):
        r = c.post("/v1/completions", headers=_auth(server["alice"]), json={**body, "stop": [stop], "stream": stream})
        assert r.status_code == 200
        if stream:
            chunks = _sse(r)
            text, finish = "".join(ch["choices"][0]["text"] for ch in chunks), chunks[-1]["choices"][0]["finish_reason"]
        else:
            text, finish = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        assert text == full[: full.index(stop)] and finish == "stop", (full, stop, text)


def test_sampling_parameters_are_used(server):
    c = server["client"]
    body = {"prompt": "Be not afeard", "max_tokens": 16, "temperature": 1.5, "top_p": 0.95}
    texts = {
        c.post("/v1/completions", headers=_auth(server["alice"]), json={**body, "seed": s}).json()["choices"][0]["text"]
        for s in (1, 2, 3)
    }
    assert len(texts) > 1  # sampled, not greedy
    again = c.post("/v1/completions", headers=_auth(server["alice"]), json={**body, "seed": 1})
    first = c.post("/v1/completions", headers=_auth(server["alice"]), json={**body, "seed": 1})
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]


def test_concurrent_requests_share_generate_calls_and_get_their_own_answers(server):
    from concurrent.futures import ThreadPoolExecutor

    c = server["client"]
    bodies = [
        {"prompt": " ".join(["Ariel"] * n), "max_tokens": m, "temperature": 0} for n, m in ((1, 4), (7, 9), (3, 2))
    ] * 4

    def send(body):
        r = c.post("/v1/completions", headers=_auth(server["alice"]), json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]

    alone = [send(b) for b in bodies[:3]]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(send, bodies))
    assert together == alone * 4
    batches = [json.loads(line).get("batch") for line in server["audit"].read_text().splitlines()]
    assert max(b for b in batches if b is not None) > 1


def test_auth_errors(server):
    c = server["client"]
    body = {"prompt": "hi", "max_tokens": 2}
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert c.post("/v1/completions", json=body, headers={"Authorization": "Basic abc"}).status_code == 401
    forged = server["alice"][:-4] + "AAAA"
    assert c.post("/v1/completions", json=body, headers=_auth(forged)).status_code == 401
    r = c.post("/v1/completions", json=body, headers=_auth(server["bob"]))
    assert r.status_code == 403 and "not allowed the model 'tiny-int8'" in r.json()["error"]["message"]
    assert c.post("/v1/completions", json=body, headers=_auth(server["dave"])).status_code == 200
    keys.revoke_key(server["api_keys"], "dave")  # replicas re-read the file: no restart
    assert c.post("/v1/completions", json=body, headers=_auth(server["dave"])).status_code == 401


def test_rate_limit_is_per_key_across_replicas(server):
    c = server["client"]
    codes = [c.get("/v1/models", headers=_auth(server["carol"])) for _ in range(3)]
    assert [r.status_code for r in codes[:2]] == [200, 200]
    limited = codes[2]
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert c.get("/v1/models", headers=_auth(server["alice"])).status_code == 200  # other keys unaffected


BAD_REQUESTS = [
    ("body over the limit", {"prompt": "x" * (MAX_BODY + 10)}, 413, None),
    ("not JSON", b"{prompt: 1", 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("not UTF-8", b'{"prompt": "\xff\xfe"}', 400, None),
    ("max_tokens as a string", {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens as a bool", {"prompt": "a", "max_tokens": True}, 400, "max_tokens"),
    ("max_tokens over the cap", {"prompt": "a", "max_tokens": MAX_TOKENS_CAP + 1}, 400, "max_tokens"),
    ("max_tokens zero", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("absurd temperature", {"prompt": "a", "temperature": 1e30}, 400, "temperature"),
    ("NaN temperature", b'{"prompt": "a", "temperature": NaN}', 400, "temperature"),
    ("negative temperature", {"prompt": "a", "temperature": -1}, 400, "temperature"),
    ("top_p zero", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("top_p over one", {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("too many stops", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("empty stop", {"prompt": "a", "stop": ""}, 400, "stop.0"),
    ("prompt as a number", {"prompt": 5}, 400, "prompt"),
    ("n > 1", {"prompt": "a", "n": 4}, 400, "n"),
    ("no prompt", {"max_tokens": 3}, 400, "prompt"),
    ("prompt over the token limit", {"prompt": "Ariel and Caliban " * 100}, 400, "prompt"),
    ("unknown model", {"prompt": "a", "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("name,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_refused_with_the_field_named(server, name, body, status, param):
    c = server["client"]
    headers = _auth(server["alice"])
    if isinstance(body, bytes):
        r = c.post("/v1/completions", content=body, headers={**headers, "Content-Type": "application/json"})
    else:
        r = c.post("/v1/completions", json=body, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]
    if param is not None:
        assert param.split(".")[0] in error["message"]


def test_bad_chat_requests_and_replicas_survive(server):
    c = server["client"]
    headers = _auth(server["alice"])
    cases = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages.0.content"),
    ]
    for body, param in cases:
        r = c.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # A chunked body (no Content-Length) over the limit is cut off while reading.
    r = c.post("/v1/completions", content=iter([b'{"prompt": "', b"x" * (2 * MAX_BODY), b'"}']), headers=headers)
    assert r.status_code == 413
    # After every refusal both replicas still serve. The router prefers the replica with the shorter queue, so on
    # a busy machine one may answer many health checks in a row: ask until both have answered (bounded).
    replicas: set[str] = set()
    deadline = time.monotonic() + 60
    for _ in range(400):
        replicas.add(c.get("/health").json()["replica"])
        if len(replicas) == 2 or time.monotonic() > deadline:
            break
    assert len(replicas) == 2, replicas
    ok = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2}, headers=headers)
    assert ok.status_code == 200


def test_a_client_that_goes_away_mid_stream_affects_no_one(server):
    c = server["client"]
    headers = _auth(server["alice"])
    body = {"prompt": "Hell is empty and all the devils are here", "max_tokens": MAX_TOKENS_CAP, "stream": True}
    for _ in range(2):
        with c.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            assert next(r.iter_lines()).startswith("data: ")
    ok = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3, "temperature": 0}, headers=headers)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_clients_that_go_away_are_recorded_as_499_not_500(server):
    from concurrent.futures import ThreadPoolExecutor

    c = server["client"]
    headers = _auth(server["alice"])
    prompt = "Ariel " * 12
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS_CAP, "stream": True}
    before = len(server["audit"].read_text().splitlines())

    def leave() -> str:
        # Away as soon as the answer starts, or after 0.3 s without one: some wait for their replica's model,
        # others are generating (a request that had not reached a replica yet leaves no record).
        url, timeout = f"{server['url']}/v1/completions", httpx.Timeout(60, read=0.3)
        try:
            with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout) as r:
                return str(r.status_code)
        except httpx.ReadTimeout:
            return "left"

    def statuses() -> list[int]:
        lines = server["audit"].read_text().splitlines()[before:]
        records = [json.loads(line) for line in lines]
        return [r["status"] for r in records if r["event"] == "request" and r.get("path") == "/v1/completions"]

    for _ in range(3):  # where each client is caught leaving is a matter of timing: rounds until one is seen
        with ThreadPoolExecutor(16) as pool:
            assert set(pool.map(lambda _: leave(), range(16))) <= {"200", "left"}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and 499 not in statuses():
            time.sleep(0.5)
        if 499 in statuses():
            break
    time.sleep(2)  # the last records
    assert 499 in statuses(), statuses()
    assert set(statuses()) <= {200, 499}, statuses()  # a generation that ended before the client left is a 200
    deadline, exported = time.monotonic() + 60, set()
    while time.monotonic() < deadline and "499" not in exported:
        samples = _samples(server["metrics"])
        exported = {s.labels.get("status") for s in samples if s.name.startswith("ray_fastquant_requests")}
        time.sleep(0.5)
    assert "499" in exported
    ok = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3, "temperature": 0}, headers=headers)
    assert ok.status_code == 200


def _samples(url):
    text = httpx.get(url, timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if "fastquant" in s.name]


def test_metrics_are_exported_per_replica_and_count(server):
    c = server["client"]
    headers = _auth(server["alice"])
    ok = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 3, "stream": True}, headers=headers)
    assert ok.status_code == 200
    assert c.post("/v1/completions", json={"prompt": "a"}).status_code == 401
    deadline = time.monotonic() + 60
    names: set[str] = set()
    while time.monotonic() < deadline:
        samples = _samples(server["metrics"])
        names = {s.name for s in samples}
        statuses = {s.labels.get("status") for s in samples if s.name.startswith("ray_fastquant_requests")}
        if {"200", "401"} <= statuses and any(n.startswith("ray_fastquant_time_to_first_token") for n in names):
            break
        time.sleep(1)
    for family in (
        "ray_fastquant_requests",
        "ray_fastquant_request_latency_seconds_bucket",
        "ray_fastquant_time_to_first_token_seconds_bucket",
        "ray_fastquant_generated_tokens",
        "ray_fastquant_generation_tokens_per_second_bucket",
        "ray_fastquant_queue_depth",
    ):
        assert any(n.startswith(family) for n in names), (family, sorted(names))
    requests = [s for s in samples if s.name.startswith("ray_fastquant_requests")]
    assert all(s.labels.get("replica") for s in requests)
    ok_count = sum(s.value for s in requests if s.labels["status"] == "200" and s.labels["path"] == "/v1/completions")
    assert ok_count >= 1


def test_audit_log_records_loads_and_requests_without_prompts(server):
    from fastquant.app.serve.audit import file_sha256
    from fastquant.serialization import checkpoint_path

    records = [json.loads(line) for line in server["audit"].read_text().splitlines()]
    loads = [r for r in records if r["event"] == "load"]
    assert len(loads) >= 2  # one per replica
    signer = protect.fingerprint(protect.read_public_key(server["public"]))
    checkpoint = checkpoint_path(server["folder"])
    for r in loads:
        assert r["sha256"] == file_sha256(checkpoint) and r["signer"] == signer and r["encrypted"] is True
        assert r["path"] == str(checkpoint.resolve()) and r["user"] and r["time"]
    requests = [r for r in records if r["event"] == "request"]
    alice_id = server["alice"].split("-")[1]
    ok = [r for r in requests if r["key_id"] == alice_id and r["status"] == 200 and r.get("completion_tokens")]
    assert ok and all(r["model"] == "tiny-int8" and r["prompt_tokens"] > 0 and r["latency_s"] > 0 for r in ok)
    assert any(r["status"] == 401 and r["key_id"] is None for r in requests)
    assert not any("prompt" in r or "output" in r for r in requests)
    assert "Where should this music be?" not in server["audit"].read_text()


def _replica_pids():
    import ray

    alive = [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]  # Ray's actor table (GCS)
    return {a["Name"].rsplit("#", 1)[1]: a["Pid"] for a in alive if "#FastquantLM#" in a["Name"]}


def _outcome(server, body, seen):
    """ok, retry (503 with Retry-After and a JSON error, or the error event of a started stream), or what else."""
    url = f"{server['url']}/v1/completions"
    try:
        with httpx.stream("POST", url, json=body, headers=_auth(server["alice"]), timeout=60) as r:
            seen(r.headers.get("x-fastquant-replica"))
            text = r.read().decode()
    except httpx.HTTPError as exc:
        return f"dropped: {type(exc).__name__}"
    if r.status_code == 503:
        error = json.loads(text)["error"]
        return "retry" if int(r.headers["retry-after"]) >= 1 and error["type"] == "service_unavailable" else text
    if r.status_code != 200:
        return f"{r.status_code}: {text[:200]}"
    if not body["stream"]:
        return "ok" if json.loads(text)["choices"] else text
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    if events[-1] != "[DONE]":
        return f"stream cut: {text[-200:]}"
    errors = [json.loads(e)["error"]["type"] for e in events[:-1] if "error" in json.loads(e)]
    return "ok" if not errors else ("retry" if errors == ["service_unavailable"] else f"stream error {errors}")


def test_a_replica_killed_mid_request_gives_retryable_errors_and_is_restarted(server):
    """SIGKILL of a replica's process while it has requests: each gets its answer or a retryable error, none
    hangs, and Ray Serve starts a new replica. (Last of the tests on the server: it kills one of its replicas.)"""
    import signal
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    pids = _replica_pids()
    assert len(pids) == 2
    victim = sorted(pids)[0]
    on_victim = threading.Semaphore(0)

    def seen(replica):
        if replica == victim:
            on_victim.release()

    body = {"prompt": "Ariel " * 12, "max_tokens": MAX_TOKENS_CAP}
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_outcome, server, {**body, "stream": i % 4 != 0}, seen) for i in range(32)]
        for _ in range(3):  # killed once it has taken three requests (their answers started: they are its own)
            assert on_victim.acquire(timeout=60)
        os.kill(pids[victim], signal.SIGKILL)
        outcomes = [f.result(timeout=120) for f in futures]
    assert set(outcomes) <= {"ok", "retry"}, outcomes
    assert "retry" in outcomes and "ok" in outcomes
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = serve.status().applications["fastquant"].deployments["FastquantLM"]
        now = _replica_pids()
        if status.replica_states.get("RUNNING", 0) == 2 and len(now) == 2 and victim not in now:
            break
        time.sleep(1)
    assert len(now) == 2 and victim not in now, now
    c = server["client"]
    ok = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3}, headers=_auth(server["alice"]))
    assert ok.status_code == 200


def test_keys_cli_prints_the_key_alone_on_its_last_line(tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert cli.main(["serve", "keys", "add", "--api-keys", str(path), "erin"]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    store = keys.KeyStore(path)
    assert store.check(key).name == "erin"
    assert key not in path.read_text()  # only its hash is stored
    assert path.stat().st_mode & 0o077 == 0
    assert cli.main(["serve", "keys", "revoke", "--api-keys", str(path), "erin"]) == 0
    assert store.check(key) is None
