"""Progress bars that stay out of logs: shown on a terminal, hidden in pipes and CI unless asked for."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable | None = None, *, progress: bool | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar (with its ETA). ``progress``: None shows it only when stderr is a terminal (tqdm's own
    test), True always, False never."""
    return tqdm(iterable, disable=None if progress is None else not progress, **kwargs)
