"""int4 layers on the CPU against fastquant's int8 and torch's fp32, weights from DRAM, interleaved.

Contenders, same shapes, same process, timed in interleaved rounds (decode_layer.time_interleaved: each round
times a burst of calls of every contender in turn, the order reversed every round; the result is the median
over rounds of each burst's median):

* ``int4 g32``: ``fastquant.int4_linear``, symmetric, groups of 32 (fp16 scales), fp32 x;
* ``int4 g128``: the same with groups of 128;
* ``int4 g32 x=int8`` (``--int8-activations``, then the subject of the table): int4 g32 with
  ``int8_activations=True`` (x rounded to int8 per 32 columns at every call, as llama.cpp's Q4_0 kernels do);
* ``int8``: ``fastquant.int8_linear``, per-channel fp32 scales (the dense int8 kernel);
* ``fp32``: ``F.linear`` on the float weight.

Every contender rotates through copies of its weight totalling >= 160 MB (5x the 32 MB L3), as a model's
layers stream from memory. The read bandwidth of torch's ``sum`` over a float64 buffer of int4 g32's bytes,
rotated the same way, is measured in the same run: ``fraction`` is int4 g32's format bytes (codes + scales)
per second over it.

Run: ``python benchmarks/bench_cpu_int4.py`` (~5 minutes) on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F
from decode_layer import Comparison, copies, read_bandwidth, time_interleaved
from run_info import cpu_environment, native_isa, result_stem, write_report

import fastquant
from fastquant.kernels import extension, reference

SHAPES = [(4096, 4096), (11008, 4096), (1536, 576)]  # (N, K) = (out, in)


def int4_bytes(n: int, k: int, group_size: int) -> int:
    return n * (k + 63) // 64 * 32 + 2 * n * math.ceil(k / group_size)


def contenders(n: int, k: int, x: list[torch.Tensor], int8_activations: bool) -> dict[str, list]:
    """Calls on rotated weight copies; x[0] is the activation (set per row count by the caller)."""
    gen = torch.Generator().manual_seed(n * 7 + k)
    weight = torch.randn(n, k, generator=gen)
    out: dict[str, list] = {"int4 g32": [], "int4 g128": [], "int8": [], "fp32": []}
    int4_kinds = [("int4 g32", 32, False), ("int4 g128", 128, False)]
    if int8_activations:
        out["int4 g32 x=int8"] = []
        int4_kinds.append(("int4 g32 x=int8", 32, True))
    for name, group, x8 in int4_kinds:
        for i in range(copies(int4_bytes(n, k, group), "dram")):
            q, s, _ = reference.int4_quantize(weight.roll(i, dims=0), group)
            out[name].append(
                lambda q=q, s=s, g=group, x8=x8: fastquant.int4_linear(
                    x[0], q, s, in_features=k, group_size=g, int8_activations=x8
                )
            )
    for i in range(copies(n * k, "dram")):
        q, s = reference.int8_quantize(weight.roll(i, dims=0), -1)
        out["int8"].append(lambda q=q, s=s: fastquant.int8_linear(x[0], q, s, None, -1))
    for i in range(copies(4 * n * k, "dram")):
        w = weight.roll(i, dims=0).contiguous()
        out["fp32"].append(lambda w=w: F.linear(x[0], w))
    return out


INT4_VS_OTHERS = Comparison("int4", "int4 g32", {"int8": "int8", "fp32": "fp32"})
INT4_X8_VS_OTHERS = Comparison("int4x8", "int4 g32 x=int8", {"int8": "int8", "int4_g32": "int4 g32", "fp32": "fp32"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,16,512", help="row counts M")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--burst", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--int8-activations", action="store_true", help="add int4 g32 with int8_activations, the table's subject"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    comparison = INT4_X8_VS_OTHERS if args.int8_activations else INT4_VS_OTHERS
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for n, k in SHAPES:
        nbytes = int4_bytes(n, k, 32)
        bw = read_bandwidth(nbytes, "dram")
        x: list[torch.Tensor] = [torch.empty(0)]
        calls = contenders(n, k, x, args.int8_activations)
        for m in (int(v) for v in args.rows.split(",")):
            x[0] = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            # Prefill rows are compute-bound seconds of work per call: fewer, shorter rounds.
            rounds, burst = (args.rounds, args.burst) if m <= 16 else (3, 2)
            timed = time_interleaved(calls, rounds, burst)
            ms = {name: t * 1e3 for name, t in timed.items()}
            path = extension.int4_linear_kernel_path(
                torch.device("cpu"), m, n, k, 32, torch.float32, args.int8_activations
            )
            rows.append(comparison.row(n, k, m, path, ms, nbytes, bw))
    env = cpu_environment(load_before, isa=native_isa())
    lines = [
        f"# int4 layers vs int8 and fp32, weights from DRAM ({env['cpu']}, {env['threads']} threads, ISA {env['isa']})",
        "",
        f"torch {env['torch']}; median ms per call over interleaved rounds ({args.rounds} x {args.burst} calls at "
        "M <= 16, 3 x 2 above); load average (1/5/15 min) "
        f"{' '.join(f'{v:.2f}' for v in load_before)} before, "
        f"{' '.join(f'{v:.2f}' for v in env['load_average_after'])} after. `int8 / {comparison.label}` > 1: "
        f"{comparison.subject} is faster. `fraction`: {comparison.subject}'s format bytes per second over torch's "
        "float64 `sum` read bandwidth of the same bytes, same run.",
        "",
        *comparison.table(rows),
    ]
    write_report(result_stem(args.out, "cpu-int4"), "\n".join(lines) + "\n", {"environment": env, "rows": rows})


if __name__ == "__main__":
    main()
