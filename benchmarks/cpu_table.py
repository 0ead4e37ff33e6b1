"""CPU benchmark of fastquant.int8_linear against its peers: prints a markdown table and writes results.

For every weight shape (N x K) and row count M it times, in the same run:

* ``fastquant``: ``fastquant.int8_linear`` with fp32 activations and per-channel scales,
* ``fastquant g128``: the same with group size 128,
* ``fp32``: ``F.linear`` on the fp32 weight (MKL), the layer before quantization,
* ``bf16``: ``F.linear`` with bf16 activations and weight (oneDNN, AVX512-BF16),
* ``fbgemm``: ``torch.ao.quantization.quantize_dynamic`` of the ``nn.Linear`` (int8 weight, activations
  quantized per call).

Each peer rotates through several copies of its weight (>= 160 MB in all, 5x the 32 MB L3), so every call
streams its weight from DRAM as in a real model. Time per peer is the median of many single calls after
warm-up (fewer repeats for the slow fp32 prefill cells). The fastquant weight GB/s is compared with torch's
own read bandwidth (``sum`` of a float64 buffer of the same byte size, also rotated) measured in the same run.

Run: ``python benchmarks/cpu_table.py`` (about 3-4 minutes on 2 cores). Writes
``benchmarks/results/cpu-<UTC date>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastquant
from fastquant.app.evaluate import cpu_model
from fastquant.kernels import extension, reference

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 576), (576, 1536)]  # (N, K) = (out, in)
ROW_COUNTS = [1, 8, 128, 512]
ROTATION_BYTES = 160 * 2**20
MAX_COPIES = 64
PEERS = ["fastquant", "fastquant_g128", "fp32", "bf16", "fbgemm"]


def copies_for(nbytes: int) -> int:
    return max(2, min(MAX_COPIES, math.ceil(ROTATION_BYTES / nbytes)))


def make_calls(peer: str, n: int, k: int, m: int, seed: int = 0) -> tuple[list, int]:
    """Zero-argument callables (one per weight copy) for ``peer``, and the weight bytes one call reads."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    calls = []
    if peer.startswith("fastquant"):
        group = 128 if peer.endswith("g128") else -1
        weight = torch.randn(n, k, generator=gen)
        qweight, scales = reference.int8_quantize(weight, group)
        nbytes = qweight.numel() + scales.numel() * 4
        for i in range(copies_for(nbytes)):
            q = qweight if i == 0 else qweight.roll(i, dims=0).contiguous()
            calls.append(lambda q=q: fastquant.int8_linear(x, q, scales, None, group))
    elif peer in ("fp32", "bf16"):
        dtype = torch.float32 if peer == "fp32" else torch.bfloat16
        xd = x.to(dtype)
        nbytes = n * k * (4 if peer == "fp32" else 2)
        for _ in range(copies_for(nbytes)):
            w = torch.randn(n, k, generator=gen).to(dtype)
            calls.append(lambda w=w: F.linear(xd, w))
    elif peer == "fbgemm":
        nbytes = n * k
        for _ in range(copies_for(nbytes)):
            lin = nn.Linear(k, n, bias=False)
            qlin = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
            calls.append(lambda qlin=qlin: qlin(x))
    else:
        raise ValueError(peer)
    return calls, nbytes


def median_seconds(calls, budget_s: float = 0.6, min_runs: int = 5, max_runs: int = 60) -> float:
    """Median of single timed calls in rotation, after warm-up."""
    for fn in calls[: max(2, min(len(calls), 4))]:
        fn()
    t0 = time.perf_counter()
    calls[0]()
    estimate = time.perf_counter() - t0
    runs = int(max(min_runs, min(max_runs, budget_s / max(estimate, 1e-6))))
    times = []
    with torch.inference_mode():
        for i in range(runs):
            fn = calls[(i + 1) % len(calls)]
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def read_bandwidth(nbytes: int) -> float:
    """torch's read bandwidth (bytes/s) of ``sum`` over a float64 buffer of ``nbytes``, rotated.

    float64: on this Zen 5 the fp32 ``sum`` is limited by its own arithmetic (~50 GB/s) while the float64
    one reaches ~75-80 GB/s, closer to what DRAM delivers to a pure read.
    """
    bufs = [torch.rand(max(1, nbytes // 8), dtype=torch.float64) for _ in range(copies_for(nbytes))]
    t = median_seconds([lambda b=b: b.sum() for b in bufs], budget_s=0.3, min_runs=20, max_runs=200)
    return nbytes / t


def run(shapes, row_counts, peers) -> list[dict]:
    rows = []
    for n, k in shapes:
        bw = None
        for m in row_counts:
            row = {"n": n, "k": k, "m": m, "ms": {}}
            for peer in peers:
                calls, nbytes = make_calls(peer, n, k, m)
                row["ms"][peer] = median_seconds(calls) * 1e3
                if peer == "fastquant":
                    row["weight_bytes"] = nbytes
                    if bw is None:
                        bw = read_bandwidth(nbytes)
                del calls
            row["path"] = extension.int8_linear_kernel_path(torch.device("cpu"), m, n, k, -1, torch.float32)
            row["read_gbs"] = bw / 1e9 if bw else None
            if "fastquant" in row["ms"]:
                row["fq_gbs"] = row["weight_bytes"] / row["ms"]["fastquant"] / 1e6
            rows.append(row)
            print(format_row(row, peers), flush=True)
    return rows


HEADER_PEERS = {"fastquant": "fq", "fastquant_g128": "fq g128", "fp32": "fp32", "bf16": "bf16", "fbgemm": "fbgemm"}


def run_meta(now: dt.datetime) -> dict:
    """Date, CPU, versions, threads and best ISA of a CPU benchmark run."""
    return {
        "date_utc": now.isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "fastquant": fastquant.__version__,
        "threads": torch.get_num_threads(),
        "isa": extension.native.best_cpu_isa() if extension.native is not None else None,
    }


def table_header(peers) -> str:
    cols = ["N x K", "M", "fq path"] + [f"{HEADER_PEERS[p]} ms" for p in peers]
    cols += [f"{HEADER_PEERS[p]} / fq" for p in peers if p != "fastquant"]
    cols += ["fq weight GB/s", "read GB/s", "fraction"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * 3 + "---:|" * (len(cols) - 3)


def format_row(row: dict, peers) -> str:
    ms = row["ms"]
    cells = [f"{row['n']} x {row['k']}", str(row["m"]), row["path"]]
    cells += [f"{ms[p]:.3f}" for p in peers]
    cells += [f"{ms[p] / ms['fastquant']:.2f}x" for p in peers if p != "fastquant"]
    fq_gbs, read_gbs = row.get("fq_gbs"), row.get("read_gbs")
    cells += [f"{fq_gbs:.1f}", f"{read_gbs:.1f}", f"{fq_gbs / read_gbs:.2f}"] if read_gbs else ["", "", ""]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/cpu-<UTC date>)")
    parser.add_argument("--quick", action="store_true", help="two shapes, M = 1 and 512 only")
    args = parser.parse_args()
    shapes, row_counts = (SHAPES[1:2] + SHAPES[3:4], [1, 512]) if args.quick else (SHAPES, ROW_COUNTS)
    now = dt.datetime.now(dt.timezone.utc)
    stem = Path(args.out or Path(__file__).parent / "results" / f"cpu-{now:%Y-%m-%d}")
    meta = run_meta(now)
    print(f"{meta['cpu']}, torch {meta['torch']}, {meta['threads']} threads, ISA {meta['isa']}\n")
    print(table_header(PEERS))
    start = time.perf_counter()
    rows = run(shapes, row_counts, PEERS)
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    lines = [
        f"# CPU int8_linear benchmark, {meta['date_utc']}",
        "",
        f"{meta['cpu']}, torch {meta['torch']}, {meta['threads']} threads, best ISA {meta['isa']}. "
        "Median ms per call, weights rotated from DRAM; fp32 activations except the bf16 peer. "
        "`peer / fq` > 1 means fastquant is faster. `fraction` = fastquant weight GB/s over torch's `sum` "
        "(float64) read bandwidth of a same-sized buffer in the same run.",
        "",
        table_header(PEERS),
        *(format_row(r, PEERS) for r in rows),
        "",
    ]
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text("\n".join(lines))
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {stem}.md / .json in {meta['wall_s']} s")


if __name__ == "__main__":
    main()
