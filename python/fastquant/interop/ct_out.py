"""compressed-tensors out: a fastquant model as the checkpoint format vLLM, SGLang and transformers read.

The ``compressed-tensors`` package (``pip install "fastquant[export]"``) defines and writes the format: each
fastquant layer becomes an ``nn.Linear`` holding exactly the weight the layer computes with (codes times scales),
the package's quantization scheme is attached with fastquant's own scales, and the package compresses it, which
recovers fastquant's codes exactly (round(code * scale / scale) == code). Layouts:

- int8 per-channel -> int-quantized, strategy "channel"; int8 group g -> strategy "group", group_size g
- int4 symmetric group g -> pack-quantized (4 bits, group g): fastquant's codes 0..15 are compressed-tensors'
  signed codes -8..7 (both mean scale * (code - 8))
- sparse layers: dense, masks applied (pruned weights are zero codes); compressed-tensors has no sparse form
  its readers accept any more (its sparsity config is empty since 0.14)
- float linear layers (e.g. an untouched lm_head) stay float, listed in ``ignore``.

Refused: asymmetric int4 (compressed-tensors' zero points are integers; fastquant's offsets are floats).
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastquant.interop import InteropError
from fastquant.kernels import reference
from fastquant.modules import Int8Linear, SparseLinear, _CompressedLinear


def _int4_class() -> type | None:
    from fastquant import modules

    return getattr(modules, "Int4Linear", None)


def _layout(name: str, module: nn.Module) -> tuple[int, int | None] | None:
    """(bits, group size or None for per-channel) of a compressed layer; None for a float layer."""
    int4 = _int4_class()
    if isinstance(module, Int8Linear):
        return 8, module.group_size
    if isinstance(module, SparseLinear):
        return (8, module.group_size) if module.values.dtype == torch.int8 else None
    if int4 is not None and isinstance(module, int4):
        if getattr(module, "offsets", None) is not None:
            raise InteropError(
                f"layer {name!r} is asymmetric int4: compressed-tensors stores integer zero points and this layer's "
                "offsets are floats, so it cannot be written exactly (use symmetric int4)"
            )
        return 4, module.group_size
    return None


def _codes_and_scales(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed integer codes (N, K) as compressed-tensors counts them, and fp32 scales (N, 1) or (N, G)."""
    int4 = _int4_class()
    if isinstance(module, Int8Linear):
        codes = module.qweight
    elif isinstance(module, SparseLinear):
        codes = reference.sparse_unpack(module.values, module.masks, module.row_offsets, module.in_features)
    elif int4 is not None and isinstance(module, int4):
        codes = reference.int4_unpack(module.qweight, module.in_features).to(torch.int16) - 8
    else:
        raise TypeError(type(module).__name__)
    scales = module.scales.float()
    return codes.to(torch.int16), scales[:, None] if scales.dim() == 1 else scales


def _float_linear(module: nn.Module) -> nn.Linear:
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=torch.float32)
    with torch.no_grad():
        linear.weight.copy_(module.dequantize().float())
        if module.bias is not None:
            linear.bias.copy_(module.bias.float())
    return linear


def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: Any = None) -> dict[str, Any]:
    """Write ``model`` (fastquant layers) to ``out_dir`` as a compressed-tensors checkpoint that
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads (with ``compressed-tensors`` installed). The model
    itself is left as it is. Returns a summary (layers per scheme, format, files)."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationConfig,
            QuantizationScheme,
            QuantizationStatus,
            apply_quantization_config,
        )
    except ImportError as exc:
        raise InteropError(
            "compressed-tensors export needs the compressed-tensors package: pip install 'fastquant[export]'"
        ) from exc

    layouts: dict[str, tuple[int, int | None]] = {}
    float_linears: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, _CompressedLinear) or (_int4_class() and isinstance(module, _int4_class())):
            layout = _layout(name, module)
            if layout is None:
                float_linears.append(name)
            else:
                layouts[name] = layout
        elif isinstance(module, nn.Linear):
            float_linears.append(name)
    if not layouts:
        raise InteropError("the model has no int8/int4 fastquant layers to write as compressed-tensors")
    rounded_x = [name for name in layouts if getattr(model.get_submodule(name), "int8_activations", False)]
    if rounded_x:
        counts = [(sum(layouts[name][0] == bits for name in rounded_x), f"int{bits}") for bits in (8, 4)]
        kinds = " and ".join(f"{count} {kind}" for count, kind in counts if count)
        warnings.warn(
            f"{kinds} layers round their input to int8 (int8_activations); compressed-tensors gets "
            "their weights only, and engines that load it compute with float activations",
            stacklevel=2,
        )

    # A float copy whose linear layers hold exactly the weights the fastquant layers compute with.
    float_model = copy.deepcopy(model)
    for name in list(layouts) + [
        n for n in float_linears if isinstance(float_model.get_submodule(n), _CompressedLinear)
    ]:
        parent_name, _, child = name.rpartition(".")
        parent = float_model.get_submodule(parent_name) if parent_name else float_model
        setattr(parent, child, _float_linear(model.get_submodule(name)))
    float_model = nn.Module.float(float_model)  # transformers refuses .float() on models it loaded from GGUF
    # A model transformers loaded from a GGUF file keeps its GGUF "quantizer", which only de-quantized the
    # weights at load time and makes save_pretrained refuse the model: the copy holds plain float weights.
    if getattr(float_model, "hf_quantizer", None) is not None:
        float_model.hf_quantizer = None

    groups: dict[tuple[int, int | None], list[str]] = {}
    for name, layout in layouts.items():
        groups.setdefault(layout, []).append(name)
    config_groups = {}
    for i, ((bits, group_size), names) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))):
        args = QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=True,
            strategy="channel" if group_size is None else "group",
            group_size=group_size,
        )
        config_groups[f"group_{i}"] = QuantizationScheme(targets=names, weights=args)
    config = QuantizationConfig(
        config_groups=config_groups,
        ignore=float_linears,
        quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(float_model, config, show_progress=False)
    with torch.no_grad():
        for name in layouts:
            target = float_model.get_submodule(name)
            _, scales = _codes_and_scales(model.get_submodule(name))
            target.weight_scale.copy_(scales.to(target.weight_scale.dtype))
            if hasattr(target, "weight_zero_point"):
                target.weight_zero_point.zero_()
    compressor = ModelCompressor.from_pretrained_model(float_model)
    compressor.compress_model(float_model)

    # The package re-derives the codes from weight and scale: check that they are fastquant's, code for code.
    for name in layouts:
        codes, _ = _codes_and_scales(model.get_submodule(name))
        written = _written_codes(float_model.get_submodule(name), layouts[name][0])
        if not torch.equal(written, codes):
            raise InteropError(f"layer {name!r}: compressed-tensors re-derived different codes (scale out of range?)")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(float_model, "config"):
        float_model.config.quantization_config = None
        del float_model.config.quantization_config
    float_model.save_pretrained(out)
    compressor.update_config(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return {
        "path": str(out),
        "format": str(config.format) if getattr(config, "format", None) else compressor.quantization_config.format,
        "schemes": {
            f"int{bits} " + ("per-channel" if g is None else f"group {g}"): len(names)
            for (bits, g), names in groups.items()
        },
        "float_layers": float_linears,
    }


def _written_codes(module: nn.Module, bits: int) -> torch.Tensor:
    """The signed codes a compressed module stores (int-quantized: ``weight`` int8; pack-quantized: unpacked)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    if hasattr(module, "weight_packed"):
        shape = torch.Size(module.weight_shape.tolist())
        return unpack_from_int32(module.weight_packed, bits, shape).to(torch.int16)
    return module.weight.to(torch.int16)


def export_checkpoint_compressed_tensors(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """``fastquant export CHECKPOINT_DIR --format compressed-tensors -o DIR``."""
    from fastquant.serialization import from_pretrained

    model, tokenizer = from_pretrained(checkpoint_dir)
    return export_compressed_tensors(model, out_dir, tokenizer=tokenizer)
