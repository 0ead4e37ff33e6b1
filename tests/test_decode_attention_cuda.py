"""fastquant.decode_attention on CUDA (its glue: the shared contract, then torch's SDPA kernels): against the float64
reference with the CPU tests' tolerance rule (tests/test_decode_attention.py), every dtype and mask kind, opcheck,
rows with nothing to attend to, and the same refusals as the CPU kernel."""

from __future__ import annotations

import pytest
import torch
from test_decode_attention import DTYPES, MASKS, SHAPES, expected_and_bound, make_case

import helpers
from fastquant.kernels.ops import decode_attention
from helpers import assert_within

pytestmark = helpers.CUDA_KERNEL_MARKS


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_matches_reference(shape, dtype, mask_kind):
    q, k, v, mask = make_case(shape, dtype, mask_kind, seed=sum(shape))
    expected, bound = expected_and_bound(q, k, v, mask, shape[-1] ** -0.5)
    cuda = [t if t is None else t.cuda() for t in (q, k, v, mask)]
    got = decode_attention(*cuda)
    assert got.device.type == "cuda"
    # torch's CUDA kernels may accumulate in lower precision for 16-bit inputs: twice the CPU bound.
    assert_within(got.cpu(), expected, 2 * bound, dtype)


def test_opcheck_and_empty_rows():
    q, k, v, mask = (t.cuda() for t in make_case((2, 3, 3, 33, 64), torch.float16, "bool", seed=7))
    torch.library.opcheck(torch.ops.fastquant.decode_attention.default, (q, k, v, mask, 0.125))
    mask[1] = False  # batch row 1 has nothing to attend to: zeros, as on the CPU
    out = decode_attention(q, k, v, mask)
    assert not out[1].any() and out[0].abs().sum() > 0


def test_refuses_tensors_on_two_devices():
    q, k, v, mask = make_case((1, 3, 3, 10, 16), torch.float32, "bool", seed=8)
    with pytest.raises(RuntimeError, match="fastquant.decode_attention"):
        decode_attention(q.cuda(), k, v.cuda(), mask.cuda())
