"""What the benchmarks record about the run itself (the commit measured, the machine, how loaded it was) and
how they write their results."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def commit() -> str:
    """The short hash of the checked-out commit, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def load_averages(digits: int = 2) -> str:
    """The 1-, 5- and 15-minute load averages, e.g. "0.52 0.61 0.70"."""
    return " ".join(f"{x:.{digits}f}" for x in os.getloadavg())


def native_isa() -> str:
    """The instruction set fastquant's native CPU kernels were built for, or "reference" without them."""
    from fastquant.kernels import extension

    return extension.native.cpu_isa() if extension.native is not None else "reference"


def cpu_environment(load_before: tuple[float, float, float], **extra: object) -> dict[str, object]:
    """A CPU run's environment: CPU model, torch version and threads, then ``extra`` in its order, then the
    load averages (1/5/15 min) taken before the timing (``load_before``) and now, after it."""
    from fastquant.app.evaluate import cpu_model

    return {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **extra,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def result_stem(out: str | None, name: str) -> Path:
    """``out`` as a path, or by default results/<name>-<UTC date>; the .md and .json files add a suffix."""
    return Path(out) if out else RESULTS / f"{name}-{dt.datetime.now(dt.timezone.utc).date()}"


def write_report(stem: Path, text: str, data: dict[str, object]) -> None:
    """Prints the markdown report and writes it to <stem>.md, and the data behind it to <stem>.json."""
    print(text)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print(f"wrote {stem}.md / .json")


def report_header(title: str, script: str, result: dict, precision: str) -> list[str]:
    """The first lines of a CPU accuracy report: ``title`` and the run's date, then the command, commit, torch,
    threads and machine of the run (``precision``: what ran in which dtype, e.g. "float32 activations")."""
    return [
        f"# {title}, {result['date']}",
        "",
        f"`python benchmarks/{script}` at commit {result['commit']}, torch {result['torch']}, "
        f"{result['settings']['threads']} threads, {precision} on CPU ({result['machine']}).",
    ]


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Runs the block under torch's float32 matmul ``precision``, restoring the setting it found."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
