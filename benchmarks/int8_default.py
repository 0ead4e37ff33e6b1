"""What `fastquant.patch(model)` should default to: int8 per-channel or group-wise scales, by held-out
perplexity and speed on SmolLM2-135M.

Perplexity on the held-out Tempest (never used for calibration), speed of decode (batch 1, greedy) and prefill
in interleaved rounds against each other, with the load average recorded. Rounding is round-to-nearest for
every row: the question is only which scale layout the default takes.

Trap: the shipped SmolLM2 is a Q4_1 GGUF (asymmetric 4-bit, groups of 32) de-quantized to fp32, so its
weights already sit on a 4-bit grid per 32 inputs. Group-wise int8 scales track that grid's groups better
than they would a real float model's; MiniLM (true float weights) is measured too as the honest check.

    python benchmarks/int8_default.py --out benchmarks/results/int8-default-2026-12-06
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
from pathlib import Path

import torch

import fastquant
from fastquant.app.evaluate import (
    cpu_model,
    embedding_cosine,
    interleaved_speed,
    load_average,
    perplexity,
    sentence_embeddings,
    sentences,
)
from fastquant.app.models import load_model, read_text
from fastquant.kernels import extension

GROUPS = (None, 256, 128, 64, 32)


def label(group_size: int | None) -> str:
    return "per-channel" if group_size is None else f"group {group_size}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results path without extension")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "threads": args.threads,
        "load_before": os.getloadavg(),
        "kernels": extension.int8_linear_kernel_path(torch.device("cpu"), 1, 1536, 576, -1, torch.float32),
    }

    smollm2 = load_model("smollm2")
    ids = smollm2.tokenizer(read_text(), return_tensors="pt").input_ids
    models = {"float32": smollm2.model}
    rows = []
    with torch.inference_mode():
        base = perplexity(smollm2.model, ids)
        rows.append({"model": "smollm2", "scales": "float32", "perplexity": base, "delta": 0.0})
        for group in GROUPS:
            model = fastquant.patch(copy.deepcopy(smollm2.model), fastquant.Int8(group_size=group))
            models[label(group)] = model
            ppl = perplexity(model, ids)
            rows.append({"model": "smollm2", "scales": label(group), "perplexity": ppl, "delta": ppl / base - 1})
            print(rows[-1], flush=True)

    minilm = load_model("minilm")
    texts = sentences(read_text())
    reference = sentence_embeddings(minilm.model, minilm.tokenizer, texts)
    for group in GROUPS:
        model = fastquant.patch(copy.deepcopy(minilm.model), fastquant.Int8(group_size=group))
        cosine = embedding_cosine(reference, sentence_embeddings(model, minilm.tokenizer, texts))
        rows.append({"model": "minilm", "scales": label(group), **cosine})
        print(rows[-1], flush=True)

    prompt = ids[:, :32]
    prefill = ids[:, :256]
    load_speed = load_average()
    speed = interleaved_speed(models, prompt, prefill, args.decode_tokens, args.rounds, progress=False)
    speeds = {
        name: {
            "decode_tokens_per_s": s.median("decode_tokens_per_s"),
            "prefill_tokens_per_s": s.median("prefill_tokens_per_s"),
            "decode_rounds": s.decode_tokens_per_s,
        }
        for name, s in speed.items()
    }
    info["load_during_speed"] = [load_speed, load_average()]
    info["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows, "speed": speeds}, indent=2))
    lines = [
        f"# int8 default: per-channel vs group-wise scales ({info['date']})",
        "",
        f"{info['cpu']}, {args.threads} threads, kernel `{info['kernels']}`; load average {info['load_before']} "
        f"before, {info['load_during_speed']} around the speed rounds.",
        "",
        "| scales | SmolLM2 ppl (Tempest) | vs float | decode tok/s | prefill tok/s | MiniLM cosine (mean / min) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    cos = {r["scales"]: r for r in rows if r["model"] == "minilm"}
    for r in rows:
        if r["model"] != "smollm2":
            continue
        s = speeds[r["scales"]]
        c = cos.get(r["scales"])
        cell = f"{c['mean']:.5f} / {c['min']:.5f}" if c else "—"
        lines.append(
            f"| {r['scales']} | {r['perplexity']:.3f} | {100 * r['delta']:+.2f}% | {s['decode_tokens_per_s']:.1f} | "
            f"{s['prefill_tokens_per_s']:.0f} | {cell} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
