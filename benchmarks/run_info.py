"""What the benchmarks record about the run itself: the commit measured and how loaded the machine was."""

from __future__ import annotations

import os
import subprocess


def commit() -> str:
    """The short hash of the checked-out commit, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def load_averages(digits: int = 2) -> str:
    """The 1-, 5- and 15-minute load averages, e.g. "0.52 0.61 0.70"."""
    return " ".join(f"{x:.{digits}f}" for x in os.getloadavg())
