"""Where a decode step's time goes, eager against compile_for_decode's two backends, by operator (SmolLM2).

Profiles ``model.generate`` (batch 1, greedy, ``--new-tokens`` tokens after a short prompt) under
``torch.profiler`` (CPU activities) for fastquant int8 (lm_head quantized too; ``--method int4``: symmetric group 32
layers and an int8 lm_head, as in e2e_cpu_decode.py) eager, compiled
(``backend="inductor"``) and ``backend="aoti"``, and reports
milliseconds per generated token by bucket: the fastquant ops, Inductor's generated kernels (``cpp_fused_*``:
RMSNorm, rotary, SiLU, residuals, fused by the compiler), attention, other aten ops, and what no operator
accounts for (Python, transformers' generate loop, dispatch, thread-pool wake-ups; profiler overhead included).

Run: ``python benchmarks/profile_decode.py`` (~3 minutes). Writes ``results/decode-profile-<UTC date>.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections import defaultdict

import torch
from e2e_cpu_decode import int4_with_int8_head
from run_info import cpu_environment, result_stem, write_report
from torch.profiler import ProfilerActivity, profile

import fastquant
from fastquant.app.models import load_model

BUCKETS = ("fastquant ops", "compiled kernels (cpp_fused)", "attention", "matmul (aten)", "other aten ops")


def bucket(name: str) -> str | None:
    if "attention" in name:  # fastquant::decode_attention included: the fastquant bucket is the linear layers
        return "attention"
    if name.startswith("fastquant::"):
        return "fastquant ops"
    if "cpp_fused" in name or name.startswith("cpp_"):
        return "compiled kernels (cpp_fused)"
    if name in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::bmm"):
        return "matmul (aten)"
    if name.startswith("aten::"):
        return "other aten ops"
    return None  # record_function ranges (generate, Torch-Compiled Region, ...) nest other ops: not counted


def profile_generate(model, prompt: torch.Tensor, new_tokens: int) -> dict:
    # eos_token_id=None: exactly new_tokens steps without min_new_tokens, whose logits processor runs an `isin`
    # over the whole vocabulary at every step (~0.5 ms per token on SmolLM2) that a user's generate does not.
    kwargs = dict(max_new_tokens=new_tokens, eos_token_id=None, do_sample=False, pad_token_id=0)
    # As users call it: generate applies no_grad itself.
    model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)  # warm-up
    start = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    unprofiled = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        wall = time.perf_counter() - start
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in prof.key_averages():
        b = bucket(event.key)
        if b is not None:
            totals[b] += event.self_cpu_time_total / 1e3  # ms
            calls[b] += event.count
    per_token = {b: totals[b] / new_tokens for b in BUCKETS}
    per_token["not in an operator (Python, generate, dispatch, profiler)"] = (
        wall * 1e3 - sum(totals.values())
    ) / new_tokens
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return {
        "unprofiled_ms_per_token": unprofiled * 1e3 / new_tokens,
        "profiled_ms_per_token": wall * 1e3 / new_tokens,
        "ms_per_token": per_token,
        "calls_per_token": {b: calls[b] / new_tokens for b in BUCKETS},
        "top_ops": [(e.key, e.self_cpu_time_total / 1e3 / new_tokens, e.count / new_tokens) for e in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", choices=("int8", "int4"), default="int8")
    parser.add_argument(
        "--int8-activations", action="store_true", help="every quantized layer rounds x to int8 per 32 columns"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    # Inductor's C++ kernels report themselves to the profiler only when asked to.
    torch._inductor.config.cpp.enable_kernel_profile = True
    loaded = load_model("smollm2")
    prompt = loaded.tokenizer("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    if args.method == "int4":
        eager = int4_with_int8_head(loaded.model, int8_activations=args.int8_activations)
    else:
        config = fastquant.Int8(int8_activations=args.int8_activations)
        eager = fastquant.patch(loaded.model, config, skip=(), quantize_tied=True)
    models = {"eager": eager}
    for name, backend in (("compiled", "inductor"), ("aoti", "aoti")):
        models[name] = fastquant.compile_for_decode(
            copy.deepcopy(eager), max_cache_len=prompt.shape[1] + args.new_tokens, backend=backend
        )
    load_before = os.getloadavg()
    results = {name: profile_generate(m, prompt, args.new_tokens) for name, m in models.items()}
    env = cpu_environment(load_before, new_tokens=args.new_tokens)
    rows = list(results["eager"]["ms_per_token"])
    rounding = ", x rounded to int8 per 32 columns (int8_activations)" if args.int8_activations else ""
    lines = [
        f"# SmolLM2-135M {args.method} decode profile: eager vs compile_for_decode "
        f"({env['cpu']}, {args.threads} threads)",
        "",
        f"torch {env['torch']}; `model.generate`, batch 1, greedy, {args.new_tokens} new tokens, "
        f"{args.method} layers, lm_head int8{rounding}; "
        f"ms per generated token (self CPU time of each bucket's operators). Load average "
        f"{load_before[0]:.2f} before, {env['load_average_after'][0]:.2f} after.",
        "",
        "| ms per token | " + " | ".join(models) + " |",
        "|---|" + "---:|" * len(models),
        "| unprofiled | " + " | ".join(f"{results[n]['unprofiled_ms_per_token']:.2f}" for n in models) + " |",
        "| profiled wall | " + " | ".join(f"{results[n]['profiled_ms_per_token']:.2f}" for n in models) + " |",
        *("| " + r + " | " + " | ".join(f"{results[n]['ms_per_token'][r]:.2f}" for n in models) + " |" for r in rows),
        "",
        "Top operators per token (self ms, calls):",
        "",
    ]
    for name in models:
        tops = ", ".join(f"`{k}` {ms:.2f} ({n:.0f})" for k, ms, n in results[name]["top_ops"])
        lines.append(f"- {name}: {tops}")
    stem = result_stem(
        args.out,
        ("decode-profile" if args.method == "int8" else f"decode-profile-{args.method}")
        + ("-x8" if args.int8_activations else ""),
    )
    write_report(stem, "\n".join(lines) + "\n", {"environment": env, "results": results})


if __name__ == "__main__":
    main()
