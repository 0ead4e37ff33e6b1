"""fastquant.decode_attention on the CPU: every ISA path vs the reference on awkward shapes, every dtype and mask
kind, opcheck, torch.compile, rows with nothing to attend to, non-finite inputs, and bad arguments.

Tolerance rule: the expected output is torch's SDPA in float64 on the same (rounded) inputs. The kernel computes in
fp32. A score q.k * scale is off by at most (D + 2) u times the sum of its terms' magnitudes, which with the
exponential's 3 u makes each weight off by a relative e; y = sum w v / sum w then moves by at most 4 e vmax (vmax:
the head's largest |v|), and the two sums over S positions add S u vmax each. So |y - y64| <= vmax * (4 ((D + 2) u
max_s sum_d |q_d k_sd| scale + 3 u) + 2 S u) + |y64| u_out, u = 2^-24 and u_out the output dtype's half ulp
(2^-24 fp32, 2^-11 fp16, 2^-8 bf16).
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import fastquant
from fastquant.kernels import extension
from fastquant.kernels.ops import decode_attention
from helpers import assert_within, available_cpu_isas, call_kernel

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, H, R, S, D): one and several rows per head (grouped heads packed as rows), cache lengths around the vector
# width and far from it, head sizes that leave a tail after the vector loop.
SHAPES = [(1, 3, 3, 192, 64), (1, 1, 1, 1, 16), (2, 3, 1, 17, 17), (1, 2, 17, 1025, 64), (3, 1, 4, 3, 80)]
MASKS = ["none", "bool", "additive", "bool-broadcast"]
OUT_UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def make_case(shape, dtype, mask_kind, seed):
    b, h, r, s, d = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(size, generator=gen).to(dtype) for size in ((b, h, r, d), (b, h, s, d), (b, h, s, d)))
    if mask_kind == "none":
        mask = None
    elif mask_kind == "bool":  # a static cache: each row sees its first n positions
        mask = torch.arange(s) < torch.randint(1, s + 1, (b, h, r, 1), generator=gen)
    elif mask_kind == "additive":
        mask = torch.randn(b, 1, r, s, generator=gen).to(dtype)
        mask[..., s // 2 :] = float("-inf")
    else:  # one row of the mask shared by every head and row (transformers' decode mask)
        mask = torch.rand(b, 1, 1, s, generator=gen) < 0.7
        mask[..., 0] = True
    return q, k, v, mask


def expected_and_bound(q, k, v, mask, scale):
    q64, k64, v64 = q.double(), k.double(), v.double()
    m64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    y64 = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=m64, scale=scale)
    s, d = k.shape[2], k.shape[3]
    u = 2.0**-24
    terms = torch.einsum("bhrd,bhsd->bhrs", q64.abs(), k64.abs()).amax(dim=-1, keepdim=True) * abs(scale)
    vmax = v64.abs().amax(dim=(-2, -1), keepdim=True)
    bound = vmax * (4 * ((d + 2) * u * terms + 3 * u) + 2 * s * u) + y64.abs() * OUT_UNIT[q.dtype]
    return y64, bound


def cases():
    for shape in SHAPES:
        for dtype in DTYPES:
            for mask_kind in MASKS:
                for isa in available_cpu_isas():
                    tag = f"{isa}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{mask_kind}"
                    yield pytest.param(isa, shape, dtype, mask_kind, id=tag)


@pytest.mark.parametrize(("cpu_isa", "shape", "dtype", "mask_kind"), list(cases()), indirect=["cpu_isa"])
def test_matches_reference(cpu_isa, shape, dtype, mask_kind):
    q, k, v, mask = make_case(shape, dtype, mask_kind, zlib.crc32(repr((shape, dtype, mask_kind)).encode()))
    assert extension.decode_attention_kernel_path(torch.device("cpu")) == f"cpu_attention_{cpu_isa}"
    scale = shape[-1] ** -0.5
    assert_within(decode_attention(q, k, v, mask), *expected_and_bound(q, k, v, mask, scale), dtype)
    # A scale other than the default, and the reference kernel on the same inputs, within the same bound.
    assert_within(decode_attention(q, k, v, mask, scale=0.3), *expected_and_bound(q, k, v, mask, 0.3), dtype)
    ref = call_kernel(torch.ops.fastquant.decode_attention, "reference", (q, k, v, mask, 0.3))
    assert_within(ref, *expected_and_bound(q, k, v, mask, 0.3), dtype)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
def test_rows_with_nothing_to_attend_to_are_zero(cpu_isa):
    q, k, v, _ = make_case((2, 3, 3, 40, 64), torch.float32, "none", 1)
    mask = torch.ones(2, 3, 3, 40, dtype=torch.bool)
    mask[1, 2, 0] = False
    additive = torch.zeros(2, 3, 3, 40)
    additive[0, 1, 2] = float("-inf")
    for m in (mask, additive):
        got = decode_attention(q, k, v, m)
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=m), rtol=1e-5, atol=1e-6)
    assert bool((decode_attention(q, k, v, mask)[1, 2, 0] == 0).all())


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
def test_non_finite_inputs_give_what_the_reference_gives(cpu_isa):
    q, k, v, mask = make_case((1, 3, 3, 50, 64), torch.float32, "bool", 2)
    q[0, 1, 2, 5] = float("nan")
    k[0, 2, 0, 0] = float("inf")
    v[0, 0, 3, 1] = float("-inf")
    got = decode_attention(q, k, v, mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_opcheck(dtype, mask_kind):
    q, k, v, mask = make_case((2, 3, 3, 33, 64), dtype, mask_kind, 3)
    torch.library.opcheck(torch.ops.fastquant.decode_attention.default, (q, k, v, mask, 0.125))


def test_torch_compile_fullgraph():
    q, k, v, mask = make_case((1, 3, 3, 192, 64), torch.float32, "bool-broadcast", 4)

    def f(q, k, v, mask):
        return decode_attention(q * 2.0, k, v, mask) + 1.0

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), f(q, k, v, mask))


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
def test_strided_inputs_and_masks(cpu_isa):
    """Views as a traced graph hands them over: q, k and v transposed (not contiguous), a mask read with a
    last-dimension stride of 2, and one broadcast along the positions (stride 0)."""
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(1, 3, 3, 64, generator=gen).transpose(1, 2).contiguous().transpose(1, 2)
    k, v = (torch.randn(1, 40, 3, 64, generator=gen).transpose(1, 2) for _ in range(2))
    wide = torch.rand(1, 1, 3, 80, generator=gen) < 0.6
    wide[..., 0] = True
    row = torch.rand(1, 3, 3, 1, generator=gen) < 2  # all True, broadcast over the 40 positions
    assert not q.is_contiguous() and not k.is_contiguous()
    for mask in (wide[..., ::2], row, wide[..., ::2].float().log()):
        got = decode_attention(q, k, v, mask)
        assert_within(got, *expected_and_bound(q, k, v, mask, 0.125), torch.float32)


@pytest.mark.parametrize("kernel", ["native", "reference"])
def test_empty_inputs(kernel):
    q, k, v, _ = make_case((1, 2, 3, 5, 8), torch.float32, "none", 5)

    def call(q, k, v):
        return call_kernel(torch.ops.fastquant.decode_attention, kernel, (q, k, v, None, 0.3))

    assert call(q[:0], k[:0], v[:0]).shape == (0, 2, 3, 8)
    assert call(q[:, :, :0], k, v).shape == (1, 2, 0, 8)
    # No positions at all: nothing to attend to, zeros as torch's SDPA gives.
    empty = call(q, k[:, :, :0], v[:, :, :0])
    assert empty.shape == (1, 2, 3, 8) and not empty.any()


@pytest.mark.parametrize("kernel", ["native", "reference"])
def test_bad_arguments_are_named(kernel):
    q, k, v, mask = make_case((1, 3, 3, 10, 16), torch.float32, "bool", 6)
    op = torch.ops.fastquant.decode_attention

    def call(*args):
        return call_kernel(op, kernel, args)

    with pytest.raises(RuntimeError, match="q must be a 4-D float32, bfloat16 or float16 tensor, got torch.int64"):
        call(q.long(), k, v, mask, 0.25)
    with pytest.raises(RuntimeError, match="k must be a 4-D"):
        call(q, k[0], v, mask, 0.25)
    with pytest.raises(RuntimeError, match="k and v must have q's dtype torch.float32, got torch.float16"):
        call(q, k.half(), v, mask, 0.25)
    with pytest.raises(RuntimeError, match=r"k and v must both have shape \(B, H, S, D\) = \(1, 3, S, 16\)"):
        call(q, k[..., :8], v[..., :8], mask, 0.25)
    with pytest.raises(RuntimeError, match=r"k and v must both have shape"):
        call(q, k, v[:, :, :5], mask, 0.25)
    with pytest.raises(RuntimeError, match="mask must be a 4-D bool or torch.float32 tensor, got torch.int64"):
        call(q, k, v, mask.long(), 0.25)
    with pytest.raises(RuntimeError, match=r"mask of shape \(1, 3, 3, 9\) does not broadcast to \(B, H, R, S\)"):
        call(q, k, v, mask[..., :9], 0.25)
    with pytest.raises(RuntimeError, match="scale must be finite, got nan"):
        call(q, k, v, mask, float("nan"))


def test_public_name():
    assert fastquant.decode_attention is decode_attention
