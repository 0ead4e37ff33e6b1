"""Parity of two builds of fastquant on the CPU tables: the same benchmark, two installs, interleaved.

A refactor of the glue (one contract per op, the package arranged by layer) must not cost speed. This runs
``cpu_table.py`` and ``sparse_table.py`` of each build's own checkout with that build's Python, alternating A, B, B,
A, ... for ``--rounds`` rounds (so drift of this shared VM hits both alike), and compares every fastquant cell
(median over rounds): the ratio new / old of the milliseconds, with the load average before and after each run.

Both builds run their kernels under the same numerics: the old one rounds fp32 x to bf16 above 16 rows on AVX-512
whatever torch's matmul precision says, the new one only under ``"medium"``, so the new build's runs set
``torch.set_float32_matmul_precision("medium")`` (what ``"highest"`` costs is in NOTES.md, measured on its own).

Run: ``python benchmarks/parity.py --old-python /venv-old/bin/python --old-tree /checkout-of-old-main``
(``--quick``: each table's ``--quick`` cells). Writes ``results/parity-<UTC date>.{md,json}``.

A whole table takes 2-5 minutes, and this kind of shared VM drifts by more than 5% within that time, so single cells
of the tables swing both ways between runs. ``--per-shape`` times dense ``int8_linear`` instead in one process per
(build, weight shape) of a few seconds, alternating the builds shape by shape: every cell of ``cpu_table``'s
fastquant columns (M = 1, 8, 128, 512; per-channel and group 128; weights rotated as there), measured close in time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
TABLES = {"cpu_table": ("fastquant", "fastquant_g128"), "sparse_table": ("int8", "sparse", "int8+sparse", "csr16")}
# Run a benchmark script as __main__ after choosing the matmul precision (the new build's runs only).
LAUNCH = (
    "import runpy, sys, torch; torch.set_float32_matmul_precision(sys.argv[1]); "
    "sys.argv = sys.argv[2:]; sys.path.insert(0, str(__import__('pathlib').Path(sys.argv[0]).parent)); "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def run_table(python: str, tree: Path, table: str, quick: bool, precision: str | None, out: Path) -> dict:
    script = tree / "benchmarks" / f"{table}.py"
    args = [str(script), "--out", str(out)] + (["--quick"] if quick else [])
    command = [python, "-c", LAUNCH, precision, *args] if precision else [python, *args]
    before = os.getloadavg()[0]
    subprocess.run(command, cwd=tree, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": ""})
    data = json.loads(out.with_suffix(".json").read_text())
    return {"rows": data["rows"], "load": (before, os.getloadavg()[0])}


SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 576), (576, 1536)]  # cpu_table's (N, K)
ROWS = (1, 8, 128, 512)
ROTATION_BYTES = 160 * 2**20  # as cpu_table: >= 5x the last-level cache, at most 64 copies
CELL_SECONDS = 0.4


def shape_worker(n: int, k: int, precision: str | None) -> None:
    """Prints {"M group": ms} for dense int8_linear on an (n, k) weight, under whichever build this Python has."""
    import torch

    import fastquant

    try:
        from fastquant.kernels import reference
    except ImportError:  # the package before it was arranged by layer
        from fastquant import reference
    if precision:
        torch.set_float32_matmul_precision(precision)
    gen = torch.Generator().manual_seed(n + k)
    weight = torch.randn(n, k, generator=gen)
    out = {}
    with torch.inference_mode():
        for group in (-1, 128):
            qweight, scales = reference.int8_quantize(weight, group)
            copies = max(2, min(64, -(-ROTATION_BYTES // qweight.numel())))
            weights = [qweight.roll(i, dims=0).contiguous() for i in range(copies)]
            for m in ROWS:
                x = torch.randn(m, k, generator=gen)
                for q in weights[:3]:
                    fastquant.int8_linear(x, q, scales, None, group)
                times, i, start = [], 0, time.perf_counter()
                while len(times) < 5 or time.perf_counter() - start < CELL_SECONDS:
                    t = time.perf_counter()
                    fastquant.int8_linear(x, weights[i % copies], scales, None, group)
                    times.append(time.perf_counter() - t)
                    i += 1
                out[f"{m} {group}"] = 1e3 * statistics.median(times)
    print(json.dumps(out))


def per_shape(builds: dict, rounds: int) -> dict:
    """Dense int8 cells: one worker process per (build, shape, round), builds alternating."""
    cells: dict[str, dict[str, list[float]]] = {}
    loads = []
    for n, k in SHAPES:
        for r in range(rounds):
            for build in ("old", "new") if r % 2 == 0 else ("new", "old"):
                python, tree, precision = builds[build]
                command = [python, str(Path(__file__).resolve()), "--worker", f"{n},{k}"]
                command += ["--precision", precision] if precision else []
                before = os.getloadavg()[0]
                done = subprocess.run(
                    command, cwd=tree, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}
                )
                loads.append((before, os.getloadavg()[0]))
                for key, ms in json.loads(done.stdout.strip().splitlines()[-1]).items():
                    m, group = key.split()
                    peer = "fastquant" if group == "-1" else "fastquant_g128"
                    cells.setdefault(f"{n} {k} {m}|{peer}", {}).setdefault(build, []).append(ms)
        print(f"per-shape {n} x {k} done, load {loads[-1]}", flush=True)
    out = []
    for key, by_build in cells.items():
        cell, peer = key.split("|")
        old, new = statistics.median(by_build["old"]), statistics.median(by_build["new"])
        out.append({"cell": cell, "peer": peer, "old_ms": old, "new_ms": new, "new_over_old": new / old})
    return {"cells": out, "loads": {"all": loads}}


def cell_key(row: dict) -> str:
    return " ".join(str(row[k]) for k in ("n", "k", "m", "pattern") if k in row)


def compare(runs: dict[str, list[dict]], peers: tuple[str, ...]) -> list[dict]:
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    for build, results in runs.items():
        for result in results:
            for row in result["rows"]:
                for peer in peers:
                    if peer in row["ms"]:
                        cells.setdefault((cell_key(row), peer), {}).setdefault(build, []).append(row["ms"][peer])
    out = []
    for (cell, peer), by_build in cells.items():
        if len(by_build) == 2:
            old, new = statistics.median(by_build["old"]), statistics.median(by_build["new"])
            out.append({"cell": cell, "peer": peer, "old_ms": old, "new_ms": new, "new_over_old": new / old})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-python", help="the Python with the old build installed")
    parser.add_argument("--old-tree", type=Path, help="the old build's checkout (its benchmarks)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tables", default="cpu_table,sparse_table")
    parser.add_argument("--per-shape", action="store_true", help="dense int8 cells, a process per build and shape")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "N,K": time one shape under this Python's build
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        n, k = map(int, args.worker.split(","))
        shape_worker(n, k, args.precision)
        return
    if not (args.old_python and args.old_tree):
        parser.error("--old-python and --old-tree are required")
    now = dt.datetime.now(dt.timezone.utc)
    stem = Path(args.out or RESULTS / f"parity-{now:%Y-%m-%d}")
    builds = {
        "old": (args.old_python, args.old_tree.resolve(), None),
        "new": (sys.executable, HERE.parent.resolve(), "medium"),
    }
    report: dict = {"date_utc": now.isoformat(timespec="seconds"), "rounds": args.rounds, "tables": {}}
    if args.per_shape:
        report["tables"]["int8_linear per shape"] = per_shape(builds, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        for table in [] if args.per_shape else args.tables.split(","):
            runs: dict[str, list[dict]] = {"old": [], "new": []}
            for r in range(args.rounds):
                order = ("old", "new") if r % 2 == 0 else ("new", "old")
                for build in order:
                    python, tree, precision = builds[build]
                    out = Path(tmp) / f"{table}-{build}-{r}"
                    runs[build].append(run_table(python, tree, table, args.quick, precision, out))
                    print(f"{table} round {r + 1} {build}: load {runs[build][-1]['load']}", flush=True)
            cells = compare(runs, TABLES[table])
            loads = {b: [res["load"] for res in rs] for b, rs in runs.items()}
            report["tables"][table] = {"cells": cells, "loads": loads}
    lines = [
        f"# Parity of two builds, interleaved ({now:%Y-%m-%d %H:%M} UTC)",
        "",
        f'old: `{args.old_tree}` ({args.old_python}); new: `{HERE.parent}` under matmul precision "medium" '
        f"(the old build's numerics). {args.rounds} rounds each, alternating; medians of the rounds' cells.",
        "",
    ]
    for table, data in report["tables"].items():
        ratios = [c["new_over_old"] for c in data["cells"]]
        lines += [f"## {table}", "", f"load averages (before, after): {data['loads']}", ""]
        lines += [
            f"new / old over {len(ratios)} cells: median {statistics.median(ratios):.3f}, "
            f"min {min(ratios):.3f}, max {max(ratios):.3f}",
            "",
        ]
        lines += ["| cell (N K M [pattern]) | peer | old ms | new ms | new / old |", "|---|---|---:|---:|---:|"]
        lines += [
            f"| {c['cell']} | {c['peer']} | {c['old_ms']:.3f} | {c['new_ms']:.3f} | {c['new_over_old']:.3f} |"
            for c in data["cells"]
        ]
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
