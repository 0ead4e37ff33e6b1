"""Decode-step profile of SmolLM2-135M (2 threads): python benchmarks/results/smollm2-profile-2026-11-22.py OUT.json"""

import copy
import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from fastquant.evaluate import METHODS, decode_speed
from fastquant.models import load_model, read_text

torch.set_num_threads(2)
L = load_model("smollm2")
prompt = L.tokenizer(read_text(), return_tensors="pt").input_ids[:, :32]
N = 32


def loop(model, steps):
    cache = DynamicCache(config=model.config)
    out = model(prompt, past_key_values=cache, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(tok, past_key_values=out.past_key_values, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / steps


def cat(name):
    if name.startswith("fastquant::"):
        return "fastquant.int8_linear"
    if name in ("aten::addmm", "aten::mm", "aten::matmul", "aten::linear"):
        return "float matmul (aten::mm/addmm)"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention (sdpa)"
    if name in ("aten::cat", "aten::index_select", "aten::embedding", "aten::copy_", "aten::contiguous", "aten::clone"):
        return "copies/cat/embedding"
    return "other aten ops (norm, rope, silu, mul, add, argmax...)"


res = {}
for name in ["float32", "int8", "int8+lm_head"]:
    model = L.model if name == "float32" else METHODS[name].apply(copy.deepcopy(L.model), None)
    with torch.inference_mode():
        loop(model, 4)
        wall = min(loop(model, N) for _ in range(2))
        gen = decode_speed(model, prompt, 64)["decode_ms_per_token"] / 1000
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            pwall = loop(model, N)
    buckets = {}
    for e in prof.key_averages():
        c = cat(e.key)
        buckets[c] = buckets.get(c, 0) + e.self_cpu_time_total / 1e3 / N  # ms per step
    ops_ms = sum(buckets.values())
    buckets["Python / HF modeling overhead (wall - op time)"] = pwall * 1e3 - ops_ms
    res[name] = {
        "wall_ms_manual_loop": wall * 1e3,
        "ms_per_token_generate": gen * 1e3,
        "profiled_wall_ms": pwall * 1e3,
        "buckets_ms": buckets,
        "top_ops": [
            (e.key, e.count // N, round(e.self_cpu_time_total / 1e3 / N, 3))
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        ],
    }
    print(name, json.dumps(res[name], indent=1), flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(res, f, indent=1)
