"""GGUF in: a transformers model whose linear layers hold the GGUF file's own quantized codes.

model = fastquant.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")

The file is read with the ``gguf`` package (``GGUFReader``; ``gguf.quants.dequantize`` for what stays float) and the
model is built from transformers' own GGUF config and tensor-name mapping, so names, config keys and llama.cpp's
Q/K row permutation follow exactly what ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` does. Linear
layers whose tensor is Q8_0 become Int8Linear (group 32), Q4_0 / Q4_1 become Int4Linear (group 32, symmetric /
asymmetric): the codes and block scales are taken as they are, so each layer's ``dequantize()`` is bit-identical to
gguf's de-quantization of the tensor. Other tensor types are de-quantized to float, with a note in
:func:`fastquant.report`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastquant.interop import InteropError
from fastquant.modules import Int8Linear, _CompressedLinear

SUPPORTED_ARCHITECTURES = ("llama",)
BLOCK = 32  # weights per block in Q8_0, Q4_0 and Q4_1: the fastquant group size they load as


class GGUFFormatError(InteropError):
    """A GGUF file that cannot be read: truncated, corrupted, or inconsistent with its own metadata."""


def _reader(path: Path) -> Any:
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        return GGUFReader(path)
    except Exception as exc:  # the reader fails with ValueError, struct, numpy or index errors on damaged files
        raise GGUFFormatError(f"{path}: not a readable GGUF file (truncated or corrupted?): {exc}") from exc


def _field(reader: Any, key: str) -> Any:
    from transformers.modeling_gguf_pytorch_utils import read_field

    value = read_field(reader, key)
    return value[0] if len(value) == 1 else value


def architecture(path: str | os.PathLike) -> str:
    """The ``general.architecture`` of a GGUF file."""
    path = Path(path)
    return str(_field(_reader(path), "general.architecture"))


def q8_0_codes(data: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 rows as (int8 codes (N, K), fp16 block scales (N, K/32)). A block is an fp16 scale then 32 int8."""
    n, k = shape
    blocks = np.asarray(data, dtype=np.uint8).reshape(n, k // BLOCK, 2 + BLOCK)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k)
    return codes, scales


def q4_codes(data: np.ndarray, shape: tuple[int, int], asymmetric: bool) -> tuple[np.ndarray, np.ndarray, Any]:
    """Q4_0 / Q4_1 rows as (codes 0..15 uint8 (N, K), fp16 scales (N, K/32), fp16 offsets (N, K/32) or None).

    A block is an fp16 scale (Q4_1: then an fp16 minimum) and 16 bytes: byte j holds weight j in its low nibble
    and weight j + 16 in its high nibble."""
    n, k = shape
    head = 4 if asymmetric else 2
    blocks = np.asarray(data, dtype=np.uint8).reshape(n, k // BLOCK, head + BLOCK // 2)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    offsets = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0] if asymmetric else None
    packed = blocks[..., head:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k)
    return codes, scales, offsets


def _row_permutation(processor: Any, name: str, n_rows: int) -> np.ndarray:
    """The row order transformers gives this tensor (llama.cpp stores Q and K rows permuted for its rotary
    layout): its own tensor processor applied to the row indices, so codes and scales move exactly like the
    float rows would."""
    rows = np.arange(n_rows, dtype=np.int64).reshape(n_rows, 1)
    return np.asarray(processor.process(weights=rows, name=name).weights).reshape(n_rows)


def _int8_layer(module: nn.Linear, data: np.ndarray, shape: tuple[int, int], rows: np.ndarray, dtype) -> nn.Module:
    codes, scales = q8_0_codes(data, shape)
    if not np.isfinite(scales).all():
        raise ValueError("NaN/inf block scales")
    layer = Int8Linear(shape[1], shape[0], module.bias is not None, BLOCK, device="cpu", dtype=dtype)
    layer.qweight.copy_(torch.from_numpy(codes[rows]))
    # fp16 -> fp32 is exact, and the kernels multiply code by fp32 scale like gguf's dequantization does.
    layer.scales.copy_(torch.from_numpy(scales[rows].astype(np.float32)))
    return layer


def _int4_layer(
    module: nn.Linear, data: np.ndarray, shape: tuple[int, int], rows: np.ndarray, dtype, asymmetric: bool
) -> nn.Module:
    from fastquant.modules import Int4Linear

    codes, scales, offsets = q4_codes(data, shape, asymmetric)
    if not np.isfinite(scales).all() or (offsets is not None and not np.isfinite(offsets).all()):
        raise ValueError("NaN/inf block scales")
    return Int4Linear.from_codes(
        torch.from_numpy(np.ascontiguousarray(codes[rows])),
        torch.from_numpy(np.ascontiguousarray(scales[rows])),
        None if offsets is None else torch.from_numpy(np.ascontiguousarray(offsets[rows])),
        None if module.bias is None else torch.zeros(shape[0], dtype=dtype),  # filled from its own tensor
        BLOCK,
        in_features=shape[1],
        dtype=dtype,
    )


def _native_loaders() -> dict[str, Callable[..., nn.Module]]:
    """GGUF type name -> builder of the fastquant layer that holds its codes as they are."""
    from fastquant import modules

    loaders: dict[str, Callable[..., nn.Module]] = {"Q8_0": _int8_layer}
    if hasattr(modules, "Int4Linear"):
        loaders["Q4_0"] = lambda *a: _int4_layer(*a, asymmetric=False)
        loaders["Q4_1"] = lambda *a: _int4_layer(*a, asymmetric=True)
    return loaders


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _materialize(model: nn.Module) -> None:
    """Allocate every tensor still on the meta device (the float ones; fastquant layers were built on the CPU)
    and rebuild the rotary embeddings on the CPU: their frequencies are derived from the config, not stored."""
    for module in model.modules():
        if not isinstance(module, _CompressedLinear):
            module.to_empty(device="cpu", recurse=False)
    rotary = [(n, m) for n, m in model.named_modules() if "inv_freq" in m._buffers and hasattr(m, "config")]
    for name, module in rotary:
        with torch.device("cpu"):
            _set_submodule(model, name, type(module)(config=module.config))


def _gguf_to_hf_names(model: nn.Module, arch: str) -> dict[str, str]:
    """GGUF tensor name -> state-dict name, from gguf's tensor-name table, as transformers'
    ``get_gguf_hf_weights_map`` derives it for top-level names (which is all a llama needs); built once here
    rather than once per submodule (that recursion costs seconds on a 30-layer model)."""
    import gguf

    arch_id = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    table = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    names: dict[str, str] = {}
    for hf_name in model.state_dict():
        module, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(module)
        if gguf_name is not None:
            names.setdefault(f"{gguf_name}.{suffix}", hf_name)
    return names


def from_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, quantized_lm_head: bool = True):
    """A transformers causal LM built from a llama-family GGUF file, its linear layers loaded straight from the
    file's quantized tensors (Q8_0 -> Int8Linear group 32; Q4_0 / Q4_1 -> Int4Linear group 32 symmetric /
    asymmetric). Other tensor types, embeddings and norms are de-quantized to ``dtype`` (``fastquant.report``
    notes each linear layer that stayed float and why).

    ``quantized_lm_head``: when the output layer is tied to a quantized token embedding (no ``output.weight`` in
    the file, as llama.cpp writes small models), the lm_head becomes a fastquant layer holding the embedding's
    codes (as llama.cpp computes it) and the embedding is a float copy; False keeps them tied, in float.

    Raises :class:`InteropError` for architectures other than llama, :class:`GGUFFormatError` for truncated,
    corrupted or inconsistent files. The model is returned in eval mode.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quant_shape_from_byte_shape
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    path = Path(path)
    reader = _reader(path)
    try:
        arch = _field(reader, "general.architecture")
    except Exception as exc:
        raise GGUFFormatError(f"{path}: cannot read general.architecture: {exc}") from exc
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InteropError(
            f"{path}: GGUF architecture {arch!r} is not supported by fastquant.from_gguf "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise GGUFFormatError(f"{path}: transformers cannot read the model config from the file: {exc}") from exc
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    gguf_to_hf = _gguf_to_hf_names(model, arch)
    loaders = _native_loaders()
    notes: dict[str, str] = {}
    floats: list[tuple[Any, str]] = []
    types: Counter[str] = Counter()
    tied = "output.weight" not in {t.name for t in reader.tensors} and getattr(config, "tie_word_embeddings", False)

    def native_layer(tensor: Any, module: nn.Module) -> nn.Module:
        qtype = GGMLQuantizationType(tensor.tensor_type)
        try:
            shape = tuple(int(s) for s in quant_shape_from_byte_shape(tensor.data.shape, qtype))
        except ValueError as exc:
            raise GGUFFormatError(f"{path}: tensor {tensor.name}: {exc}") from exc
        want = (module.out_features, module.in_features)
        if shape != want:
            raise GGUFFormatError(
                f"{path}: tensor {tensor.name} is {shape[0]}x{shape[1]}, the model config implies {want[0]}x{want[1]}"
            )
        rows = _row_permutation(processor, tensor.name, shape[0])
        try:
            return loaders[qtype.name](module, tensor.data, shape, rows, dtype)
        except ValueError as exc:
            raise GGUFFormatError(f"{path}: tensor {tensor.name}: {exc} (corrupted file?)") from exc

    for tensor in reader.tensors:
        qtype = GGMLQuantizationType(tensor.tensor_type)
        types[qtype.name] += 1
        hf_name = gguf_to_hf.get(tensor.name)
        if hf_name is None:
            continue  # tensors transformers has no parameter for (e.g. rope_freqs): it skips them too
        module_name, _, kind = hf_name.rpartition(".")
        module = model.get_submodule(module_name)
        linear = isinstance(module, nn.Linear) and kind == "weight"
        if linear and qtype.name in loaders:
            _set_submodule(model, module_name, native_layer(tensor, module))
            notes[module_name] = f"GGUF {qtype.name}, codes as stored"
            continue
        if linear:
            notes[module_name] = f"GGUF {qtype.name}: no fastquant layer for this type, de-quantized to float"
        if tied and tensor.name == "token_embd.weight" and quantized_lm_head and qtype.name in loaders:
            head = model.get_submodule("lm_head")
            _set_submodule(model, "lm_head", native_layer(tensor, head))
            notes["lm_head"] = f"GGUF {qtype.name} (token_embd.weight, tied), codes as stored"
            model.config.tie_word_embeddings = False  # the head is its own layer now: never re-tie it
        floats.append((tensor, hf_name))

    _materialize(model)
    params = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    filled: set[str] = set()
    for tensor, hf_name in floats:
        qtype = GGMLQuantizationType(tensor.tensor_type)
        target = params.get(hf_name)
        if target is None:
            raise GGUFFormatError(f"{path}: tensor {tensor.name} maps to {hf_name}, which the model does not have")
        try:
            weights = np.array(dequantize(tensor.data, qtype))  # a copy: the reader's arrays are read-only maps
        except NotImplementedError as exc:
            raise InteropError(
                f"{path}: tensor {tensor.name} has GGUF type {qtype.name}, which gguf cannot read"
            ) from exc
        except ValueError as exc:
            raise GGUFFormatError(f"{path}: tensor {tensor.name}: {exc}") from exc
        weights = np.asarray(processor.process(weights=weights, name=tensor.name).weights)
        if weights.size != target.numel():
            raise GGUFFormatError(
                f"{path}: tensor {tensor.name} holds {weights.size} values, the model config implies "
                f"{tuple(target.shape)} for {hf_name}"
            )
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.ascontiguousarray(weights)).reshape(target.shape))
        filled.add(hf_name)
    if tied and isinstance(model.get_submodule("lm_head"), nn.Linear):
        model.tie_weights()
        filled.add("lm_head.weight")
    state = model.state_dict()
    missing = [
        name
        for name in state
        if name not in filled and not isinstance(model.get_submodule(name.rpartition(".")[0]), _CompressedLinear)
    ]
    if missing:
        raise GGUFFormatError(f"{path}: the file has no tensor for {missing[:5]} ({len(missing)} missing)")
    model._fastquant_notes = notes
    model._fastquant_gguf = {"path": str(path), "architecture": arch, "tensor_types": dict(types)}
    return model.eval()
