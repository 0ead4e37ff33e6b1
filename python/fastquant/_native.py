"""Loads the compiled extension tolerantly and remembers why it could not be loaded.

Without it every op still works through the pure-PyTorch reference kernels; ``python -m
fastquant.info`` says which kernels are live and, if the extension failed to load, why.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from fastquant import ops  # noqa: F401  (defines the operator schemas the native kernels register for)

logger = logging.getLogger("fastquant")

native: ModuleType | None = None
load_error: str | None = None

try:
    native = importlib.import_module("fastquant._C")
except ImportError as exc:  # a missing or mismatched build must not make the package unusable
    load_error = f"{type(exc).__name__}: {exc}"
    logger.warning("fastquant native kernels unavailable, using pure-PyTorch reference kernels (%s)", load_error)
else:
    built_for = native.build_info()["torch_version"]
    running = torch.__version__.split("+")[0]
    if built_for and not running.startswith(built_for):
        logger.warning("fastquant was built for torch %s but torch %s is running", built_for, torch.__version__)


def has_cpu_kernels() -> bool:
    return native is not None


def has_cuda_kernels() -> bool:
    return native is not None and bool(native.build_info()["cuda"])


def int8_linear_kernel_path(device: torch.device, m: int, n: int, k: int, group_size: int, dtype: torch.dtype) -> str:
    """Name of the kernel ``int8_linear`` runs for an (m, k) x (n, k)^T problem on ``device``."""
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cpu" and has_cpu_kernels():
        return native.int8_linear_cpu_path(m, n, k, group_size, dtype_name)
    if device.type == "cuda" and has_cuda_kernels():
        return native.int8_linear_cuda_path(m, n, k, group_size, dtype_name)
    return "reference"


def sparse_linear_kernel_path(
    device: torch.device,
    m: int,
    n: int,
    k: int,
    values_dtype: torch.dtype,
    x_dtype: torch.dtype,
    group_size: int = -1,
) -> str:
    """Name of the kernel ``sparse_linear`` runs for an (m, k) x (n, k)^T problem on ``device``."""
    values_name = str(values_dtype).removeprefix("torch.")
    x_name = str(x_dtype).removeprefix("torch.")
    if device.type == "cpu" and has_cpu_kernels() and hasattr(native, "sparse_linear_cpu_path"):
        return native.sparse_linear_cpu_path(m, n, k, values_name, x_name, group_size)
    if device.type == "cuda" and has_cuda_kernels() and hasattr(native, "sparse_linear_cuda_path"):
        return native.sparse_linear_cuda_path(m, n, k, values_name, x_name)
    return "reference"


def sparse_csr_linear_kernel_path(device: torch.device) -> str:
    """Name of the kernel ``sparse_csr_linear`` runs on ``device``."""
    if device.type == "cpu" and has_cpu_kernels() and hasattr(native, "sparse_csr_linear_cpu_path"):
        return native.sparse_csr_linear_cpu_path()
    if device.type == "cuda" and has_cuda_kernels() and hasattr(native, "sparse_csr_linear_cuda_path"):
        return native.sparse_csr_linear_cuda_path()
    return "reference"
