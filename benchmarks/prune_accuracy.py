"""Perplexity of SmolLM2-135M pruned by magnitude / Wanda / SparseGPT: 50% unstructured, 2:4, int8 + 50%.

Float32 on CPU, the demo's evaluation (first 4096 tokens of the embedded Tempest, window 512, stride 256),
calibration on the embedded Hamlet (a different play). Embeddings and the (tied) lm_head stay dense.

    python benchmarks/prune_accuracy.py                       # the full table, ~30-60 min on 2 busy cores
    python benchmarks/prune_accuracy.py --only sparsegpt --n-sequences 64 --damp 0.05   # tuning runs

Writes benchmarks/results/pruning-accuracy-<date>.{json,md}; the JSON is rewritten after every row, so an
interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch
from run_info import commit, load_averages, report_header

from fastquant.algorithms import pruning
from fastquant.app.evaluate import perplexity
from fastquant.app.models import load_model, read_text

CONFIGS = {  # label -> (sparsity, pattern, int8)
    "50% unstructured": (0.5, "unstructured", False),
    "2:4": (None, "2:4", False),
    "int8 + 50% unstructured": (0.5, "unstructured", True),
}
TARGETS = {"50% unstructured": 1.3, "2:4": 2.0, "int8 + 50% unstructured": 1.35}
METHODS = ("sparsegpt", "wanda", "magnitude")  # run order: the slow, target-bearing rows first


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        *report_header("Pruning accuracy: SmolLM2-135M on The Tempest", "prune_accuracy.py", result, "float32"),
        f"Perplexity: `fastquant.app.evaluate.perplexity`, first {s['ppl_tokens']} tokens of the embedded Tempest, "
        f"window {s['window']}, stride {s['window'] // 2} (as `fastquant demo`). Calibration (Wanda, SparseGPT): "
        f"{s['n_sequences']} windows x {s['seq_len']} tokens spread over the embedded Hamlet (whole play), "
        f"sequential (each layer group sees the already-pruned model), SparseGPT block {s['block_size']}, "
        f"dampening {s['damp']} x mean diag(H), "
        + ("fitted to the dense model's output on its inputs (dense target), " if s.get("dense_target") else "")
        + (
            f"kept weights refitted by least squares ({s['refit_iterations']} CG iterations). "
            if s.get("refit_iterations")
            else "no refit. "
        )
        + "All linear layers of the 30 blocks pruned (210 layers); embeddings and the tied lm_head stay dense. "
        "int8: per-channel symmetric (SparseGPT rounds in its column loop with the mask fixed, after the refit; "
        "magnitude/Wanda prune, then quantize).",
        "",
        "| method | pattern | perplexity | x float | target | met | calibration + pruning s | threads | load before |",
        "|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in result["rows"]:
        target = TARGETS.get(r["config"])
        met = "" if target is None or r["method"] == "magnitude" else ("yes" if r["ratio"] <= target else "**no**")
        lines.append(
            f"| {r['method']} | {r['config']} | {r['perplexity']:.3f} | {r['ratio']:.3f} | "
            f"{'' if target is None else f'<= {target}'} | {met} | {r['prune_s']:.0f} | "
            f"{r.get('threads', s['threads'])} | {r['load']} |"
        )
    return "\n".join(lines) + "\n"


def merge(paths: list[Path], output: Path) -> None:
    results = [json.loads(p.read_text()) for p in paths]
    first = results[0]

    def accuracy_settings(result: dict) -> dict:  # the thread count changes timings, not perplexities
        return {k: v for k, v in result["settings"].items() if k != "threads"}

    for other in results[1:]:
        if accuracy_settings(other) != accuracy_settings(first):
            raise SystemExit(f"settings differ: {first['settings']} vs {other['settings']}")
    rows = {
        (r["method"], r["config"]): dict(r, threads=res["settings"]["threads"]) for res in results for r in res["rows"]
    }
    order = {m: i for i, m in enumerate(("float32", *METHODS))}
    merged = dict(first, rows=sorted(rows.values(), key=lambda r: order[r["method"]]))
    merged["settings"] = dict(first["settings"], threads=" / ".join(str(r["settings"]["threads"]) for r in results))
    merged["commit"] = ", ".join(dict.fromkeys(r["commit"] for r in results))
    stem = output / f"pruning-accuracy-{first['date']}"
    stem.with_suffix(".json").write_text(json.dumps(merged, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(merged))
    print(markdown(merged))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--n-sequences", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--damp", type=float, default=pruning.SPARSEGPT_DAMP)
    parser.add_argument("--block-size", type=int, default=pruning.SPARSEGPT_BLOCK_SIZE)
    parser.add_argument(
        "--refit-iterations", type=int, default=pruning.REFIT_ITERATIONS, help="0: SparseGPT without the refit"
    )
    parser.add_argument(
        "--no-dense-target", action="store_true", help="fit each layer to its own weight, not the dense model's output"
    )
    parser.add_argument("--only", nargs="*", choices=METHODS, help="methods to run (default: all)")
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS), help="configs to run (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--tag", default="", help="suffix of the result file names (tuning runs)")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="combine result files of runs with the same settings (e.g. methods run in parallel) and exit",
    )
    args = parser.parse_args()
    if args.merge:
        merge([Path(p) for p in args.merge], Path(args.output))
        return

    torch.set_num_threads(args.threads)
    pruning.SPARSEGPT_DAMP = args.damp
    pruning.SPARSEGPT_BLOCK_SIZE = args.block_size
    pruning.REFIT_ITERATIONS = args.refit_iterations
    pruning.DENSE_TARGET = not args.no_dense_target
    date = datetime.date.today().isoformat()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"pruning-accuracy-{date}{args.tag}"

    loaded = load_model("smollm2")
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer(read_text(), return_tensors="pt").input_ids[0][: args.ppl_tokens]
    calibration = pruning.calibration_from_text(tokenizer, n_sequences=args.n_sequences, seq_len=args.seq_len)

    result = {
        "date": date,
        "commit": commit(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "settings": {
            "ppl_tokens": args.ppl_tokens,
            "window": args.window,
            "n_sequences": args.n_sequences,
            "seq_len": args.seq_len,
            "damp": args.damp,
            "block_size": args.block_size,
            "refit_iterations": args.refit_iterations,
            "dense_target": not args.no_dense_target,
            "threads": args.threads,
        },
        "rows": [],
    }

    def record(row: dict) -> None:
        result["rows"].append(row)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(result))
        print(
            f"{row['method']:>10} {row['config']:<24} ppl {row['perplexity']:8.3f}  x{row['ratio']:.3f}  "
            f"prune {row['prune_s']:6.1f} s  load {row['load']}",
            flush=True,
        )

    load = load_averages(1)
    start = time.perf_counter()
    base = perplexity(model, ids, window=args.window, stride=args.window // 2)
    record(
        dict(
            method="float32",
            config="dense",
            perplexity=base,
            ratio=1.0,
            prune_s=0.0,
            ppl_s=time.perf_counter() - start,
            load=load,
        )
    )
    for method in args.only or METHODS:
        for label in args.configs or CONFIGS:
            sparsity, pattern, int8 = CONFIGS[label]
            pruned = copy.deepcopy(model)
            load = load_averages(1)
            start = time.perf_counter()
            layers = pruning.prune_layers(
                pruned,
                pruning.prunable_layers(pruned),
                sparsity=sparsity,
                pattern=pattern,
                pruning=method,
                calibration=calibration,
                int8=int8,
                progress=False,
            )
            prune_s = time.perf_counter() - start
            kept = sum(int(r.mask.sum()) for r in layers.values())
            total = sum(r.mask.numel() for r in layers.values())
            start = time.perf_counter()
            ppl = perplexity(pruned, ids, window=args.window, stride=args.window // 2)
            record(
                dict(
                    method=method,
                    config=label,
                    perplexity=ppl,
                    ratio=ppl / base,
                    prune_s=prune_s,
                    ppl_s=time.perf_counter() - start,
                    layers=len(layers),
                    sparsity=1 - kept / total,
                    load=load,
                )
            )
            del pruned


if __name__ == "__main__":
    main()
