"""End-to-end batch-1 greedy decode on the GPU: a Llama-shaped ~1B model, bf16 vs fastquant int8.

The model is ``fastquant.app.models.random_llama_1b`` (random weights; hidden 2048, intermediate 8192, 16 layers,
32 heads, 8 kv heads, vocab 32000): nothing is downloaded. Tokens/s of ``model.generate``
(greedy, exactly ``max_new_tokens`` with the end-of-text stop disabled, after a warm-up generate) for:

* ``eager``: the default dynamic KV cache, every op launched from Python (launch-bound on a fast GPU),
* ``compiled``: ``fastquant.compile_for_decode``: a static KV cache and the decode step compiled in
  "reduce-overhead" mode (CUDA graphs),

first with the bf16 model, then with a copy after ``fastquant.patch(model)`` (int8 per-channel; lm_head stays
bf16, as patch() skips it by default). Appends its rows to ``<stem>.json`` / ``<stem>.md`` (the files of
bench_gpu_int8.py when given the same ``--stem``), or writes them if they do not exist; the rows are
rewritten after each mode so that a time-out in a later mode keeps the earlier ones.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import time
from pathlib import Path

import torch

import fastquant
from fastquant.app.models import random_llama_1b


def prepare(model, mode: str, max_cache_len: int) -> None:
    """compiled: fastquant.compile_for_decode (static KV cache, CUDA graphs of the decode step)."""
    if mode == "compiled":
        fastquant.compile_for_decode(model, max_cache_len=max_cache_len)


def tokens_per_second(model, mode: str, new_tokens: int, prompt_len: int, repeats: int) -> float:
    prepare(model, mode, prompt_len + new_tokens)
    gen = torch.Generator(device="cuda").manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device="cuda", generator=gen)
    attention_mask = torch.ones_like(input_ids)

    def run(n):
        return model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=n,
            eos_token_id=None,  # no end-of-text stop: exactly n new tokens
            do_sample=False,
            pad_token_id=0,
        )

    with torch.inference_mode():
        for _ in range(2):  # warm-up: compile, CUDA graph capture, allocator, cuBLAS heuristics
            run(new_tokens)
        torch.cuda.synchronize()
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = run(new_tokens)
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            assert out.shape[1] == prompt_len + new_tokens
            rates.append(new_tokens / elapsed)
    return statistics.median(rates)


def append_results(stem: Path, rows: list[dict], meta: dict) -> None:
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    data = json.loads(json_path.read_text()) if json_path.exists() else {"meta": meta, "rows": []}
    data["e2e_decode"] = rows
    data.setdefault("e2e_meta", meta)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    lines = [
        "",
        f"## End-to-end decode ({meta['model']})",
        "",
        f"batch 1, greedy, prompt {meta['prompt_len']} tokens, {meta['new_tokens']} new tokens, median of "
        f"{meta['repeats']} generate() calls after warm-up; transformers {meta['transformers']}",
        "",
        "| mode | bf16 tokens/s | int8 tokens/s | speed-up | target |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        int8 = "failed" if r["int8_tok_s"] is None else f"{r['int8_tok_s']:.1f}"
        bf16 = "failed" if r["bf16_tok_s"] is None else f"{r['bf16_tok_s']:.1f}"
        ratio = "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        met = "" if r["speedup"] is None else ("met" if r["speedup"] >= 1.7 else "**missed**")
        lines.append(f"| {r['mode']} | {bf16} | {int8} | {ratio} | >= 1.7x {met} |")
        if r.get("error"):
            lines.append(f"| | error: {r['error']} | | | |")
    previous = md_path.read_text() if md_path.exists() else ""
    previous = previous.split("\n## End-to-end decode")[0].rstrip("\n") + "\n"  # rewritten after each mode
    md_path.write_text(previous + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stem", help="results path without extension (default benchmarks/results/gpu-<date>)")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("e2e_gpu_decode.py needs a CUDA device")
    import transformers

    now = dt.datetime.now(dt.timezone.utc)
    stem = Path(args.stem) if args.stem else Path(__file__).parent / "results" / f"gpu-{now:%Y%m%d-%H%M%S}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": now.isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "model": "Llama 1.1B shape (2048/8192, 16 layers, 32 heads, 8 kv heads, vocab 32000), random bf16",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    rows = []
    for mode in args.modes.split(","):
        row = {"mode": mode, "bf16_tok_s": None, "int8_tok_s": None, "speedup": None}
        try:
            bf16_model = random_llama_1b(device="cuda", dtype=torch.bfloat16)
            int8_model = fastquant.patch(copy.deepcopy(bf16_model))
            row["bf16_tok_s"] = tokens_per_second(bf16_model, mode, args.new_tokens, args.prompt_len, args.repeats)
            del bf16_model
            torch.cuda.empty_cache()
            row["int8_tok_s"] = tokens_per_second(int8_model, mode, args.new_tokens, args.prompt_len, args.repeats)
            row["speedup"] = row["int8_tok_s"] / row["bf16_tok_s"]
            del int8_model
        except Exception as exc:  # report the failure of one mode and keep the others
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
        append_results(stem, rows, meta)  # after each mode, so a later time-out keeps what was measured
    print(f"appended end-to-end results to {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
