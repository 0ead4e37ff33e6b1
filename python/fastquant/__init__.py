"""fastquant: make PyTorch models smaller and faster with int8 weight-only quantization and sparsity.

import fastquant
fastquant.patch(model)            # int8 weight-only, per-channel scales
print(fastquant.report(model))    # what changed, per layer
"""

from importlib.metadata import PackageNotFoundError, version

from fastquant import (
    _native,  # noqa: F401  (loads fastquant._C, which registers the native kernels)
    ops,  # defines the torch.ops.fastquant schemas before the native kernels register
)
from fastquant.modules import Int8Linear
from fastquant.ops import int8_linear
from fastquant.patching import Report, patch, report
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
    "__version__",
    "int8_dequantize",
    "int8_linear",
    "int8_quantize",
    "load",
    "ops",
    "patch",
    "report",
    "save",
]
