"""GPU timing of fastquant.sparse_csr_linear (csr16) next to sparse_linear (bitmap16) on the same pruned weights.

csr16 exists for very sparse layers, so the cases are 70/90/99% unstructured with bf16 values and int8 + 90%,
at decode row counts (M = 1, 4, 16), bf16 activations, on Llama-sized layers. Each case rotates weight sets
totalling >= 160 MiB of csr16 format (past any L2), timed with CUDA events as in bench_gpu_int8.py. ``GB/s`` is
the csr16 format's bytes (values + indices) per call over the time: compare with the copy bandwidth that
bench_gpu_int8.py measures in the same run of benchmarks/gpu_check.sh.

Run: ``python benchmarks/bench_gpu_csr.py [--stem STEM]`` (writes STEM.md; default
benchmarks/results/gpu-csr-<UTC stamp>).
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import torch
from bench_gpu_int8 import gpu_time_per_call

from fastquant.kernels import reference

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (N, K)
CASES = ["70%", "90%", "99%", "int8+90%"]
ROW_COUNTS = [1, 4, 16]
ROTATION_BYTES = 160 * 2**20
MAX_SETS = 256


def weight_sets(n: int, k: int, case: str, gen: torch.Generator) -> tuple[list[tuple], int]:
    """Pruned weights in both layouts, enough copies to stream from DRAM, and the csr16 bytes of one."""
    sparsity = float(case.split("+")[-1].rstrip("%")) / 100
    sets, total = [], 0
    while total < ROTATION_BYTES and len(sets) < MAX_SETS:
        w = torch.randn(n, k, generator=gen, device="cuda")
        w = w * (torch.rand(n, k, generator=gen, device="cuda") >= sparsity)
        scales = None
        if case.startswith("int8"):
            w, scales = reference.int8_quantize(w)
        else:
            w = w.bfloat16()
        values, masks, offsets = reference.sparse_pack(w)
        indices = reference.sparse_column_indices(masks, k, values.numel())
        sets.append((values, masks, indices, offsets, scales))
        total += values.numel() * values.element_size() + indices.numel() * 2
    return sets, total // len(sets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stem", default=None, help="output stem (default benchmarks/results/gpu-csr-<stamp>)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    now = dt.datetime.now(dt.timezone.utc)
    stem = Path(args.stem or Path(__file__).parent / "results" / f"gpu-csr-{now:%Y%m%d-%H%M%S}")
    lines = [
        f"# csr16 vs bitmap16 on {torch.cuda.get_device_name()}, {now:%Y-%m-%d %H:%M} UTC",
        "",
        "| N x K | case | M | bitmap16 us | csr16 us | csr16 / bitmap16 | csr16 format GB/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for n, k in SHAPES:
            gen = torch.Generator(device="cuda").manual_seed(n * 31 + k)
            for case in CASES:
                sets, nbytes = weight_sets(n, k, case, gen)
                for m in ROW_COUNTS:
                    x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
                    bitmap = [
                        lambda s=s, x=x, k=k: torch.ops.fastquant.sparse_linear(x, s[0], s[1], s[3], s[4], None, k, -1)
                        for s in sets
                    ]
                    csr = [
                        lambda s=s, x=x, k=k: torch.ops.fastquant.sparse_csr_linear(
                            x, s[0], s[2], s[3], s[4], None, k, -1
                        )
                        for s in sets
                    ]
                    t_bitmap = gpu_time_per_call(bitmap, args.repeats)
                    t_csr = gpu_time_per_call(csr, args.repeats)
                    line = (
                        f"| {n} x {k} | {case} | {m} | {t_bitmap * 1e6:.1f} | {t_csr * 1e6:.1f} | "
                        f"{t_csr / t_bitmap:.2f} | {nbytes / t_csr / 1e9:.0f} |"
                    )
                    lines.append(line)
                    print(line, flush=True)
                    # Rewritten after every row: a run stopped by its time limit keeps what it measured.
                    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
                del sets
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
