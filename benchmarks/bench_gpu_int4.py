"""GPU benchmark of fastquant.int4_linear against its peers, on the layer shapes of 1B-8B LLMs.

For every weight shape (N x K), row count M and int4 flavour (symmetric group 32, asymmetric group 128 by
default) it times, interleaved in rounds on the same inputs:

* ``int4``: ``torch.ops.fastquant.int4_linear`` as the dispatch table picks its kernel,
* ``int4 dequant+cuBLAS``: the same op with the GEMV and the fused GEMM switched off
  (``set_int4_cuda_gemv_max_m(0)``, ``set_int4_cuda_gemm_max_m(0)``) where the table picks one of them: the data
  that places the table's boundaries,
* ``int8``: ``torch.ops.fastquant.int8_linear`` per-channel (the format int4 must beat at decode),
* ``bf16``: ``F.linear`` on the bf16 weight (cuBLAS), the layer before quantization.

Timing as in bench_gpu_int8.py (its helpers are imported): CUDA events around batches after warm-up with the
GPU pre-filled by a sleep kernel, weight sets rotated through far more than the 50 MB L2 so every call streams
its weight from HBM. The median over rounds is reported, with the int4 format bytes (packed codes, scales,
offsets) per second and their fraction of the device-to-device copy bandwidth measured in the same run.

Writes ``<stem>.json`` and ``<stem>.md`` (default stem ``benchmarks/results/gpu-int4-<UTC date-time>``).
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F
from bench_gpu_int8 import (
    copy_bandwidth,
    fmt,
    gpu_time_per_call,
    header_lines,
    kernel_bench_sizes,
    run_meta,
    save_results,
)

import fastquant
from fastquant.kernels import extension, reference

SHAPES = [(4096, 4096), (11008, 4096), (4096, 14336), (14336, 4096), (1536, 576)]  # (N, K) = (out, in)
ROW_COUNTS = [1, 4, 16, 64, 256]
FLAVOURS = [(32, True), (128, False)]  # (group size, symmetric)
ROTATION_BYTES = 160 * 2**20  # int4 bytes of the weight sets rotated through per shape (> 3x the 50 MB L2)


def int4_format_bytes(n: int, k: int, group_size: int, symmetric: bool) -> int:
    groups = -(-k // group_size)
    return n * (-(-k // 64) * 32) + n * groups * 2 * (1 if symmetric else 2)


def interleaved(contenders: dict, rounds: int, repeats: int) -> dict:
    """Median seconds per call of each contender (name -> list of callables), timed round by round."""
    times = {name: [] for name in contenders}
    per_round = max(3, repeats // rounds)
    for _ in range(rounds):
        for name, calls in contenders.items():
            times[name].append(gpu_time_per_call(calls, per_round))
    return {name: statistics.median(ts) for name, ts in times.items()}


def int4_path(m: int, n: int, k: int, group_size: int) -> str:
    native = extension.native
    return native.cuda_dispatch.int4_path(
        m, n, k, group_size, "bfloat16", True, native.int4_cuda_gemv_max_m(), native.int4_cuda_gemm_max_m()
    )


def bench_shape(n, k, row_counts, flavours, rounds, repeats, copy_bw):
    gen = torch.Generator(device="cuda").manual_seed(n * 31 + k)
    sets = max(2, math.ceil(2 * ROTATION_BYTES / (n * k)))  # int4 sets alone >= ROTATION_BYTES
    weights = [torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(sets)]
    int8 = [fastquant.int8_quantize(w, -1) for w in weights]
    int4 = {f: [reference.int4_quantize(w, f[0], f[1]) for w in weights] for f in flavours}
    native = extension.native
    rows = []
    for m in row_counts:
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        for (g, sym), packed in int4.items():
            calls = [
                lambda q=q, s=s, o=o, x=x, g=g: torch.ops.fastquant.int4_linear(x, q, s, o, None, k, g)
                for q, s, o in packed
            ]
            contenders = {
                "int4": calls,
                "int8": [lambda q=q, s=s, x=x: torch.ops.fastquant.int8_linear(x, q, s, None, -1) for q, s in int8],
                "bf16": [lambda w=w, x=x: F.linear(x, w) for w in weights],
            }
            path = int4_path(m, n, k, g)
            t = interleaved(contenders, rounds, repeats)
            t_deq = None
            if path != "cuda_int4_dequant_cublas":
                caps = native.int4_cuda_gemv_max_m(), native.int4_cuda_gemm_max_m()
                native.set_int4_cuda_gemv_max_m(0)
                native.set_int4_cuda_gemm_max_m(0)
                try:
                    t_deq = interleaved({"deq": calls}, rounds, repeats)["deq"]
                finally:
                    native.set_int4_cuda_gemv_max_m(caps[0])
                    native.set_int4_cuda_gemm_max_m(caps[1])
            fmt_bytes = int4_format_bytes(n, k, g, sym)
            row = {
                "n": n,
                "k": k,
                "m": m,
                "group_size": g,
                "symmetric": sym,
                "path": path,
                "t_int4_us": t["int4"] * 1e6,
                "t_int4_dequant_cublas_us": None if t_deq is None else t_deq * 1e6,
                "t_int8_us": t["int8"] * 1e6,
                "t_bf16_us": t["bf16"] * 1e6,
                "speedup_vs_int8": t["int8"] / t["int4"],
                "speedup_vs_bf16": t["bf16"] / t["int4"],
                "format_bytes": fmt_bytes,
                "format_gb_s": fmt_bytes / t["int4"] / 1e9,
                "fraction_of_copy_bw": fmt_bytes / t["int4"] / copy_bw,
            }
            rows.append(row)
            print(
                f"{n:>5}x{k:<5} M={m:<4} g={g:<3} {'sym ' if sym else 'asym'} {path:<34}"
                f" int4 {row['t_int4_us']:8.1f} us"
                f"  int8 {row['t_int8_us']:8.1f} us ({row['speedup_vs_int8']:.2f}x)  bf16 {row['t_bf16_us']:8.1f} us"
                f" ({row['speedup_vs_bf16']:.2f}x)  {row['format_gb_s']:6.0f} GB/s ({row['fraction_of_copy_bw']:.0%})",
                flush=True,
            )
    del weights, int8, int4
    torch.cuda.empty_cache()
    return rows


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = header_lines("GPU int4_linear benchmark", meta) + [
        f"- timing: median over {meta['rounds']} interleaved rounds of CUDA-event-timed batches, bf16 activations, "
        f"weights rotated through >= {ROTATION_BYTES >> 20} MiB of sets per shape (L2 is ~50 MB)",
        "- format bytes: packed codes + fp16 scales (+ fp16 offsets when asymmetric)",
        "",
        "| N x K | M | group | sym | kernel | int4 us | dequant+cuBLAS us | int8 us | bf16 us | vs int8 | vs bf16 "
        "| format GB/s | of copy BW |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']}x{r['k']} | {r['m']} | {r['group_size']} | {'yes' if r['symmetric'] else 'no'} | {r['path']} "
            f"| {r['t_int4_us']:.1f} | {fmt(r['t_int4_dequant_cublas_us'], '.1f')} | {r['t_int8_us']:.1f} "
            f"| {r['t_bf16_us']:.1f} | {r['speedup_vs_int8']:.2f}x | {r['speedup_vs_bf16']:.2f}x "
            f"| {r['format_gb_s']:.0f} | {r['fraction_of_copy_bw']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stem", help="output path without extension (default benchmarks/results/gpu-int4-<date>)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=25, help="timed batches per contender, over all rounds")
    parser.add_argument("--rows", default=",".join(map(str, ROW_COUNTS)), help="comma-separated M values")
    parser.add_argument(
        "--flavours", default=",".join(f"{g}{'s' if s else 'a'}" for g, s in FLAVOURS), help="e.g. 32s,128a"
    )
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="comma-separated NxK")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_int4.py needs a CUDA device")
    if not extension.has_cuda_kernels():
        raise SystemExit("bench_gpu_int4.py needs fastquant built with its CUDA kernels")

    copy_bw = copy_bandwidth(10)
    stem, meta = run_meta(args.stem, "gpu-int4", copy_bw, rounds=args.rounds, repeats=args.repeats)
    row_counts, shapes = kernel_bench_sizes(args)
    flavours = [(int(f[:-1]), f[-1] == "s") for f in args.flavours.split(",")]
    rows = []
    for n, k in shapes:
        rows += bench_shape(n, k, row_counts, flavours, args.rounds, args.repeats, copy_bw)
        save_results(stem, meta, rows, to_markdown(meta, rows))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
