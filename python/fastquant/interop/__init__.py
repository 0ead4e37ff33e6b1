"""Interoperability with the formats other engines run: GGUF (llama.cpp, ollama) in and out, and
compressed-tensors (vLLM, SGLang, transformers) out.

fastquant.from_gguf("model.Q4_1.gguf")                        # fastquant layers straight from the file's codes
fastquant export CHECKPOINT_DIR --format gguf -o model.gguf   # int8 g32 -> Q8_0, int4 g32 symmetric -> Q4_0
fastquant export CHECKPOINT_DIR --format compressed-tensors -o DIR
"""

from __future__ import annotations


class InteropError(ValueError):
    """A file or model that cannot be converted: unknown architecture, unsupported layout, corrupted file."""
