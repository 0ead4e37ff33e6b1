"""GPU benchmark of fastquant.int8_linear against its peers, on the layer shapes of 1B-8B LLMs.

For every weight shape (N x K) and row count M it times, in the same run and on the same inputs:

* ``fastquant``: ``torch.ops.fastquant.int8_linear`` (per-channel scales, and group size 128),
* ``bf16``: ``F.linear`` on the bf16 weight (cuBLAS), the layer before quantization,
* ``compiled``: ``torch.compile`` of "cast int8 to bf16, matmul, multiply by the scales", which is what
  torchao's int8 weight-only quantization runs.

Timing: CUDA events around a batch of calls after warm-up, with the GPU first held busy
(``torch.cuda._sleep``) so that the CPU has queued the whole batch before the first call starts: the
events measure GPU time, not Python launch overhead. Each call uses the next of several weight sets whose
total is far above the 50 MB L2, so every call streams its weight from HBM as in a real model. The median
of many batches is reported, with the weight bytes per second and their fraction of the device-to-device
copy bandwidth measured in the same run (read + write bytes of a 1 GiB copy).

Writes ``<stem>.json`` and ``<stem>.md`` (default stem ``benchmarks/results/gpu-<UTC date-time>``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

import fastquant
from fastquant.kernels import extension

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (1536, 576)]  # (N, K) = (out, in) features
LARGE_SHAPES = SHAPES[:3]
ROW_COUNTS = [1, 2, 4, 8, 16, 32, 64, 256, 2048]
ROTATION_BYTES = 160 * 2**20  # int8 bytes of weight sets rotated through per shape (> 3x the 50 MB L2)
SLEEP_CYCLES_PER_CALL = 100_000  # ~50 us at ~2 GHz: more than the CPU needs to queue one call


def target_for(n: int, k: int, m: int) -> tuple[float | None, float | None]:
    """(minimum speed-up over bf16 F.linear, minimum fraction of copy bandwidth) the issue asks for."""
    if (n, k) not in LARGE_SHAPES:
        return None, None
    if m <= 8:
        return 1.9, 0.85
    if m <= 64:
        return 1.4, None
    if m >= 256:
        return 0.97, None
    return None, None


def gpu_time_per_call(calls, repeats: int, target_batch_s: float = 2e-3) -> float:
    """Median seconds per call of ``calls`` (a list of zero-argument callables used in rotation)."""
    for fn in calls[: max(3, min(len(calls), 8))]:  # warm-up: compile, autotune, allocator
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    # Size the batch so that one batch is ~2 ms of GPU work (event resolution is ~0.5 us).
    start.record()
    for fn in calls[:3]:
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = start.elapsed_time(end) / 1e3 / 3
    batch = int(min(64, max(1, target_batch_s / max(estimate, 1e-7))))
    times = []
    i = 0
    for _ in range(repeats):
        torch.cuda._sleep(SLEEP_CYCLES_PER_CALL * batch)
        start.record()
        for _ in range(batch):
            calls[i % len(calls)]()
            i += 1
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / batch)
    return statistics.median(times)


def copy_bandwidth(repeats: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write."""
    nbytes = 2**30
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = gpu_time_per_call([lambda: dst.copy_(src)], repeats, target_batch_s=20e-3)
    return 2 * nbytes / t


def driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def run_meta(stem: str | None, prefix: str, copy_bw: float, **extra) -> tuple[Path, dict]:
    """The output stem (``stem``, or benchmarks/results/<prefix>-<UTC time>) and the metadata of a GPU run: device,
    driver, versions, the measured copy bandwidth and ``extra``. Prints the bandwidth."""
    now = dt.datetime.now(dt.timezone.utc)
    path = Path(stem) if stem else Path(__file__).parent / "results" / f"{prefix}-{now:%Y%m%d-%H%M%S}"
    path.parent.mkdir(parents=True, exist_ok=True)
    build = extension.native.build_info() if extension.native is not None else {}
    props = torch.cuda.get_device_properties(0)
    meta = {
        "date": now.isoformat(timespec="seconds"),
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "driver": driver_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "fastquant": fastquant.__version__,
        "cuda_archs": build.get("cuda_archs"),
        "copy_bw_gb_s": copy_bw / 1e9,
        **extra,
    }
    print(f"{meta['gpu']}: copy bandwidth {meta['copy_bw_gb_s']:.0f} GB/s (read + write)", flush=True)
    return path, meta


def header_lines(title: str, meta: dict) -> list[str]:
    """The first lines of a GPU results file: title, device, versions, copy bandwidth."""
    return [
        f"# {title}, {meta['date']}",
        "",
        f"- GPU: {meta['gpu']} ({meta['sms']} SMs), driver {meta['driver']}",
        f"- torch {meta['torch']} (CUDA {meta['torch_cuda']}), fastquant {meta['fastquant']}, "
        f"kernels built for {meta['cuda_archs']}",
        f"- device-to-device copy bandwidth (read + write): {meta['copy_bw_gb_s']:.0f} GB/s",
    ]


def _dequant_matmul(x, qweight, scales):
    # torchao int8 weight-only: cast the int8 weight to the activation dtype inside the matmul, then scale.
    return F.linear(x, qweight.to(x.dtype)) * scales.to(x.dtype)


def bench_shape(n, k, row_counts, group_sizes, repeats, compiled_fn, copy_bw):
    gen = torch.Generator(device="cuda").manual_seed(n * 31 + k)
    sets = max(2, math.ceil(ROTATION_BYTES / (n * k)))
    weights = [torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(sets)]
    quantized = {g: [fastquant.int8_quantize(w, g) for w in weights] for g in group_sizes}
    rows = []
    for m in row_counts:
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        t_bf16 = gpu_time_per_call([lambda w=w, x=x: F.linear(x, w) for w in weights], repeats)
        t_compiled = None
        if compiled_fn is not None:
            per_channel = quantized[-1] if -1 in quantized else [fastquant.int8_quantize(w, -1) for w in weights]
            try:
                t_compiled = gpu_time_per_call(
                    [lambda q=q, s=s, x=x: compiled_fn(x, q, s) for q, s in per_channel], repeats
                )
            except Exception as exc:  # a compile failure must not lose the rest of the table
                print(f"torch.compile peer failed for {n}x{k} M={m}: {type(exc).__name__}: {exc}")
        for g in group_sizes:
            qs = quantized[g]
            calls = [lambda q=q, s=s, x=x, g=g: torch.ops.fastquant.int8_linear(x, q, s, None, g) for q, s in qs]
            t = gpu_time_per_call(calls, repeats)
            path = extension.int8_linear_kernel_path(torch.device("cuda"), m, n, k, g, torch.bfloat16)
            # Where the GEMV or the fused GEMM runs, also time dequantize + cuBLAS at the same M: the data that
            # places the boundaries of the dispatch table (csrc/cuda/int8_linear_dispatch.h).
            t_deq = None
            if extension.has_cuda_kernels() and path != "cuda_dequant_cublas":
                native = extension.native
                gemv_max, gemm_max = native.cuda_gemv_max_m(), native.cuda_gemm_max_m()
                native.set_cuda_gemv_max_m(0)
                native.set_cuda_gemm_max_m(0)
                try:
                    t_deq = gpu_time_per_call(calls, repeats)
                finally:
                    native.set_cuda_gemv_max_m(gemv_max)
                    native.set_cuda_gemm_max_m(gemm_max)
            weight_bytes = n * k + qs[0][1].numel() * 4
            speedup_min, copy_min = target_for(n, k, m) if g == -1 else (None, None)
            frac = weight_bytes / t / copy_bw
            met = None
            if speedup_min is not None:
                met = t_bf16 / t >= speedup_min and (copy_min is None or frac >= copy_min)
            rows.append(
                {
                    "n": n,
                    "k": k,
                    "m": m,
                    "group_size": g,
                    "path": path,
                    "t_fastquant_us": t * 1e6,
                    "t_bf16_us": t_bf16 * 1e6,
                    "t_compiled_us": None if t_compiled is None else t_compiled * 1e6,
                    "t_dequant_cublas_us": None if t_deq is None else t_deq * 1e6,
                    "speedup_vs_bf16": t_bf16 / t,
                    "speedup_vs_compiled": None if t_compiled is None else t_compiled / t,
                    "weight_gb_s": weight_bytes / t / 1e9,
                    "bf16_weight_gb_s": 2 * n * k / t_bf16 / 1e9,
                    "fraction_of_copy_bw": frac,
                    "target_speedup_vs_bf16": speedup_min,
                    "target_fraction_of_copy_bw": copy_min,
                    "target_met": met,
                }
            )
            r = rows[-1]
            print(
                f"{n:>5}x{k:<5} M={m:<4} g={g:<4} {r['path']:<26} fastquant {r['t_fastquant_us']:9.1f} us  "
                f"bf16 {r['t_bf16_us']:9.1f} us ({r['speedup_vs_bf16']:.2f}x)  compiled "
                + (
                    "    n/a"
                    if t_compiled is None
                    else f"{r['t_compiled_us']:9.1f} us ({r['speedup_vs_compiled']:.2f}x)"
                )
                + f"  {r['weight_gb_s']:7.0f} GB/s ({frac:.0%} of copy)"
                + ("" if met is None else ("  target met" if met else "  TARGET MISSED")),
                flush=True,
            )
    del weights, quantized
    torch.cuda.empty_cache()
    return rows


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def targets_summary(rows: list[dict]) -> list[str]:
    """The line under a results table: how many of the rows that have a target met it."""
    judged = [r for r in rows if r["target_met"] is not None]
    return ["", f"Targets met: {sum(r['target_met'] for r in judged)} of {len(judged)}.", ""]


def start_run(script: str, args: argparse.Namespace, prefix: str, **extra) -> tuple[float, Path, dict]:
    """What every GPU kernel benchmark does first: refuse to run without a CUDA device, warn when the reference
    kernel stands in for missing CUDA kernels, measure the copy bandwidth. Returns it, the output stem and the
    run's metadata (run_meta, with ``extra``)."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA device")
    if not extension.has_cuda_kernels():
        print("WARNING: fastquant has no CUDA kernels built: timing the pure-PyTorch reference kernel")
    copy_bw = copy_bandwidth(max(5, args.repeats // 2))
    return copy_bw, *run_meta(args.stem, prefix, copy_bw, repeats=args.repeats, **extra)


def kernel_bench_parser(description: str, prefix: str, shapes, row_counts) -> argparse.ArgumentParser:
    """The options every GPU kernel benchmark takes (the script adds its own): the output stem (default
    benchmarks/results/<prefix>-<date>), the timed batches and the row counts M and weight shapes NxK to time,
    by default the script's ``row_counts`` and ``shapes``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--stem", help=f"output path without extension (default benchmarks/results/{prefix}-<date>)")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--rows", default=",".join(map(str, row_counts)), help="comma-separated M values")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in shapes), help="comma-separated NxK")
    return parser


def kernel_bench_sizes(args: argparse.Namespace) -> tuple[list[int], list[tuple[int, ...]]]:
    """The row counts M and the (N, K) shapes of a :func:`kernel_bench_parser` command line."""
    return [int(v) for v in args.rows.split(",")], [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]


def save_results(stem: Path, meta: dict, rows: list[dict], markdown: str) -> None:
    """Writes what a run has measured so far to <stem>.json and <stem>.md: rewritten after every shape, so that a
    run stopped by its time limit keeps what it measured."""
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown)


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = header_lines("GPU int8_linear benchmark", meta) + [
        f"- timing: median of {meta['repeats']} batches of CUDA-event-timed calls, GPU pre-filled with a sleep "
        f"kernel, weights rotated through >= {ROTATION_BYTES >> 20} MiB of int8 sets per shape (L2 is ~50 MB)",
        "- peers: bf16 = F.linear on the bf16 weight (cuBLAS); compiled = torch.compile(F.linear(x, q.to(bf16)) "
        f"* scales) (torchao int8 weight-only), mode {meta['compiled_peer']}",
        "",
        "- dequant+cuBLAS us: the same op with the GEMV and the GEMM switched off (set_cuda_gemv_max_m(0), "
        "set_cuda_gemm_max_m(0)) where the table picks one of them: where it is lower, the table should move",
        "",
        "| N x K | M | group | kernel | fastquant us | bf16 us | compiled us | dequant+cuBLAS us | vs bf16 "
        "| vs compiled | weight GB/s | of copy BW | target | met |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        target = ""
        if r["target_speedup_vs_bf16"] is not None:
            target = f">= {r['target_speedup_vs_bf16']}x"
            if r["target_fraction_of_copy_bw"] is not None:
                target += f", >= {r['target_fraction_of_copy_bw']:.0%} BW"
        met = "" if r["target_met"] is None else ("yes" if r["target_met"] else "**NO**")
        lines.append(
            f"| {r['n']}x{r['k']} | {r['m']} | {r['group_size']} | {r['path']} | {r['t_fastquant_us']:.1f} "
            f"| {r['t_bf16_us']:.1f} | {fmt(r['t_compiled_us'], '.1f')} | {fmt(r['t_dequant_cublas_us'], '.1f')} "
            f"| {r['speedup_vs_bf16']:.2f}x "
            f"| {fmt(r['speedup_vs_compiled'], '.2f')}{'' if r['speedup_vs_compiled'] is None else 'x'} "
            f"| {r['weight_gb_s']:.0f} | {r['fraction_of_copy_bw']:.0%} | {target} | {met} |"
        )
    lines += targets_summary(rows)
    return "\n".join(lines)


def main() -> None:
    parser = kernel_bench_parser(__doc__.splitlines()[0], "gpu", SHAPES, ROW_COUNTS)
    parser.add_argument("--group-sizes", default="-1,128", help="comma-separated group sizes (-1: per-channel)")
    parser.add_argument(
        "--compiled-peer",
        choices=["dynamic", "static", "off"],
        default="dynamic",
        help="torch.compile the dequantize-matmul peer with dynamic shapes (one compile), static (one per shape "
        "and M: slow to compile), or skip it",
    )
    args = parser.parse_args()
    copy_bw, stem, meta = start_run("bench_gpu_int8.py", args, "gpu", compiled_peer=args.compiled_peer)

    compiled_fn = None
    if args.compiled_peer != "off":
        compiled_fn = torch.compile(_dequant_matmul, dynamic=args.compiled_peer == "dynamic")
    row_counts, shapes = kernel_bench_sizes(args)
    group_sizes = [int(v) for v in args.group_sizes.split(",")]
    rows = []
    for n, k in shapes:
        rows += bench_shape(n, k, row_counts, group_sizes, args.repeats, compiled_fn, copy_bw)
        save_results(stem, meta, rows, to_markdown(meta, rows))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
