"""`fastquant serve` as a user runs it: its own process, its own local Ray, stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")
from test_serve import _free_port, _tiny_model_folder  # noqa: E402

from fastquant.app import cli  # noqa: E402


@pytest.mark.parametrize(
    "stop",
    [signal.SIGINT, signal.SIGTERM],
    ids=["ctrl-c", "sigterm-with-sigint-ignored"],
)
def test_serve_command_answers_and_stops_on_ctrl_c(tmp_path, capsys, stop):
    _tiny_model_folder(tmp_path / "float")
    out = tmp_path / "tiny"
    assert cli.main(["compress", str(tmp_path / "float"), "--method", "int8", "-o", str(out)]) == 0
    keys = tmp_path / "keys.json"
    assert cli.main(["serve", "keys", "add", "--api-keys", str(keys), "ops"]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    port, metrics_port = _free_port(), _free_port()
    argv = [sys.executable, "-m", "fastquant.cli", "serve", str(out), "--replicas", "1", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--metrics-port", str(metrics_port), "--api-keys", str(keys)]
    argv += ["--cpus-per-replica", "1", "--audit-log", str(tmp_path / "audit.jsonl")]
    log = (tmp_path / "serve.log").open("w")  # a file, not a pipe: Ray's logs must never block the server
    # The SIGTERM case starts the server as a background job of a non-interactive shell does: SIGINT ignored.
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if stop == signal.SIGTERM else None
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=ignore_sigint)
    try:
        deadline = time.monotonic() + 180
        ready = f"serving tiny at http://127.0.0.1:{port}/v1"
        while time.monotonic() < deadline and proc.poll() is None and ready not in (tmp_path / "serve.log").read_text():
            time.sleep(1)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        assert health.status_code == 200 and health.json()["model"] == "tiny"
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"messages": [{"role": "user", "content": "Who's there?"}], "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert metrics.status_code == 200 and "ray_" in metrics.text
        proc.send_signal(stop)
        proc.wait(timeout=120)
        output = (tmp_path / "serve.log").read_text()
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
