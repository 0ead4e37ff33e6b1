"""pytest-benchmark version of benchmarks/cpu_table.py (same shapes, peers and weight rotation).

Run: ``pytest benchmarks/bench_cpu_int8.py --benchmark-only`` (not collected by the plain ``pytest`` run,
whose testpaths are ``tests``). Each benchmarked call uses the next of several weight copies (>= 160 MB in
all), so the weight streams from DRAM rather than sitting in the 32 MB L3.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from cpu_table import PEERS, ROW_COUNTS, SHAPES, make_calls

CASES = [
    pytest.param(n, k, m, peer, id=f"{n}x{k}-m{m}-{peer}")
    for (n, k), m, peer in itertools.product(SHAPES, ROW_COUNTS, PEERS)
]


@pytest.mark.parametrize(("n", "k", "m", "peer"), CASES)
def test_int8_linear_cpu(benchmark, n, k, m, peer):
    calls, nbytes = make_calls(peer, n, k, m)
    rotation = itertools.cycle(calls)
    benchmark.extra_info.update({"weight_bytes": nbytes, "copies": len(calls), "threads": torch.get_num_threads()})
    slow = m >= 128 and peer == "fp32" and n * k > 10**7
    with torch.inference_mode():
        if slow:
            benchmark.pedantic(lambda: next(rotation)(), rounds=5, warmup_rounds=1)
        else:
            benchmark(lambda: next(rotation)())
