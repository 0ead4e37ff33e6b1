"""``python -m fastquant.info``: what fastquant was built with and which kernels it will run here."""

from __future__ import annotations

import platform

import torch

import fastquant
from fastquant import _native


def compiler_name(version: str) -> str:
    """The compiler's ``__VERSION__`` with its name: GCC's is the bare number ("12.2.0"), Clang's names itself."""
    return f"gcc {version}" if version[:1].isdigit() else version


def info_lines() -> list[str]:
    lines = [
        f"fastquant {fastquant.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} running",
    ]
    if _native.native is None:
        lines.append(f"native extension: NOT LOADED ({_native.load_error}); every op runs the reference kernels")
        return lines
    build = _native.native.build_info()
    lines.append(
        f"native extension: built for torch {build['torch_version']}, compiler {compiler_name(build['compiler'])}"
    )
    if build["cuda"]:
        lines.append(f"CUDA kernels: built (CUDA {build['cuda_version']}, archs {build['cuda_archs']})")
    else:
        lines.append("CUDA kernels: not built (CPU-only build)")
    lines.append(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    lines.append(f"CPU features: {_native.native.cpu_features()}")
    lines.append(f"CPU kernels use: {_native.native.cpu_isa()}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for m in (1, 16, 512):
                path = _native.int8_linear_kernel_path(device, m, 4096, 4096, -1, dtype)
                lines.append(f"int8_linear {device.type} {str(dtype).removeprefix('torch.')} M={m}: {path}")
        for values in (torch.float32, torch.int8):
            for m in (1, 512):
                path = _native.sparse_linear_kernel_path(device, m, 4096, 4096, values, torch.float32)
                name = str(values).removeprefix("torch.")
                lines.append(f"sparse_linear (bitmap16) {device.type} {name} values M={m}: {path}")
        lines.append(f"sparse_csr_linear (csr16) {device.type}: {_native.sparse_csr_linear_kernel_path(device)}")
    return lines


def main() -> None:
    print("\n".join(info_lines()))


if __name__ == "__main__":
    main()
