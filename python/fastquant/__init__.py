"""fastquant: make PyTorch models smaller and faster with int8 weight-only quantization and sparsity.

import fastquant
fastquant.patch(model)            # int8 weight-only, per-channel scales
fastquant.patch(model, "int8+sparse", sparsity=0.5, pruning="sparsegpt", calibration=batches)
print(fastquant.report(model))    # what changed, per layer
"""

from importlib.metadata import PackageNotFoundError, version

from fastquant import (
    _native,  # noqa: F401  (loads fastquant._C, which registers the native kernels)
    ops,  # defines the torch.ops.fastquant schemas before the native kernels register
    pruning,
)
from fastquant.decode import compile_for_decode
from fastquant.modules import Int8Linear, SparseLinear
from fastquant.ops import int8_linear, sparse_linear
from fastquant.patching import Report, patch, prune, report
from fastquant.reference import int8_dequantize, int8_quantize
from fastquant.serialization import FastquantFormatError, load, save

try:
    __version__ = version("fastquant")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "FastquantFormatError",
    "Int8Linear",
    "Report",
    "SparseLinear",
    "__version__",
    "compile_for_decode",
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
