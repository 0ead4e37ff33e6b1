"""int8 decode layers (M = 1 and small M) against torch's own int8 path (fbgemm), interleaved, DRAM and cache.

Contenders, same shapes, same process, timed in interleaved rounds (each round times a burst of calls of every
contender in turn, the order reversed every round; the result is the median over rounds of each burst's
median):

* ``fq``: ``fastquant.int8_linear``, per-channel scales, fp32 x (at M = 1: ``cpu_avx512_vnni_fixed`` on
  AVX-512 CPUs);
* ``fq fp32 kernel``: the same weight with one element of x at 4096x the others' mean magnitude, which the
  fixed-point path refuses, so the fp32-FMA kernel (``cpu_avx512_fp32``) runs: the previous decode kernel;
* ``fq g128``: group-wise scales (128 columns);
* ``fq x=int8``: per-channel scales with ``int8_activations`` (x rounded to int8 per 32 columns at each call, as
  fbgemm and llama.cpp's Q8_0 round it: ``cpu_avx2_int8x``);
* ``fbgemm``: ``torch.ao.quantization.quantize_dynamic`` of the ``nn.Linear`` (int8 weight, x quantized to
  8 bits per call, VNNI);
* ``bf16``: ``F.linear`` in bf16 (oneDNN), twice the weight bytes.

``--where dram`` rotates each contender through copies of its weight (>= 160 MB, 5x the 32 MB L3), as a
model's layers stream from memory; ``--where cache`` reuses one copy (resident in the last-level cache when
it fits: 4096 x 4096 int8 is 16 MiB; 11008 x 4096 is 43 MiB and does not fit a 32 MiB L3). The read
bandwidth of torch's ``sum`` over a same-sized float64 buffer is measured in the same run.

Run: ``python benchmarks/decode_layer.py --where dram`` and ``--where cache`` (~2 minutes each).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from run_info import cpu_environment, native_isa, result_stem, write_report
from torch import nn

import fastquant
from fastquant.kernels import extension, reference

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 576), (576, 1536)]  # (N, K) = (out, in)
ROTATION_BYTES = 160 * 2**20


def copies(nbytes: int, where: str) -> int:
    return 1 if where == "cache" else max(2, min(64, math.ceil(ROTATION_BYTES / nbytes)))


def contenders(n: int, k: int, m: int, where: str) -> dict[str, list]:
    gen = torch.Generator().manual_seed(n * 7 + k)
    x = torch.randn(m, k, generator=gen)
    x_outlier = x.clone()
    x_outlier[:, 0] = 4096 * x.abs().mean()
    weight = torch.randn(n, k, generator=gen)
    out: dict[str, list] = {"fq": [], "fq fp32 kernel": [], "fq g128": [], "fq x=int8": [], "fbgemm": [], "bf16": []}
    for i in range(copies(n * k, where)):
        w = weight.roll(i, dims=0)
        q, s = reference.int8_quantize(w, -1)
        q128, s128 = reference.int8_quantize(w, 128)
        out["fq"].append(lambda q=q, s=s: fastquant.int8_linear(x, q, s, None, -1))
        out["fq fp32 kernel"].append(lambda q=q, s=s: fastquant.int8_linear(x_outlier, q, s, None, -1))
        out["fq g128"].append(lambda q=q128, s=s128: fastquant.int8_linear(x, q, s, None, 128))
        out["fq x=int8"].append(lambda q=q, s=s: fastquant.int8_linear(x, q, s, None, -1, int8_activations=True))
        lin = nn.Linear(k, n, bias=False)
        lin.weight.data.copy_(w)
        qlin = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
        out["fbgemm"].append(lambda qlin=qlin: qlin(x))
        wb, xb = w.bfloat16(), x.bfloat16()
        out["bf16"].append(lambda wb=wb, xb=xb: F.linear(xb, wb))
    return out


def time_interleaved(calls: dict[str, list], rounds: int, burst: int) -> dict[str, float]:
    per_round: dict[str, list[float]] = {name: [] for name in calls}
    position = dict.fromkeys(calls, 0)
    with torch.inference_mode():
        for fns in calls.values():  # warm-up
            for fn in fns[:4]:
                fn()
        for r in range(rounds):
            for name in calls if r % 2 == 0 else reversed(list(calls)):
                fns, times = calls[name], []
                for _ in range(burst):
                    fn = fns[position[name] % len(fns)]
                    position[name] += 1
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                per_round[name].append(statistics.median(times))
    return {name: statistics.median(v) for name, v in per_round.items()}


def read_bandwidth(nbytes: int, where: str) -> float:
    bufs = [torch.rand(max(1, nbytes // 8), dtype=torch.float64) for _ in range(copies(nbytes, where))]
    times = time_interleaved({"sum": [lambda b=b: b.sum() for b in bufs]}, rounds=5, burst=20)
    return nbytes / times["sum"]


@dataclass(frozen=True)
class Comparison:
    """How a layer benchmark sets its subject against the other contenders, in the rows it records, the line
    it logs per row and the columns of its table (decode_layer and bench_cpu_int4 share the layout).

    ``label`` names the subject in keys and headers ("int4": ``int4_vs_int8``, ``int8 / int4``, ``int4 GB/s``);
    ``subject`` is its contender; ``against`` maps a key suffix to the contender it divides (its header label is
    the suffix with spaces for underscores).
    """

    label: str
    subject: str
    against: dict[str, str]

    def row(self, n: int, k: int, m: int, path: str, ms: dict[str, float], nbytes: int, read_bw: float) -> dict:
        """The row of one shape and row count; ``nbytes`` are the subject's weight bytes per call."""
        row = {"n": n, "k": k, "m": m, "path": path, "ms": ms}
        for suffix, other in self.against.items():
            row[f"{self.label}_vs_{suffix}"] = ms[other] / ms[self.subject]
        row[f"{self.label}_gbs"] = nbytes / ms[self.subject] / 1e6
        row["read_gbs"] = read_bw / 1e9
        ratios = ", ".join(
            f"{suffix.replace('_', ' ')}/{self.label} {row[f'{self.label}_vs_{suffix}']:.2f}x"
            for suffix in self.against
        )
        print(
            f"{n} x {k} M={m} {path}: "
            + ", ".join(f"{name} {v:.3f} ms" for name, v in ms.items())
            + f"; {ratios}, {self.label} {row[f'{self.label}_gbs']:.1f} GB/s of read {row['read_gbs']:.1f}",
            flush=True,
        )
        return row

    def table(self, rows: list[dict]) -> list[str]:
        """The markdown table of ``rows``: header, alignment and one line per row."""
        names = list(rows[0]["ms"])
        label = self.label
        lines = [
            f"| N x K | M | {label} path | "
            + " | ".join(f"{n} ms" for n in names)
            + "".join(f" | {suffix.replace('_', ' ')} / {label}" for suffix in self.against)
            + f" | {label} GB/s | read GB/s | fraction |",
            "|---|---:|---|" + "---:|" * (len(names) + len(self.against) + 3),
        ]
        for r in rows:
            lines.append(
                f"| {r['n']} x {r['k']} | {r['m']} | {r['path']} | "
                + " | ".join(f"{r['ms'][n]:.3f}" for n in names)
                + "".join(f" | {r[f'{label}_vs_{suffix}']:.2f}x" for suffix in self.against)
                + f" | {r[f'{label}_gbs']:.1f} | {r['read_gbs']:.1f} | {r[f'{label}_gbs'] / r['read_gbs']:.2f} |"
            )
        return lines


FQ_VS_OTHERS = Comparison("fq", "fq", {"fbgemm": "fbgemm", "fp32_kernel": "fq fp32 kernel"})
# The same rows with x rounded to int8, fbgemm's own arithmetic (what the "vs fbgemm" target compares on its terms).
FQX_VS_OTHERS = Comparison("fq_x8", "fq x=int8", {"fbgemm": "fbgemm", "fq": "fq"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--where", choices=("dram", "cache"), default="dram")
    parser.add_argument("--rows", default="1,4,16", help="row counts M")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--burst", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows, x8_rows = [], []
    for n, k in SHAPES:
        bw = read_bandwidth(n * k, args.where)
        for m in (int(v) for v in args.rows.split(",")):
            ms = {
                name: t * 1e3
                for name, t in time_interleaved(contenders(n, k, m, args.where), args.rounds, args.burst).items()
            }
            path = extension.int8_linear_kernel_path(torch.device("cpu"), m, n, k, -1, torch.float32)
            rows.append(FQ_VS_OTHERS.row(n, k, m, path, ms, n * k + 4 * n, bw))
            x8_path = extension.int8_linear_kernel_path(
                torch.device("cpu"), m, n, k, -1, torch.float32, int8_activations=True
            )
            x8_rows.append(FQX_VS_OTHERS.row(n, k, m, x8_path, ms, n * k + 4 * n, bw))
    env = cpu_environment(load_before, isa=native_isa(), where=args.where)
    lines = [
        f"# int8 decode layers vs fbgemm, weights from {args.where} ({env['cpu']}, {env['threads']} threads, "
        f"ISA {env['isa']})",
        "",
        f"torch {env['torch']}; median ms per call over {args.rounds} interleaved rounds of {args.burst} calls; "
        f"load average (1/5/15 min) {' '.join(f'{v:.2f}' for v in load_before)} before, "
        f"{' '.join(f'{v:.2f}' for v in env['load_average_after'])} after. `fbgemm / fq` > 1: fastquant is "
        "faster. `fraction`: fq's weight bytes per second over torch's float64 `sum` read bandwidth of the same "
        "bytes, same run.",
        "",
        *FQ_VS_OTHERS.table(rows),
        "",
        "With `int8_activations` (`fq x=int8`: x rounded to int8 per 32 columns, as fbgemm rounds x per call):",
        "",
        *FQX_VS_OTHERS.table(x8_rows),
    ]
    write_report(
        result_stem(args.out, f"decode-layer-{args.where}"),
        "\n".join(lines) + "\n",
        {"environment": env, "rows": rows, "int8_activations_rows": x8_rows},
    )


if __name__ == "__main__":
    main()
