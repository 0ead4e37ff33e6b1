"""pytest-benchmark version of benchmarks/sparse_table.py (same shapes, patterns, peers and weight rotation).

Run: ``pytest benchmarks/bench_cpu_sparse.py --benchmark-only`` (not collected by the plain ``pytest`` run,
whose testpaths are ``tests``). Each benchmarked call uses the next of several weight copies (>= 160 MB in
all), so the weight streams from DRAM rather than sitting in the 32 MB L3.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from sparse_table import CSR_MAX_M, DENSE_PEERS, PATTERNS, ROW_COUNTS, SHAPES, SPARSE_PEERS, make_calls

CASES = [
    pytest.param(n, k, m, peer, None, id=f"{n}x{k}-m{m}-{peer}")
    for (n, k), m, peer in itertools.product(SHAPES, ROW_COUNTS, DENSE_PEERS)
] + [
    pytest.param(n, k, m, peer, pattern, id=f"{n}x{k}-m{m}-{peer}-{pattern}")
    for (n, k), m, peer, pattern in itertools.product(SHAPES, ROW_COUNTS, SPARSE_PEERS, PATTERNS)
    if not (peer == "csr" and m > CSR_MAX_M)
]


@pytest.mark.parametrize(("n", "k", "m", "peer", "pattern"), CASES)
def test_sparse_linear_cpu(benchmark, n, k, m, peer, pattern):
    calls, nbytes = make_calls(peer, n, k, m, pattern)
    rotation = itertools.cycle(calls)
    benchmark.extra_info.update({"weight_bytes": nbytes, "copies": len(calls), "threads": torch.get_num_threads()})
    slow = (m >= 128 and n * k > 10**7) or peer == "csr"
    with torch.inference_mode():
        if slow:
            benchmark.pedantic(lambda: next(rotation)(), rounds=5, warmup_rounds=1)
        else:
            benchmark(lambda: next(rotation)())
