"""``python -m fastquant.info``: what fastquant was built with and which kernels it will run here.

``python -m fastquant.info --require-cuda`` also checks a CUDA build without needing a GPU: it exits non-zero
unless the CUDA kernels were built and every ``torch.ops.fastquant`` op has a CUDA kernel registered.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import fastquant
from fastquant.kernels import extension


def compiler_name(version: str) -> str:
    """The compiler's ``__VERSION__`` with its name: GCC's is the bare number ("12.2.0"), Clang's names itself."""
    return f"gcc {version}" if version[:1].isdigit() else version


def info_lines() -> list[str]:
    lines = [
        f"fastquant {fastquant.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} running",
    ]
    if extension.native is None:
        lines.append(f"native extension: NOT LOADED ({extension.load_error}); every op runs the reference kernels")
        return lines
    build = extension.native.build_info()
    lines.append(
        f"native extension: built for torch {build['torch_version']}, compiler {compiler_name(build['compiler'])}"
    )
    if build["cuda"]:
        lines.append(f"CUDA kernels: built (CUDA {build['cuda_version']}, archs {build['cuda_archs']})")
    else:
        lines.append("CUDA kernels: not built (CPU-only build)")
    lines.append(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    lines.append(f"CPU features: {extension.native.cpu_features()}")
    lines.append(f"CPU kernels use: {extension.native.cpu_isa()}")
    precision = torch.get_float32_matmul_precision()
    rounding = "may be rounded to bf16 at prefill" if precision == "medium" else "stay fp32 on every path"
    lines.append(f"float32 matmul precision: {precision} (fp32 activations {rounding}; paths below follow it)")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for m in (1, 16, 512):
                path = extension.int8_linear_kernel_path(device, m, 4096, 4096, -1, dtype)
                lines.append(f"int8_linear {device.type} {str(dtype).removeprefix('torch.')} M={m}: {path}")
        path = extension.int8_linear_kernel_path(device, 1, 4096, 4096, -1, torch.float32, int8_activations=True)
        lines.append(f"int8_linear (int8 activations) {device.type} float32 M=1: {path}")
        for m in (1, 16, 512):
            path = extension.int4_linear_kernel_path(device, m, 4096, 4096, 32, torch.float32)
            lines.append(f"int4_linear {device.type} group 32 M={m}: {path}")
        path = extension.int4_linear_kernel_path(device, 1, 4096, 4096, 32, torch.float32, int8_activations=True)
        lines.append(f"int4_linear (int8 activations) {device.type} group 32 M=1: {path}")
        for values in (torch.float32, torch.int8):
            for m in (1, 512):
                path = extension.sparse_linear_kernel_path(device, m, 4096, 4096, values, torch.float32)
                name = str(values).removeprefix("torch.")
                lines.append(f"sparse_linear (bitmap16) {device.type} {name} values M={m}: {path}")
        lines.append(f"sparse_csr_linear (csr16) {device.type}: {extension.sparse_csr_linear_kernel_path(device)}")
        lines.append(f"decode_attention {device.type}: {extension.decode_attention_kernel_path(device)}")
    return lines


def fastquant_ops() -> list[str]:
    """Every registered ``fastquant::`` op, read from the dispatcher's own table."""
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastquant::"))


def ops_without_kernel(dispatch_key: str) -> list[str]:
    """The ``fastquant::`` ops with no kernel registered for ``dispatch_key`` (e.g. "CPU", "CUDA"); no device is
    needed to read the dispatcher's table."""
    return [op for op in fastquant_ops() if f"\n{dispatch_key}: registered" not in torch._C._dispatch_dump(op)]


def cuda_build_problems() -> list[str]:
    """Why this is not a working CUDA build of fastquant (empty when it is)."""
    if extension.native is None:
        return [f"the native extension did not load: {extension.load_error}"]
    if not extension.has_cuda_kernels():
        return ["the CUDA kernels were not built (CPU-only torch, no nvcc, or FASTQUANT_CUDA=OFF)"]
    if not fastquant_ops():
        return ["no fastquant op is registered"]
    return [f"no CUDA kernel registered for {op}" for op in ops_without_kernel("CUDA")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--require-cuda",
        action="store_true",
        help="exit with status 1 unless the CUDA kernels are built and registered for every op (no GPU needed)",
    )
    args = parser.parse_args(argv)
    print("\n".join(info_lines()))
    if args.require_cuda:
        problems = cuda_build_problems()
        for problem in problems:
            print(f"CUDA build check: {problem}", file=sys.stderr)
        if problems:
            sys.exit(1)
        ops = ", ".join(op.removeprefix("fastquant::") for op in fastquant_ops())
        print(f"CUDA build check: CUDA kernels registered for every op ({ops})")
