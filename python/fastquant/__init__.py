"""fastquant: make PyTorch models smaller and faster with int8/int4 weight-only quantization and sparsity.

import fastquant
fastquant.patch(model)            # int8 weight-only, per-channel scales
fastquant.patch(model, "int4", group_size=32, calibration=batches)  # int4, GPTQ-rounded on your inputs
fastquant.patch(model, "int8+sparse", sparsity=0.5, tokenizer=tokenizer)  # SparseGPT on the embedded text
fastquant.patch(model, fastquant.Int8(group_size=128, rounding=fastquant.GPTQ(batches)))  # typed config
print(fastquant.report(model))    # what changed, per layer
model, tokenizer = fastquant.from_pretrained("smollm2-int8")  # a folder `fastquant compress` wrote
model = fastquant.from_gguf("model.Q8_0.gguf")  # a GGUF file's quantized tensors, run by fastquant's kernels
fastquant.distill(student, teacher, "text.txt", fastquant.DistillConfig(minutes=30), tokenizer)  # recover accuracy

The names below load on first use: importing torch takes seconds, and ``fastquant --help`` (whose module
lives in this package) must not pay for it. Any of them, or importing a submodule that needs the kernels,
loads the native extension and defines the ``torch.ops.fastquant`` operators.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastquant.algorithms import pruning
    from fastquant.algorithms.distillation import DistillConfig, distill
    from fastquant.configs import GPTQ, RTN, Int4, Int8, Magnitude, Sparse, SparseGPT, Wanda
    from fastquant.decode import compile_for_decode
    from fastquant.interop.gguf_in import from_gguf
    from fastquant.kernels import ops
    from fastquant.kernels.ops import decode_attention, int4_linear, int8_linear, sparse_linear
    from fastquant.kernels.reference import int4_dequantize, int4_quantize, int8_dequantize, int8_quantize
    from fastquant.modules import Int4Linear, Int8Linear, SparseLinear
    from fastquant.patching import AlreadyPatchedError, Report, patch, prune, report
    from fastquant.serialization import FastquantFormatError, from_pretrained, load, save

try:
    __version__ = version("fastquant")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    "AlreadyPatchedError": "fastquant.patching",
    "GPTQ": "fastquant.configs",
    "Int4": "fastquant.configs",
    "Int8": "fastquant.configs",
    "Magnitude": "fastquant.configs",
    "RTN": "fastquant.configs",
    "Sparse": "fastquant.configs",
    "SparseGPT": "fastquant.configs",
    "Wanda": "fastquant.configs",
    "FastquantFormatError": "fastquant.serialization",
    "Int4Linear": "fastquant.modules",
    "Int8Linear": "fastquant.modules",
    "Report": "fastquant.patching",
    "SparseLinear": "fastquant.modules",
    "DistillConfig": "fastquant.algorithms.distillation",
    "compile_for_decode": "fastquant.decode",
    "decode_attention": "fastquant.kernels.ops",
    "from_gguf": "fastquant.interop.gguf_in",
    "distill": "fastquant.algorithms.distillation",
    "from_pretrained": "fastquant.serialization",
    "int4_dequantize": "fastquant.kernels.reference",
    "int4_linear": "fastquant.kernels.ops",
    "int4_quantize": "fastquant.kernels.reference",
    "int8_dequantize": "fastquant.kernels.reference",
    "int8_linear": "fastquant.kernels.ops",
    "int8_quantize": "fastquant.kernels.reference",
    "load": "fastquant.serialization",
    "patch": "fastquant.patching",
    "prune": "fastquant.patching",
    "report": "fastquant.patching",
    "save": "fastquant.serialization",
    "sparse_linear": "fastquant.kernels.ops",
}
# public name -> the submodule it stands for
_SUBMODULES = {"ops": "fastquant.kernels.ops", "pruning": "fastquant.algorithms.pruning"}

__all__ = [
    "GPTQ",
    "RTN",
    "AlreadyPatchedError",
    "Int4",
    "Int8",
    "Magnitude",
    "Sparse",
    "SparseGPT",
    "Wanda",
    "DistillConfig",
    "FastquantFormatError",
    "Int4Linear",
    "Int8Linear",
    "Report",
    "SparseLinear",
    "__version__",
    "compile_for_decode",
    "decode_attention",
    "from_gguf",
    "distill",
    "from_pretrained",
    "int4_dequantize",
    "int4_linear",
    "int4_quantize",
    "int8_dequantize",
    "int8_linear",
    "int8_quantize",
    "load",
    "ops",
    "patch",
    "prune",
    "pruning",
    "report",
    "save",
    "sparse_linear",
]


def __getattr__(name: str) -> Any:
    # `from fastquant import cli` asks here first: names that are not ours must not load torch.
    if name not in _EXPORTS and name not in _SUBMODULES:
        raise AttributeError(f"module 'fastquant' has no attribute {name!r}")
    importlib.import_module("fastquant.kernels.extension")  # the kernels and operator schemas come before any API
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        value = importlib.import_module(_SUBMODULES[name])
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
