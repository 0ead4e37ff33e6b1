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
    parser.add_argument("--old-python", required=True, help="the Python with the old build installed")
    parser.add_argument("--old-tree", required=True, type=Path, help="the old build's checkout (its benchmarks)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tables", default="cpu_table,sparse_table")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    now = dt.datetime.now(dt.timezone.utc)
    stem = Path(args.out or RESULTS / f"parity-{now:%Y-%m-%d}")
    builds = {
        "old": (args.old_python, args.old_tree.resolve(), None),
        "new": (sys.executable, HERE.parent.resolve(), "medium"),
    }
    report: dict = {"date_utc": now.isoformat(timespec="seconds"), "rounds": args.rounds, "tables": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for table in args.tables.split(","):
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
