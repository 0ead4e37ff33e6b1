"""CPU benchmark of fastquant's sparse kernels (bitmap16 and csr16 weights) against their peers: prints markdown
tables and writes results.

For every weight shape (N x K), row count M and sparsity it times, in the same run:

* ``sparse``: ``fastquant.ops.sparse_linear`` with fp32 values (the pruned float weight, exact),
* ``int8+sparse``: the same with int8 values and per-channel scales,
* ``csr16`` / ``int8+csr16``: ``fastquant.ops.sparse_csr_linear`` on the same values with 16-bit column
  indices instead of the masks (the layout the kernel choice takes where it is faster),
* ``csr``: torch's CSR sparse matmul, ``F.linear(x, weight.to_sparse_csr())`` (fp32; on this torch build
  ``torch.sparse.mm(W_csr, x.T)`` takes the same time: both reach the same CPU CSR kernel),
* ``fp32``: dense ``F.linear`` on the fp32 weight (MKL), the layer before pruning,
* ``int8``: dense ``fastquant.int8_linear`` (per-channel scales), the layer quantized but not pruned.

Sparsity patterns: 50/70/90% unstructured (uniformly random mask) and 2:4 (2 kept of every 4 columns).
Each peer rotates through several copies of its weight, offsets and masks included (>= 160 MB in all, 5x the
32 MB L3), so every call streams its weight from DRAM as in a real model; time per peer is the median of many
single calls after warm-up, the peers of a cell taking turns call by call. ``GB/s`` is the format's bytes
(values + masks + row offsets + scales) over the time, next to torch's own read bandwidth (``sum`` of a
float64 buffer, rotated) in the same run. A sweep over sparsity (M = 1, 4096 x 4096) finds where the sparse
formats start to beat dense int8. ``best`` columns take the faster layout of each value type, as the per-layer
kernel choice does.

Run: ``python benchmarks/sparse_table.py`` (``--quick``: two shapes, M = 1; ``--decode``: every shape at M = 1,
and the sweep). Writes
``benchmarks/results/cpu-sparse-<UTC date>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from cpu_table import read_bandwidth, run_meta

import fastquant
from fastquant.kernels import extension, reference

SHAPES = [(4096, 4096), (11008, 4096), (1536, 576), (576, 1536)]  # (N, K) = (out, in)
ROW_COUNTS = [1, 8, 128]
PATTERNS = ["50%", "70%", "90%", "2:4"]
SWEEP = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
ROTATION_BYTES = 160 * 2**20
MAX_COPIES = 1024
DENSE_PEERS = ["fp32", "int8"]
SPARSE_PEERS = ["sparse", "int8+sparse", "csr16", "int8+csr16", "csr"]
BEST = {"sparse": ("sparse", "csr16"), "int8+sparse": ("int8+sparse", "int8+csr16")}  # per value type
CSR_MAX_M = 8  # torch's CSR kernel takes seconds per call at M = 128 on the large layers


def copies_for(nbytes: int) -> int:
    return max(2, min(MAX_COPIES, math.ceil(ROTATION_BYTES / max(nbytes, 1))))


def make_mask(n: int, k: int, pattern: str, gen: torch.Generator) -> torch.Tensor:
    if pattern == "2:4":
        scores = torch.rand(n, k // 4, 4, generator=gen)
        top = scores.topk(2, dim=2).indices
        return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, top, True).view(n, k)
    sparsity = float(pattern.rstrip("%")) / 100
    return torch.rand(n, k, generator=gen) >= sparsity


def packed_bytes(values: torch.Tensor, masks: torch.Tensor, row_offsets: torch.Tensor, scales) -> int:
    """Bytes one call reads: kept values, mask words, row offsets and scales (padding excluded)."""
    nnz = int(row_offsets[-1])
    total = nnz * values.element_size() + masks.numel() * 2 + row_offsets.numel() * 8
    return total + (scales.numel() * 4 if scales is not None else 0)


def make_calls(peer: str, n: int, k: int, m: int, pattern: str | None = None, seed: int = 0) -> tuple[list, int]:
    """Zero-argument callables (one per weight copy) for ``peer``, and the weight bytes one call reads."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    weight = torch.randn(n, k, generator=gen)
    calls = []
    if peer == "fp32":
        nbytes = n * k * 4
        copies = [weight] + [torch.randn(n, k, generator=gen) for _ in range(copies_for(nbytes) - 1)]
        calls = [lambda w=w: F.linear(x, w) for w in copies]
        return calls, nbytes
    if peer == "int8":
        qweight, scales = reference.int8_quantize(weight)
        nbytes = qweight.numel() + scales.numel() * 4
        for i in range(copies_for(nbytes)):
            q = qweight if i == 0 else qweight.roll(i, dims=0).contiguous()
            calls.append(lambda q=q: fastquant.int8_linear(x, q, scales, None, -1))
        return calls, nbytes
    mask = make_mask(n, k, pattern, gen)
    weight = weight * mask
    if peer == "csr":
        csr = weight.to_sparse_csr()
        nbytes = int(csr._nnz()) * (4 + 8) + (n + 1) * 8  # fp32 values, int64 column indices and row pointers
        copies = [csr] + [csr.clone() for _ in range(copies_for(nbytes) - 1)]
        return [lambda w=w: F.linear(x, w) for w in copies], nbytes
    scales = None
    if peer.startswith("int8+"):
        weight, scales = reference.int8_quantize(weight)
    values, masks, row_offsets = reference.sparse_pack(weight, mask)
    if peer.endswith("csr16"):
        indices = reference.sparse_column_indices(masks, k, values.numel())
        nbytes = packed_bytes(values, masks, row_offsets, scales) - masks.numel() * 2 + int(row_offsets[-1]) * 2
        for i in range(copies_for(nbytes)):
            v, ix, ro = (
                (values, indices, row_offsets) if i == 0 else (values.clone(), indices.clone(), row_offsets.clone())
            )
            calls.append(
                lambda v=v, ix=ix, ro=ro: fastquant.ops.sparse_csr_linear(x, v, ix, ro, scales, None, in_features=k)
            )
        return calls, nbytes
    nbytes = packed_bytes(values, masks, row_offsets, scales)
    for i in range(copies_for(nbytes)):
        v, mk, ro = (values, masks, row_offsets) if i == 0 else (values.clone(), masks.clone(), row_offsets.clone())
        calls.append(lambda v=v, mk=mk, ro=ro: fastquant.ops.sparse_linear(x, v, mk, ro, scales, None, in_features=k))
    return calls, nbytes


MIN_MS: dict[tuple, float] = {}  # fastest single call of every timed cell, kept in the JSON


def timed_interleaved(calls: dict[str, list], budget_s: float, min_rounds: int, max_rounds: int = 100) -> dict:
    """Median and minimum ms per peer of single calls, the peers taking turns call by call (each rotating
    through its own weight copies), so that the VM's drifting speed (up to ~1.5x within minutes here) hits
    every peer of a cell alike and their ratios are measured at the same moments. On a shared machine a
    call preempted mid-way shows up as a multiple of the scheduler tick, hence the minimum as well."""
    for peer_calls in calls.values():
        for fn in peer_calls[: max(2, min(len(peer_calls), 4))]:
            fn()
    t0 = time.perf_counter()
    for peer_calls in calls.values():
        peer_calls[0]()
    round_s = time.perf_counter() - t0
    rounds = int(max(min_rounds, min(max_rounds, budget_s / max(round_s, 1e-6))))
    times: dict[str, list[float]] = {peer: [] for peer in calls}
    for i in range(rounds):
        for peer, peer_calls in calls.items():
            fn = peer_calls[(i + 1) % len(peer_calls)]
            t = time.perf_counter()
            fn()
            times[peer].append(time.perf_counter() - t)
    return {peer: (statistics.median(t) * 1e3, min(t) * 1e3) for peer, t in times.items()}


def time_cell(peers: list[str], n: int, k: int, m: int, pattern: str) -> tuple[dict, dict]:
    """ms and bytes per call of every peer on one (shape, M, pattern) cell, timed interleaved."""
    calls, nbytes = {}, {}
    for peer in peers:
        calls[peer], nbytes[peer] = make_calls(peer, n, k, m, None if peer in DENSE_PEERS else pattern)
    timed = timed_interleaved(calls, budget_s=2.0, min_rounds=7)
    del calls
    for peer, (_, fastest) in timed.items():
        MIN_MS[(peer, n, k, m, pattern)] = fastest
    return {peer: median for peer, (median, _) in timed.items()}, nbytes


def run_table(shapes, row_counts, patterns) -> list[dict]:
    rows = []
    for n, k in shapes:
        bw = None
        for m in row_counts:
            for pattern in patterns:
                peers = DENSE_PEERS + [peer for peer in SPARSE_PEERS if peer != "csr" or m <= CSR_MAX_M]
                ms, nbytes = time_cell(peers, n, k, m, pattern)
                row = {"n": n, "k": k, "m": m, "pattern": pattern, "ms": ms, "bytes": nbytes}
                if bw is None:
                    bw = read_bandwidth(row["bytes"]["sparse"])
                row["read_gbs"] = bw / 1e9
                row["path"] = {
                    str(dtype).removeprefix("torch."): extension.sparse_linear_kernel_path(
                        torch.device("cpu"), m, n, k, dtype, torch.float32
                    )
                    for dtype in (torch.float32, torch.int8)
                }
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


TABLE_COLS = [
    "N x K",
    "M",
    "pattern",
    "sparse ms",
    "int8+sparse ms",
    "csr16 ms",
    "int8+csr16 ms",
    "fp32 ms",
    "int8 ms",
    "csr ms",
    "fp32 / best sparse",
    "fp32 / best int8+sparse",
    "int8 / best sparse",
    "int8 / best int8+sparse",
    "csr / best sparse",
    "best sparse GB/s",
    "best int8+sparse GB/s",
    "read GB/s",
]


def kernel_paths(rows: list[dict]) -> str:
    """The bitmap16 kernel that ran at each M, for fp32 and int8 values (the first shape's; K decides none)."""
    first = {}
    for row in rows:
        first.setdefault(row["m"], row["path"])
    return "bitmap16 kernels: " + "; ".join(
        f"M = {m}: {path['float32']} for fp32 values, {path['int8']} for int8 values" for m, path in first.items()
    )


def best_peer(ms: dict, kind: str) -> str:
    """The faster layout of ``kind`` ("sparse": fp32 values, "int8+sparse": int8 values) in this row."""
    return min((peer for peer in BEST[kind] if peer in ms), key=ms.__getitem__)


def table_header(cols) -> str:
    return "| " + " | ".join(cols) + " |\n|" + "---|" * 3 + "---:|" * (len(cols) - 3)


def format_row(row: dict) -> str:
    ms = row["ms"]

    def t(peer):
        return f"{ms[peer]:.3f}" if peer in ms else "-"

    def ratio(a, b):
        return f"{ms[a] / ms[b]:.2f}x" if a in ms and b in ms else "-"

    def gbs(peer):
        return f"{row['bytes'][peer] / ms[peer] / 1e6:.1f}" if peer in ms else "-"

    best, best_int8 = best_peer(ms, "sparse"), best_peer(ms, "int8+sparse")
    cells = [f"{row['n']} x {row['k']}", str(row["m"]), row["pattern"]]
    cells += [t(peer) for peer in ("sparse", "int8+sparse", "csr16", "int8+csr16", "fp32", "int8", "csr")]
    cells += [ratio("fp32", best), ratio("fp32", best_int8), ratio("int8", best)]
    cells += [ratio("int8", best_int8), ratio("csr", best), gbs(best), gbs(best_int8)]
    cells += [f"{row['read_gbs']:.1f}"]
    return "| " + " | ".join(cells) + " |"


SWEEP_PEERS = ["sparse", "int8+sparse", "csr16", "int8+csr16"]


def run_sweep(n: int = 4096, k: int = 4096) -> dict:
    """M = 1 time of every sparse layout vs dense int8 and fp32 (timed with them, interleaved) over sparsity;
    crossover = first sparsity that beats dense int8."""
    points = []
    for sparsity in SWEEP:
        pattern = f"{round(sparsity * 100)}%"
        ms, _ = time_cell(["int8", "fp32", *SWEEP_PEERS], n, k, 1, pattern)
        points.append({"sparsity": sparsity, **ms})
        print(f"sparsity {pattern}: " + ", ".join(f"{peer} {ms[peer]:.3f} ms" for peer in ms))
    crossover = {}
    for peer in SWEEP_PEERS:
        wins = [p["sparsity"] for p in points if p[peer] < p["int8"]]
        crossover[peer] = wins[0] if wins else None
    return {"n": n, "k": k, "points": points, "crossover": crossover}


def sweep_lines(sweep: dict) -> list[str]:
    lines = [
        f"Sparsity sweep, {sweep['n']} x {sweep['k']}, M = 1, dense int8 and fp32 timed in each point's run:",
        "",
        "| sparsity | int8 ms | fp32 ms | "
        + " | ".join(f"{peer} ms" for peer in SWEEP_PEERS)
        + " | fp32 / best sparse | fp32 / best int8+sparse | int8 / best int8+sparse |",
        "|---:|" + "---:|" * (len(SWEEP_PEERS) + 5),
    ]
    for p in sweep["points"]:
        best, best_int8 = (min(p[peer] for peer in BEST[kind]) for kind in ("sparse", "int8+sparse"))
        lines.append(
            f"| {p['sparsity']:.0%} | {p['int8']:.3f} | {p['fp32']:.3f} | "
            + " | ".join(f"{p[peer]:.3f}" for peer in SWEEP_PEERS)
            + f" | {p['fp32'] / best:.2f}x | {p['fp32'] / best_int8:.2f}x | {p['int8'] / best_int8:.2f}x |"
        )
    cross = sweep["crossover"]

    def fmt(v):
        return f"{v:.0%}" if v is not None else "none in the sweep"

    lines += [
        "",
        "Crossover vs dense int8 (first swept sparsity that is faster): "
        + ", ".join(f"{peer} {fmt(cross[peer])}" for peer in SWEEP_PEERS)
        + ".",
    ]
    return lines


def fastest_lines(rows: list[dict]) -> list[str]:
    """M = 1 again with the fastest single call of each cell: on a shared 2-core machine a 2-thread call whose
    second thread is descheduled takes a scheduler tick (~4-8 ms), which the median can absorb."""
    peers = [*SPARSE_PEERS, *DENSE_PEERS]
    lines = [
        "Fastest single call per cell, M = 1 (same runs as above):",
        "",
        "| N x K | pattern | "
        + " | ".join(peers)
        + " | fp32 / best sparse | fp32 / best int8+sparse | int8 / best int8+sparse | csr / best sparse |",
        "|---|---|" + "---:|" * (len(peers) + 4),
    ]
    for r in rows:
        if r["m"] != 1:
            continue
        n, k, pattern = r["n"], r["k"], r["pattern"]
        t = {peer: MIN_MS.get((peer, n, k, 1, pattern)) for peer in peers}
        best, best_int8 = (min(t[peer] for peer in BEST[kind]) for kind in ("sparse", "int8+sparse"))
        lines.append(
            f"| {n} x {k} | {pattern} | "
            + " | ".join(f"{t[peer]:.3f}" for peer in peers)
            + f" | {t['fp32'] / best:.2f}x | {t['fp32'] / best_int8:.2f}x | {t['int8'] / best_int8:.2f}x | "
            f"{t['csr'] / best:.2f}x |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/cpu-sparse-<UTC date>)")
    parser.add_argument("--quick", action="store_true", help="4096 x 4096 and 1536 x 576, M = 1 only, no sweep")
    parser.add_argument("--decode", action="store_true", help="every shape at M = 1 only, and the sweep")
    args = parser.parse_args()
    if args.quick:
        shapes, row_counts = [SHAPES[0], SHAPES[2]], [1]
    elif args.decode:
        shapes, row_counts = SHAPES, [1]
    else:
        shapes, row_counts = SHAPES, ROW_COUNTS
    now = dt.datetime.now(dt.timezone.utc)
    stem = Path(args.out or Path(__file__).parent / "results" / f"cpu-sparse-{now:%Y-%m-%d}")
    meta = {**run_meta(now), "load_before": os.getloadavg()[0]}
    print(
        f"{meta['cpu']}, torch {meta['torch']}, {meta['threads']} threads, ISA {meta['isa']}, "
        f"load {meta['load_before']:.1f}\n"
    )
    print(table_header(TABLE_COLS))
    start = time.perf_counter()
    with torch.inference_mode():
        rows = run_table(shapes, row_counts, PATTERNS)
        sweep = None if args.quick else run_sweep()
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    meta["load_after"] = os.getloadavg()[0]
    lines = [
        f"# CPU sparse_linear / sparse_csr_linear benchmark, {meta['date_utc']}",
        "",
        f"{meta['cpu']}, torch {meta['torch']}, {meta['threads']} threads, best ISA {meta['isa']} "
        f"({kernel_paths(rows)}), "
        f"1-minute load average {meta['load_before']:.1f} before / {meta['load_after']:.1f} after. Median ms per "
        "call, weights rotated from DRAM, fp32 activations, the peers of each row timed in turns, call by call "
        "(so the VM's drifting speed hits them alike). `a / b` > 1 means b is faster. "
        "`sparse` = bitmap16 with fp32 values, `int8+sparse` = bitmap16 with int8 values + per-channel scales, "
        "`csr16` / `int8+csr16` = the same values with 16-bit column indices (`sparse_csr_linear`, CPU kernel "
        f"{extension.sparse_csr_linear_kernel_path(torch.device('cpu'))}), `best` = the faster layout of a value "
        "type (what the per-layer kernel choice keeps), `csr` = torch CSR (fp32) via `F.linear`, `fp32` = dense "
        "`F.linear`, `int8` = dense `fastquant.int8_linear`. GB/s = format bytes (values + masks or indices + "
        "offsets + scales) / time; `read` = torch `sum` of a float64 buffer of the fp32 bitmap16 format's size, "
        "same run.",
        "",
        table_header(TABLE_COLS),
        *(format_row(r) for r in rows),
        "",
    ]
    lines += fastest_lines(rows) + [""]
    if sweep is not None:
        lines += sweep_lines(sweep) + [""]
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text("\n".join(lines))
    fastest = [
        {"peer": key[0], "n": key[1], "k": key[2], "m": key[3], "pattern": key[4], "min_ms": v}
        for key, v in MIN_MS.items()
    ]
    result = {"meta": meta, "rows": rows, "sweep": sweep, "min_ms": fastest}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines[-12:]) if sweep else "")
    print(f"\nwrote {stem}.md / .json in {meta['wall_s']} s")


if __name__ == "__main__":
    main()
