"""GGUF out: a fastquant llama-family model as a GGUF file that llama.cpp (and ollama) run.

Layouts with a GGUF block type of the same shape are written code for code: int8 group 32 -> Q8_0 (the fp32
group scales become Q8_0's fp16 block scales: a relative change of at most 2^-11 per scale in fp16's normal
range), int4 group 32 symmetric -> Q4_0 (fp16 scales and 4-bit codes as they are: bit-exact). Float layers are
written as F32 (or their float dtype), sparse layers dense with their masks applied (pruned weights are zero codes).
Every other layout (per-channel int8, other group sizes, asymmetric int4) is refused: re-quantizing would discard
the rounding fastquant chose (e.g. GPTQ's). The file is written with the ``gguf`` package's GGUFWriter; the tokenizer
comes from the checkpoint folder's ``tokenizer.json`` via ``gguf.vocab`` (or is copied from another GGUF file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastquant.interop import InteropError
from fastquant.kernels import reference
from fastquant.modules import Int8Linear, SparseLinear, is_quantizable_linear, linear_weight

BLOCK = 32
SUPPORTED_MODEL_TYPES = ("llama",)
LAYOUT_HINT = (
    "GGUF export writes int8 group 32 (as Q8_0) and int4 group 32 symmetric (as Q4_0): "
    "compress with `--group-size 32` (int4: symmetric)"
)


def _int4_class() -> type | None:
    from fastquant import modules

    return getattr(modules, "Int4Linear", None)


def _q8_0_bytes(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q8_0 rows from int8 codes (N, K) and group-32 scales (N, K/32): each block an fp16 scale then 32 codes."""
    n, k = codes.shape
    d = scales.astype(np.float16).reshape(n, k // BLOCK, 1).view(np.uint8)
    q = codes.astype(np.int8).reshape(n, k // BLOCK, BLOCK).view(np.uint8)
    return np.concatenate([d, q], axis=-1).reshape(n, -1)


def _q4_0_bytes(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q4_0 rows from codes 0..15 (N, K) and fp16 scales (N, K/32): an fp16 scale, then byte j holding code j
    (low nibble) and code j + 16 (high nibble) of the block."""
    n, k = codes.shape
    d = scales.astype(np.float16).reshape(n, k // BLOCK, 1).view(np.uint8)
    c = codes.astype(np.uint8).reshape(n, k // BLOCK, 2, BLOCK // 2)
    q = c[:, :, 0, :] | (c[:, :, 1, :] << np.uint8(4))
    return np.concatenate([d, q], axis=-1).reshape(n, -1)


def _row_permutation(name: str, n_rows: int, n_head: int, n_head_kv: int) -> np.ndarray | None:
    """llama.cpp's rotary layout for Q and K rows (convert_hf_to_gguf's ``permute``), as a row index; None for
    other tensors."""
    if ".attn_q." not in name and ".attn_k." not in name:
        return None
    heads = n_head_kv if ".attn_k." in name else n_head
    rows = np.arange(n_rows).reshape(heads, 2, n_rows // heads // 2)
    return rows.swapaxes(1, 2).reshape(n_rows)


def layer_gguf_type(name: str, module: nn.Module) -> str:
    """The GGUF type a compressed or float linear layer is written as; InteropError for layouts GGUF lacks."""
    int4 = _int4_class()
    if isinstance(module, Int8Linear):
        if module.group_size != BLOCK:
            layout = "per-channel" if module.group_size is None else f"group {module.group_size}"
            raise InteropError(f"layer {name!r} is int8 {layout}; {LAYOUT_HINT}")
        return "Q8_0"
    if int4 is not None and isinstance(module, int4):
        if module.group_size != BLOCK or getattr(module, "offsets", None) is not None:
            sym = "asymmetric" if getattr(module, "offsets", None) is not None else "symmetric"
            raise InteropError(f"layer {name!r} is int4 group {module.group_size} {sym}; {LAYOUT_HINT}")
        return "Q4_0"
    if isinstance(module, SparseLinear):
        if module.values.dtype == torch.int8:
            if module.group_size != BLOCK:
                layout = "per-channel" if module.group_size is None else f"group {module.group_size}"
                raise InteropError(f"layer {name!r} is sparse with int8 {layout} values; {LAYOUT_HINT}")
            return "Q8_0"
        return "F32"
    if is_quantizable_linear(module):
        return "F32"
    raise InteropError(f"layer {name!r} is a {type(module).__name__}, which GGUF export cannot write")


def _linear_tensor(module: nn.Module, gguf_type: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(codes or float weight (N, K), scales or None) of a linear layer, in the model's row order."""
    if isinstance(module, Int8Linear):
        return module.qweight.cpu().numpy(), module.scales.cpu().numpy()
    if isinstance(module, SparseLinear):
        dense = reference.sparse_unpack(module.values, module.masks, module.row_offsets, module.in_features)
        if gguf_type == "Q8_0":
            return dense.cpu().numpy(), module.scales.cpu().numpy()
        return dense.float().cpu().numpy(), None
    int4 = _int4_class()
    if int4 is not None and isinstance(module, int4):
        codes = reference.int4_unpack(module.qweight, module.in_features)
        return codes.cpu().numpy(), module.scales.cpu().numpy()
    return linear_weight(module).detach().float().cpu().numpy(), None


def _float_array(tensor: torch.Tensor) -> np.ndarray:
    # llama.cpp reads norms as F32, and F32 keeps every float tensor exactly as the model computes with it.
    return tensor.detach().float().cpu().numpy()


def _add_vocab(writer: Any, tokenizer_dir: Path, vocab_size: int) -> None:
    """Tokenizer metadata from a folder's tokenizer.json (GPT-2 style byte-level BPE), via gguf.vocab."""
    import gguf

    try:
        vocab = gguf.vocab.BpeVocab(tokenizer_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise InteropError(
            f"{tokenizer_dir}: GGUF export needs a byte-level BPE tokenizer.json (or give --vocab-from FILE.gguf "
            f"to copy another GGUF's tokenizer): {exc}"
        ) from exc
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text.encode("utf-8") if isinstance(text, str) else text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise InteropError(f"{tokenizer_dir}: the tokenizer has {len(tokens)} tokens, the model only {vocab_size}")
    for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer (padding), as llama.cpp's convert
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _copy_vocab(writer: Any, source: Path) -> None:
    """Every ``tokenizer.*`` key of another GGUF file, as stored (e.g. the file the model was loaded from)."""
    from gguf import GGUFValueType

    from fastquant.interop.gguf_in import _reader

    reader = _reader(source)
    keys = [k for k in reader.fields if k.startswith("tokenizer.")]
    if not keys:
        raise InteropError(f"{source}: no tokenizer.* keys to copy")
    for key in keys:
        field = reader.fields[key]
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)


def export_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    vocab_from: str | os.PathLike | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Write a fastquant llama-family model (transformers LlamaForCausalLM, patched or loaded from a checkpoint)
    to ``path`` as GGUF. The tokenizer comes from ``tokenizer_dir`` (a folder with tokenizer.json) or is copied
    from the GGUF file ``vocab_from``; one of them is required (llama.cpp will not load a model without one).

    Returns a summary: tensor counts per GGUF type, the largest relative change of a scale (Q8_0 stores fp16
    scales), the file size. Raises InteropError for other architectures and for layouts GGUF has no type for."""
    import gguf

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InteropError(
            f"GGUF export supports llama-family models (model_type {', '.join(SUPPORTED_MODEL_TYPES)}), "
            f"got {model_type!r} ({type(model).__name__})"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise InteropError(f"GGUF export: rope scaling {rope_type!r} is not supported (plain rotary only)")
    if tokenizer_dir is None and vocab_from is None:
        raise InteropError(
            "GGUF export needs a tokenizer: a folder with tokenizer.json, or a GGUF file to copy it from"
        )
    n_layers = config.num_hidden_layers
    n_head = config.num_attention_heads
    n_head_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)

    # Decide every layer's type before writing anything: a refused layout must not leave half a file.
    linears: dict[str, tuple[nn.Module, str]] = {}
    embedding = model.get_input_embeddings().weight
    int4 = _int4_class()
    for module_name, module in model.named_modules():
        if not (
            is_quantizable_linear(module)
            or isinstance(module, (Int8Linear, SparseLinear))
            or (int4 is not None and isinstance(module, int4))
        ):
            continue
        if is_quantizable_linear(module) and linear_weight(module).data_ptr() == embedding.data_ptr():
            continue  # a head tied to the token embedding: llama.cpp reuses token_embd when output.weight is absent
        linears[module_name] = (module, layer_gguf_type(module_name, module))
    quant_types = {t for _, t in linears.values() if t != "F32"}
    file_type = {
        frozenset({"Q8_0"}): gguf.LlamaFileType.MOSTLY_Q8_0,
        frozenset({"Q4_0"}): gguf.LlamaFileType.MOSTLY_Q4_0,
        frozenset({"Q4_0", "Q8_0"}): gguf.LlamaFileType.MOSTLY_Q4_0,
    }.get(frozenset(quant_types), gguf.LlamaFileType.ALL_F32)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name or getattr(config, "_name_or_path", "") or "fastquant model")
    writer.add_block_count(n_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if vocab_from is not None:
        _copy_vocab(writer, Path(vocab_from))
    else:
        _add_vocab(writer, Path(tokenizer_dir), config.vocab_size)

    counts: dict[str, int] = {}
    max_scale_change = 0.0
    written: set[str] = set()
    tied_head = False
    for key, tensor in model.state_dict().items():
        module_name, _, suffix = key.rpartition(".")
        if module_name in linears:
            if module_name in written:
                continue
            module, gguf_type = linears[module_name]
            tensor_name = name_map.get_name(module_name)
            if tensor_name is None:
                raise InteropError(f"GGUF export: no GGUF name for layer {module_name!r}")
            if suffix == "bias" or module.bias is not None:
                raise InteropError(f"GGUF export: layer {module_name!r} has a bias, which llama GGUFs do not carry")
            written.add(module_name)
            values, scales = _linear_tensor(module, gguf_type)
            rows = _row_permutation(tensor_name + ".weight", values.shape[0], n_head, n_head_kv)
            if rows is not None:
                values = values[rows]
                scales = None if scales is None else scales[rows]
            if gguf_type == "F32":
                writer.add_tensor(tensor_name + ".weight", np.ascontiguousarray(values, dtype=np.float32))
            else:
                scales = scales.astype(np.float32)
                half = scales.astype(np.float16).astype(np.float32)
                if not np.isfinite(half).all():
                    raise InteropError(f"layer {module_name!r}: a scale is beyond fp16's range (Q8_0/Q4_0 store fp16)")
                nonzero = scales != 0
                if nonzero.any():
                    change = np.abs(half[nonzero] / scales[nonzero] - 1).max()
                    max_scale_change = max(max_scale_change, float(change))
                blocks = _q8_0_bytes(values, scales) if gguf_type == "Q8_0" else _q4_0_bytes(values, scales)
                writer.add_tensor(tensor_name + ".weight", blocks, raw_dtype=gguf.GGMLQuantizationType[gguf_type])
            counts[gguf_type] = counts.get(gguf_type, 0) + 1
            continue
        if module_name == "lm_head":
            tied_head = True
            continue  # the tied head skipped above
        tensor_name = name_map.get_name(module_name)
        if tensor_name is None:
            continue  # no GGUF counterpart (e.g. rotary buffers are derived, not stored)
        writer.add_tensor(f"{tensor_name}.{suffix}", _float_array(tensor))
        counts["F32"] = counts.get("F32", 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "tensor_types": counts,
        "file_type": file_type.name,
        "tied_lm_head": tied_head,
        "max_relative_scale_change": max_scale_change,
    }


def export_checkpoint_gguf(
    checkpoint_dir: str | os.PathLike, path: str | os.PathLike, *, vocab_from: str | os.PathLike | None = None
) -> dict[str, Any]:
    """``fastquant export CHECKPOINT_DIR --format gguf -o FILE``: the folder ``fastquant compress -o`` wrote."""
    from fastquant.serialization import from_pretrained

    model, _ = from_pretrained(checkpoint_dir)
    return export_gguf(model, path, tokenizer_dir=None if vocab_from else checkpoint_dir, vocab_from=vocab_from)
