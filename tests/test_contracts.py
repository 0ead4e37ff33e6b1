"""One contract per op: the native CPU kernel (csrc/*_contract.h), the fake kernel that torch.compile traces and
the pure-PyTorch reference refuse the same arguments with the same message, and the defects that fuzzing
found stay fixed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import fastquant
from fastquant.kernels import extension, reference
from fastquant.modules import Int8Linear, SparseLinear
from helpers import REFERENCE_KEYS

needs_native = pytest.mark.skipif(extension.native is None, reason="fastquant native extension not built")


def _message(op: torch._ops.OpOverloadPacket, args: tuple, how: str) -> str:
    with pytest.raises(RuntimeError) as info:
        if how == "native":
            op(*args)
        elif how == "fake":
            op(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))
        else:
            op.default.redispatch(REFERENCE_KEYS, *args)
    return str(info.value).splitlines()[0]


def _int8_args() -> dict:
    gen = torch.Generator().manual_seed(0)
    qweight, scales = reference.int8_quantize(torch.randn(17, 40, generator=gen), 16)
    return {"x": torch.randn(3, 40, generator=gen), "w": qweight, "s": scales, "b": torch.randn(17), "g": 16}


def _int8(**change: Callable[[dict], object]) -> Callable[[], tuple]:
    def make() -> tuple:
        a = _int8_args()
        a.update({key: fn(a) for key, fn in change.items()})
        return torch.ops.fastquant.int8_linear, (a["x"], a["w"], a["s"], a["b"], a["g"])

    return make


def _int4_args() -> dict:
    gen = torch.Generator().manual_seed(2)
    qweight, scales, offsets = reference.int4_quantize(torch.randn(17, 40, generator=gen), 32, False)
    return {"x": torch.randn(3, 40, generator=gen), "w": qweight, "s": scales, "o": offsets, "b": torch.randn(17)}


def _int4(**change: Callable[[dict], object]) -> Callable[[], tuple]:
    def make() -> tuple:
        a = {"k": 40, "g": 32} | _int4_args()
        a.update({key: fn(a) for key, fn in change.items()})
        return torch.ops.fastquant.int4_linear, (a["x"], a["w"], a["s"], a["o"], a["b"], a["k"], a["g"])

    return make


def _sparse_args() -> dict:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(17, 40, generator=gen)
    mask = torch.rand(17, 40, generator=gen) > 0.5
    qweight, scales = reference.int8_quantize(weight * mask, 16)
    values, masks, row_offsets = reference.sparse_pack(qweight, mask)
    columns = reference.sparse_column_indices(masks, 40, values.numel())
    return {
        "x": torch.randn(3, 40, generator=gen),
        "v": values,
        "m": masks,
        "c": columns,
        "ro": row_offsets,
        "s": scales,
        "b": torch.randn(17),
        "k": 40,
        "g": 16,
    }


def _sparse(op: str, **change: Callable[[dict], object]) -> Callable[[], tuple]:
    def make() -> tuple:
        a = _sparse_args()
        a.update({key: fn(a) for key, fn in change.items()})
        index = a["m"] if op == "sparse_linear" else a["c"]
        return getattr(torch.ops.fastquant, op), (a["x"], a["v"], index, a["ro"], a["s"], a["b"], a["k"], a["g"])

    return make


BAD = {
    "int8 x int32": _int8(x=lambda a: a["x"].int()),
    "int8 x scalar": _int8(x=lambda a: a["x"][0, 0]),
    "int8 qweight float": _int8(w=lambda a: a["w"].float()),
    "int8 K mismatch": _int8(x=lambda a: a["x"][:, :39]),
    "int8 group 0": _int8(g=lambda a: 0),
    "int8 group -2": _int8(g=lambda a: -2),
    "int8 scales fp16": _int8(s=lambda a: a["s"].half()),
    "int8 scales shape": _int8(s=lambda a: a["s"][:, :2]),
    "int8 per-channel scales shape": _int8(g=lambda a: -1),
    "int8 bias dtype": _int8(b=lambda a: a["b"].half()),
    "int8 bias shape": _int8(b=lambda a: a["b"][:4]),
}
BAD |= {
    "int4 x int32": _int4(x=lambda a: a["x"].int()),
    "int4 qweight int8": _int4(w=lambda a: a["w"].view(torch.int8)),
    "int4 qweight width": _int4(w=lambda a: a["w"][:, :16]),
    "int4 K mismatch": _int4(x=lambda a: a["x"][:, :39]),
    "int4 group 48": _int4(g=lambda a: 48),
    "int4 scales fp32": _int4(s=lambda a: a["s"].float()),
    "int4 offsets shape": _int4(o=lambda a: a["o"][:3]),
    "int4 bias dtype": _int4(b=lambda a: a["b"].half()),
}
for _op in ("sparse_linear", "sparse_csr_linear"):
    BAD |= {
        f"{_op} x fp64": _sparse(_op, x=lambda a: a["x"].double()),
        f"{_op} values 2-D": _sparse(_op, v=lambda a: a["v"][None]),
        f"{_op} K mismatch": _sparse(_op, x=lambda a: a["x"][:, :39]),
        f"{_op} group 24": _sparse(_op, g=lambda a: 24),
        f"{_op} no scales": _sparse(_op, s=lambda a: None),
        f"{_op} scales for floats": _sparse(_op, v=lambda a: a["v"].float()),
        f"{_op} scales shape": _sparse(_op, s=lambda a: a["s"][:, :1]),
        f"{_op} bias shape": _sparse(_op, b=lambda a: a["b"][:3]),
        f"{_op} in_features < 0": _sparse(_op, k=lambda a: -1),
        f"{_op} row_offsets int32": _sparse(_op, ro=lambda a: a["ro"].int()),
    }
BAD["sparse_linear masks int32"] = _sparse("sparse_linear", m=lambda a: a["m"].int())
BAD["sparse_linear no padding"] = _sparse("sparse_linear", v=lambda a: a["v"][:10])
BAD["sparse_csr_linear column_indices shape"] = _sparse("sparse_csr_linear", c=lambda a: a["c"][:-1])
BAD["sparse_csr_linear K > 2^16"] = _sparse("sparse_csr_linear", k=lambda a: 2**16 + 1)


def _attention(**change: Callable[[dict], object]) -> Callable[[], tuple]:
    def make() -> tuple:
        gen = torch.Generator().manual_seed(3)
        a = {
            "q": torch.randn(1, 3, 3, 16, generator=gen),
            "k": torch.randn(1, 3, 10, 16, generator=gen),
            "v": torch.randn(1, 3, 10, 16, generator=gen),
            "m": torch.ones(1, 1, 1, 10, dtype=torch.bool),
            "s": 0.25,
        }
        a.update({key: fn(a) for key, fn in change.items()})
        return torch.ops.fastquant.decode_attention, (a["q"], a["k"], a["v"], a["m"], a["s"])

    return make


BAD |= {
    "decode_attention q int64": _attention(q=lambda a: a["q"].long()),
    "decode_attention q 3-D": _attention(q=lambda a: a["q"][0]),
    "decode_attention v fp16": _attention(v=lambda a: a["v"].half()),
    "decode_attention k head size": _attention(k=lambda a: a["k"][..., :8]),
    "decode_attention v length": _attention(v=lambda a: a["v"][:, :, :4]),
    "decode_attention mask int32": _attention(m=lambda a: a["m"].int()),
    "decode_attention mask length": _attention(m=lambda a: a["m"][..., :9]),
    "decode_attention mask 3-D": _attention(m=lambda a: a["m"][0]),
    "decode_attention scale inf": _attention(s=lambda a: float("inf")),
}


@needs_native
@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_every_kernel_words_a_refusal_alike(case):
    op, args = BAD[case]()
    native = _message(op, args, "native")
    assert native.startswith(f"fastquant.{op._qualified_op_name.split('::')[1]}:"), native
    assert _message(op, args, "fake") == native
    assert _message(op, args, "reference") == native


@needs_native
@pytest.mark.parametrize("op", ["int8_linear", "sparse_linear", "sparse_csr_linear"])
def test_a_group_wider_than_any_k_is_one_group(op):
    """group_size near 2^62: the fake kernel always accepted it, the C++ kernels overflowed computing
    ceil(K / group_size); now every kernel takes it as one group per row, and the reference stays small."""
    group = 2**62
    if op == "int8_linear":
        a = _int8_args()
        qweight, scales = reference.int8_quantize(reference.int8_dequantize(a["w"], a["s"], 16), -1)
        args = (a["x"], qweight, scales[:, None], a["b"], group)
        per_channel = (a["x"], qweight, scales, a["b"], -1)
    else:
        a = _sparse_args()
        dense = reference.sparse_unpack(a["v"], a["m"], a["ro"], 40)
        _, scales = reference.int8_quantize(dense.float(), -1)
        index = a["m"] if op == "sparse_linear" else a["c"]
        args = (a["x"], a["v"], index, a["ro"], scales[:, None], a["b"], 40, group)
        per_channel = (a["x"], a["v"], index, a["ro"], scales, a["b"], 40, -1)
    fn = getattr(torch.ops.fastquant, op)
    expected = fn(*per_channel)
    torch.testing.assert_close(fn(*args), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fn.default.redispatch(REFERENCE_KEYS, *args), expected, rtol=1e-5, atol=1e-5)
    assert fn(*(t.to("meta") if isinstance(t, torch.Tensor) else t for t in args)).shape == expected.shape


def test_group_size_zero_is_a_value_error():
    linear = nn.Linear(64, 8)
    with pytest.raises(ValueError, match="group_size must be None .* or one of"):
        Int8Linear.from_linear(linear, 0)
    with pytest.raises(ValueError, match="group_size must be -1 .* or positive, got 0"):
        reference.int8_quantize(linear.weight, 0)


def test_reference_sparse_kernels_take_a_layer_without_rows():
    masks = torch.zeros(0, 3, dtype=torch.int16)
    values = torch.zeros(64)
    row_offsets = torch.zeros(1, dtype=torch.int64)
    assert reference.sparse_mask_bits(masks, 40).shape == (0, 40)
    assert reference.sparse_column_indices(masks, 40, 64).shape == (64,)
    x = torch.randn(2, 40)
    y = torch.ops.fastquant.sparse_linear.default.redispatch(
        REFERENCE_KEYS, x, values, masks, row_offsets, None, None, 40, -1
    )
    assert y.shape == (2, 0)
    columns = torch.zeros(64, dtype=torch.int16)
    y = torch.ops.fastquant.sparse_csr_linear.default.redispatch(
        REFERENCE_KEYS, x, values, columns, row_offsets, None, None, 40, -1
    )
    assert y.shape == (2, 0)


def _pruned_layer(values_dtype: torch.dtype) -> SparseLinear:
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(40, 17)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(17, 40, generator=gen))
    mask = torch.rand(17, 40, generator=gen) > 0.6
    if values_dtype == torch.int8:
        qweight, scales = reference.int8_quantize(linear.weight * mask)
        return SparseLinear.from_pruned(linear, mask, qweight, scales)
    return SparseLinear.from_pruned(linear, mask)


def test_csr16_layout_on_the_meta_device():
    layer = _pruned_layer(torch.int8)
    on_meta = SparseLinear(40, 17, layer.values.numel(), values_dtype=torch.int8, device="meta")
    on_meta.set_layout("csr16")
    assert on_meta.column_indices.device.type == "meta"
    assert on_meta.column_indices.shape == (layer.values.numel(),)
    # The derived indices equal the boolean-indexing definition on real data.
    columns = reference.sparse_mask_bits(layer.masks, 40).nonzero()[:, 1]
    indices = reference.sparse_column_indices(layer.masks, 40, layer.values.numel())
    assert torch.equal(indices[: columns.numel()].long(), columns)
    assert not indices[columns.numel() :].any()


@pytest.mark.parametrize("layout", ["bitmap16", "csr16"])
@pytest.mark.parametrize("values_dtype", [torch.float32, torch.int8], ids=str)
def test_compiled_sparse_layer_with_gradients(layout, values_dtype):
    """torch.compile(fullgraph=True) of a SparseLinear whose input requires grad: the unpacking in the
    backward has no data-dependent shapes, so it traces whole and matches eager."""
    torch._dynamo.reset()
    layer = _pruned_layer(values_dtype).set_layout(layout)
    x = torch.randn(3, 40, requires_grad=True)
    eager_x = x.detach().clone().requires_grad_()
    y = torch.compile(layer, fullgraph=True)(x)
    y.square().sum().backward()
    expected = layer(eager_x)
    expected.square().sum().backward()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, eager_x.grad, rtol=1e-5, atol=1e-5)


def test_data_independent_unpacking_matches_boolean_indexing():
    for seed, values_dtype in enumerate((torch.float32, torch.bfloat16, torch.int8)):
        gen = torch.Generator().manual_seed(seed)
        weight = (torch.randn(33, 1025, generator=gen) * 20).to(values_dtype)
        mask = torch.rand(33, 1025, generator=gen) > 0.7
        mask[5] = False  # an empty row
        values, masks, row_offsets = reference.sparse_pack(weight, mask)
        expected = torch.zeros_like(weight)
        expected[mask] = weight[mask]
        assert torch.equal(reference.sparse_unpack(values, masks, row_offsets, 1025), expected)
        columns = reference.sparse_column_indices(masks, 1025, values.numel())
        dense = reference.sparse_csr_dequantize(values, columns, row_offsets, None, 1025, -1)
        torch.testing.assert_close(dense, expected.float(), rtol=0, atol=0)


def test_config_free_package_api_still_refuses_bad_group_sizes():
    model = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="group_size"):
        fastquant.patch(model, "int8", group_size=48, progress=False)


def test_reference_autograd_without_the_extension():
    """The C++ autograd of the four ops (csrc/frozen_weight_autograd.cpp) and the Python one that
    ops.register_reference_autograd registers when the extension cannot load compute the same gradients: the
    per-op gradient tests run again in a process where the extension is missing."""
    tests = Path(__file__).parent
    ops = ("int8_linear", "int4_linear", "sparse_linear", "sparse_csr_linear")
    files = [str(tests / f"test_{op}.py") for op in ops]
    code = (
        "import sys; sys.modules['fastquant._C'] = None\n"  # import_module raises ImportError for it
        "import pytest\n"
        "from fastquant.kernels import extension\n"
        "assert extension.native is None, 'the extension loaded'\n"
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'autograd_to_activations', *{files!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tests, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 passed" in done.stdout, done.stdout[-3000:]
