"""``fastquant export CHECKPOINT_DIR --format gguf|compressed-tensors -o OUT``: one entry point per format."""

from __future__ import annotations

import os
from typing import Any

from fastquant.interop import InteropError

FORMATS = ("gguf", "compressed-tensors")


def export(
    checkpoint_dir: str | os.PathLike, fmt: str, output: str | os.PathLike, *, vocab_from: str | None = None
) -> dict[str, Any]:
    """Convert the folder ``fastquant compress -o`` wrote into ``fmt``; returns the writer's summary."""
    if fmt == "gguf":
        from fastquant.interop.gguf_out import export_checkpoint_gguf

        return export_checkpoint_gguf(checkpoint_dir, output, vocab_from=vocab_from)
    if fmt == "compressed-tensors":
        if vocab_from is not None:
            raise InteropError("--vocab-from applies to --format gguf only")
        from fastquant.interop.ct_out import export_checkpoint_compressed_tensors

        return export_checkpoint_compressed_tensors(checkpoint_dir, output)
    raise InteropError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
