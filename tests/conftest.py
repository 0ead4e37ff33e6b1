"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest
import torch

from fastquant import _native


@pytest.fixture
def cpu_isa(request):
    """Caps the CPU kernels at the requested ISA for one test, then restores the best one."""
    if _native.native is None:
        pytest.skip("fastquant native extension not built")
    _native.native.set_cpu_isa(request.param)
    yield request.param
    _native.native.set_cpu_isa(_native.native.best_cpu_isa())


@pytest.fixture
def fp32_precision(request):
    """Sets torch's float32 matmul precision for one test, then restores the setting it found."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(request.param)
    yield request.param
    torch.set_float32_matmul_precision(before)
