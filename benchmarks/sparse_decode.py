"""SmolLM2-135M decode and prefill on the CPU: dense int8 against int8 + 50% sparse, the issue's end-to-end
speed target ("int8 + 50% decodes faster than int8 alone").

Three copies of the model are run in interleaved rounds, so that the VM's drifting speed affects each alike:
per round and model one greedy batch-1 generation (``fastquant.app.evaluate.decode_speed``) and one forward pass
over a 512-token prompt (``prefill_speed``):

* ``int8``: ``patch(model, "int8")``, per-channel scales, the tied lm_head in float (the demo's int8 row);
* ``int8+sparse``: ``patch(model, "int8+sparse", sparsity=0.5, pruning="magnitude", sparse_kernel="sparse")``:
  every pruned layer runs the sparse kernel (bitmap16, int8 values);
* ``int8+sparse auto``: the same pruning with the measured per-layer kernel choice (what users get).

Magnitude pruning: only speed is measured here (the accuracy of each pruning algorithm is in
``prune_accuracy.py``). Run: ``python benchmarks/sparse_decode.py [--rounds 8] [--threads 2] [--out STEM]``. Writes
``benchmarks/results/smollm2-sparse-decode-<UTC date>.md`` and ``.json``. "median of round ratios" pairs each
round's tok/s with int8's in the same round, which cancels the drift between rounds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from cpu_table import cpu_model

import fastquant
from fastquant import SparseLinear
from fastquant.app.evaluate import decode_speed, prefill_speed
from fastquant.app.models import load_model
from fastquant.kernels import extension

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "int8": dict(method="int8"),
    "int8+sparse": dict(method="int8+sparse", sparsity=0.5, pruning="magnitude", sparse_kernel="sparse"),
    "int8+sparse auto": dict(method="int8+sparse", sparsity=0.5, pruning="magnitude", sparse_kernel="auto"),
}


def kernels_of(model: torch.nn.Module) -> dict[str, int]:
    """How many linear layers run each kind of kernel."""
    counts: Counter[str] = Counter()
    for module in model.modules():
        if isinstance(module, SparseLinear):
            counts[f"sparse {module.layout}"] += 1
        elif isinstance(module, fastquant.Int8Linear):
            counts["dense int8"] += 1
    return dict(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--out", default=None, help="output stem (default results/smollm2-sparse-decode-<UTC date>)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    models, patch_s = {}, {}
    for name, options in VARIANTS.items():
        loaded = load_model("smollm2")
        start = time.perf_counter()
        models[name] = fastquant.patch(loaded.model, progress=False, **options).eval()
        patch_s[name] = time.perf_counter() - start
        tokenizer = loaded.tokenizer
    prompt = tokenizer("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    long_prompt = torch.arange(args.prefill_tokens).remainder(tokenizer.vocab_size - 1).add(1)

    speeds: dict[str, list[float]] = {name: [] for name in models}
    prefill: dict[str, list[float]] = {name: [] for name in models}
    tokens: dict[str, list[int]] = {}
    for round_index in range(args.rounds):
        order = list(models) if round_index % 2 == 0 else list(reversed(models))
        for name in order:
            result = decode_speed(models[name], prompt, new_tokens=args.new_tokens)
            speeds[name].append(result["decode_tokens_per_s"])
            tokens[name] = result["tokens"]
            with torch.inference_mode():
                prefill[name].append(prefill_speed(models[name], long_prompt, repeats=1)["prefill_tokens_per_s"])
        print(
            f"round {round_index + 1}: "
            + ", ".join(f"{n} {s[-1]:.1f} tok/s, prefill {prefill[n][-1]:.0f}" for n, s in speeds.items()),
            flush=True,
        )

    base = statistics.median(speeds["int8"])
    rows = []
    for name, values in speeds.items():
        median = statistics.median(values)
        wins = sum(v > b for v, b in zip(values, speeds["int8"], strict=True))
        paired = statistics.median(v / b for v, b in zip(values, speeds["int8"], strict=True))
        rows.append(
            {
                "variant": name,
                "median_tok_s": median,
                "min_tok_s": min(values),
                "max_tok_s": max(values),
                "vs_int8": median / base,
                "rounds_faster_than_int8": wins,
                "paired_vs_int8": paired,
                "prefill_median_tok_s": statistics.median(prefill[name]),
                "prefill_vs_int8": statistics.median(prefill[name]) / statistics.median(prefill["int8"]),
                "kernels": kernels_of(models[name]),
                "patch_s": patch_s[name],
                "same_tokens_as_int8": tokens[name] == tokens["int8"],
            }
        )
    env = {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": args.threads,
        "isa": extension.native.cpu_isa() if extension.native is not None else "reference",
        "load_average": os.getloadavg()[0],
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "prefill_tokens": args.prefill_tokens,
    }
    lines = [
        f"# SmolLM2-135M decode: dense int8 vs int8 + 50% sparse ({env['cpu']}, {args.threads} threads, "
        f"ISA {env['isa']})",
        "",
        f"Greedy, batch 1, {args.new_tokens} new tokens, {args.rounds} interleaved rounds; magnitude pruning "
        "(speed only). `same tokens` compares the generated text with int8's (pruning changes it). Prefill: one "
        f"forward pass over {args.prefill_tokens} token ids per round (arbitrary ids: speed does not depend on them).",
        "",
        "| variant | median tok/s | min | max | vs int8 | median of round ratios | rounds faster than int8 | "
        f"same tokens | prefill {args.prefill_tokens} tok/s | vs int8 | kernels |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        kernels = ", ".join(f"{k}: {v}" for k, v in sorted(r["kernels"].items()))
        lines.append(
            f"| {r['variant']} | {r['median_tok_s']:.1f} | {r['min_tok_s']:.1f} | {r['max_tok_s']:.1f} | "
            f"{r['vs_int8']:.3f}x | {r['paired_vs_int8']:.3f}x | {r['rounds_faster_than_int8']}/{args.rounds} | "
            f"{'yes' if r['same_tokens_as_int8'] else 'no'} | {r['prefill_median_tok_s']:.0f} | "
            f"{r['prefill_vs_int8']:.3f}x | {kernels} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = Path(args.out) if args.out else RESULTS / f"smollm2-sparse-decode-{dt.datetime.now(dt.timezone.utc).date()}"
    stem.with_suffix(".md").write_text(text)
    result = {"environment": env, "rows": rows, "tok_s": speeds, "prefill_tok_s": prefill}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(f"wrote {stem}.md / .json")


if __name__ == "__main__":
    main()
