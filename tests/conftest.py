"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest
import torch

from fastquant.kernels import extension


@pytest.fixture
def cpu_isa(request):
    """Caps the CPU kernels at the requested ISA for one test, then restores the best one."""
    if extension.native is None:
        pytest.skip("fastquant native extension not built")
    extension.native.set_cpu_isa(request.param)
    yield request.param
    extension.native.set_cpu_isa(extension.native.best_cpu_isa())


@pytest.fixture
def fp32_precision(request):
    """Sets torch's float32 matmul precision for one test, then restores the setting it found."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(request.param)
    yield request.param
    torch.set_float32_matmul_precision(before)
