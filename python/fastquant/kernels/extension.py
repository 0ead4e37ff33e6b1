"""Loads the compiled extension tolerantly and remembers why it could not be loaded.

Without it every op still works through the pure-PyTorch reference kernels; ``python -m
fastquant.info`` says which kernels are live and, if the extension failed to load, why.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from fastquant.kernels import ops  # defines the operator schemas the native kernels register for

logger = logging.getLogger("fastquant")

native: ModuleType | None = None
load_error: str | None = None

try:
    native = importlib.import_module("fastquant._C")
except ImportError as exc:  # a missing or mismatched build must not make the package unusable
    load_error = f"{type(exc).__name__}: {exc}"
    logger.warning("fastquant native kernels unavailable, using pure-PyTorch reference kernels (%s)", load_error)
    ops.register_reference_autograd()  # the extension registers its own, in C++
else:
    built_for = native.build_info()["torch_version"]
    running = torch.__version__.split("+")[0]
    if built_for and not running.startswith(built_for):
        logger.warning("fastquant was built for torch %s but torch %s is running", built_for, torch.__version__)


def has_cpu_kernels() -> bool:
    return native is not None


def has_cuda_kernels() -> bool:
    return native is not None and bool(native.build_info()["cuda"])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cuda_int8_linear_path(
    m: int,
    n: int,
    k: int,
    group_size: int,
    dtype: torch.dtype,
    *,
    x_aligned: bool = True,
    w_aligned: bool = True,
) -> str:
    """Name of the CUDA kernel ``int8_linear`` takes for an (m, k) x (n, k)^T problem whose x and weight data
    pointers are (or are not) 16-byte aligned, under this process's caps. The choice is plain C++ compiled
    into every build of the extension, so this answers without a GPU (with the default caps when the CUDA
    kernels were not built)."""
    dispatch = native.cuda_dispatch
    built = has_cuda_kernels()
    return dispatch.int8_path(
        m,
        n,
        k,
        group_size,
        _dtype_name(dtype),
        x_aligned=x_aligned,
        w_aligned=w_aligned,
        gemv_max_m=native.cuda_gemv_max_m() if built else dispatch.DEFAULT_GEMV_MAX_M,
        gemm_max_m=native.cuda_gemm_max_m() if built else dispatch.DEFAULT_GEMM_MAX_M,
    )


def cuda_sparse_linear_path(
    m: int,
    n: int,
    k: int,
    values_dtype: torch.dtype,
    x_dtype: torch.dtype,
    group_size: int,
    max_smem_bytes: int,
) -> str:
    """Name of the CUDA kernel ``sparse_linear`` (bitmap16) takes on a device that allows ``max_smem_bytes`` of
    shared memory per block, under this process's caps; answers without a GPU, like
    :func:`cuda_int8_linear_path`."""
    dispatch = native.cuda_dispatch
    built = has_cuda_kernels()
    if built and native.sparse_cuda_smem_limit() > 0:
        max_smem_bytes = min(max_smem_bytes, native.sparse_cuda_smem_limit())
    return dispatch.sparse_path(
        m,
        n,
        k,
        _dtype_name(values_dtype),
        _dtype_name(x_dtype),
        group_size,
        max_smem_bytes,
        gemv_max_m=native.sparse_cuda_gemv_max_m() if built else dispatch.DEFAULT_SPARSE_GEMV_MAX_M,
        mma_max_m=native.sparse_cuda_mma_max_m() if built else dispatch.DEFAULT_SPARSE_MMA_MAX_M,
    )


def int8_linear_kernel_path(
    device: torch.device,
    m: int,
    n: int,
    k: int,
    group_size: int,
    dtype: torch.dtype,
    int8_activations: bool = False,
) -> str:
    """Name of the kernel ``int8_linear`` runs for an (m, k) x (n, k)^T problem on ``device`` (16-byte aligned
    data)."""
    if device.type == "cpu" and has_cpu_kernels():
        return native.int8_linear_cpu_path(m, n, k, group_size, _dtype_name(dtype), int8_activations)
    if device.type == "cuda" and has_cuda_kernels():
        return cuda_int8_linear_path(m, n, k, group_size, dtype)
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
    if device.type == "cpu" and has_cpu_kernels():
        return native.sparse_linear_cpu_path(m, n, k, _dtype_name(values_dtype), _dtype_name(x_dtype), group_size)
    if device.type == "cuda" and has_cuda_kernels():
        max_smem = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
        return cuda_sparse_linear_path(m, n, k, values_dtype, x_dtype, group_size, max_smem)
    return "reference"


def sparse_linear_prefill_rows(
    device: torch.device, k: int, values_dtype: torch.dtype, x_dtype: torch.dtype, group_size: int = -1
) -> int:
    """Rows of x from which ``sparse_linear`` takes a dedicated prefill kernel for this weight on ``device``,
    or 0 when none does (a csr16 layer hands such calls to the bitmap16 op)."""
    if device.type == "cpu" and has_cpu_kernels():
        return native.sparse_linear_cpu_prefill_rows(k, _dtype_name(values_dtype), _dtype_name(x_dtype), group_size)
    return 0


def sparse_csr_linear_kernel_path(device: torch.device) -> str:
    """Name of the kernel ``sparse_csr_linear`` runs on ``device``."""
    if device.type == "cpu" and has_cpu_kernels():
        return native.sparse_csr_linear_cpu_path()
    if device.type == "cuda" and has_cuda_kernels():
        return native.sparse_csr_linear_cuda_path()
    return "reference"


def decode_attention_kernel_path(device: torch.device) -> str:
    """Name of the kernel ``decode_attention`` runs on ``device`` (on CUDA: torch's SDPA, after fastquant's checks)."""
    if device.type == "cpu" and has_cpu_kernels():
        return native.decode_attention_cpu_path()
    if device.type == "cuda" and has_cuda_kernels():
        return "cuda_torch_sdpa"
    return "reference"


def int4_linear_kernel_path(
    device: torch.device,
    m: int,
    n: int,
    k: int,
    group_size: int,
    dtype: torch.dtype,
    int8_activations: bool = False,
) -> str:
    """Name of the kernel ``int4_linear`` runs for an (m, k) x (n, k)^T problem on ``device``."""
    if device.type == "cpu" and has_cpu_kernels() and hasattr(native, "int4_linear_cpu_path"):
        return native.int4_linear_cpu_path(m, n, k, group_size, _dtype_name(dtype), int8_activations)
    if device.type == "cuda" and has_cuda_kernels() and hasattr(native, "int4_linear_cuda_path"):
        return native.int4_linear_cuda_path(m, n, k, group_size, _dtype_name(dtype))
    return "reference"
