"""What torch's float32 matmul precision costs fastquant's CPU prefill: fp32 activations at M = 512.

fp32 x is rounded to bf16 by the AVX-512 prefill kernels (``cpu_avx512_bf16``, ``cpu_avx512_bf16_tiles``) only
under ``torch.set_float32_matmul_precision("medium")``; ``"highest"`` (torch's default) and ``"high"`` keep fp32
(``cpu_avx512_fp32``, ``cpu_avx512_expand``). For dense int8 and int8 + 50% unstructured sparse weights (per-channel
scales) this times both settings in one interleaved run (``sparse_table.timed_interleaved``: the settings take
turns call by call, each rotating over its weight copies), and prints a markdown table.

Run: ``python benchmarks/fp32_precision.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from run_info import matmul_precision
from sparse_table import make_calls, timed_interleaved

from fastquant.kernels import extension

SHAPES = [(11008, 4096), (4096, 4096)]  # (N, K) = (out, in)
PRECISIONS = ["highest", "high", "medium"]
PEERS = {"int8": None, "int8+sparse": "50%"}  # sparse_table peer -> sparsity pattern


def under(precision: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run under ``precision``, restoring the setting it found."""

    def call() -> object:
        with matmul_precision(precision):
            return fn()

    return call


def path(peer: str, n: int, k: int, m: int, precision: str) -> str:
    with matmul_precision(precision):
        if peer == "int8":
            return extension.int8_linear_kernel_path(torch.device("cpu"), m, n, k, -1, torch.float32)
        return extension.sparse_linear_kernel_path(torch.device("cpu"), m, n, k, torch.int8, torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=512)
    args = parser.parse_args()
    m = args.rows
    print(f"M = {m}, fp32 activations, {torch.get_num_threads()} threads; ms per call (median), kernel")
    print("| N x K | weight | " + " | ".join(PRECISIONS) + " | highest / medium |")
    print("|---|---|" + "---|" * (len(PRECISIONS) + 1))
    for n, k in SHAPES:
        for peer, pattern in PEERS.items():
            calls = {}
            for precision in PRECISIONS:
                peer_calls, _ = make_calls(peer, n, k, m, pattern)
                calls[precision] = [under(precision, fn) for fn in peer_calls]
            timed = timed_interleaved(calls, budget_s=6.0, min_rounds=7)
            cells = [f"{timed[p][0]:.1f} ({path(peer, n, k, m, p)})" for p in PRECISIONS]
            ratio = timed["highest"][0] / timed["medium"][0]
            print(f"| {n} x {k} | {peer} | " + " | ".join(cells) + f" | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
