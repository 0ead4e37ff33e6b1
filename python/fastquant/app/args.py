"""Settings objects from parsed command lines: the commands name their options after the fields they set."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_args(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """A ``cls`` dataclass whose fields take the option of the same name in ``args`` (``--batch-size`` sets
    ``batch_size``), ``given`` values first (options named otherwise, computed values), and their defaults where
    the command has no such option."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.init and hasattr(args, f.name)}
    return cls(**{**values, **given})
