"""fastquant.sparse_csr_linear (csr16 sparse weight) on the CPU: every ISA path vs the reference, the column
index helper, opcheck, compile, bad input and corrupt indices, and the SparseLinear layout switch.

Tolerance rule: that of tests/test_sparse_linear.py (the csr16 weight is the bitmap16 weight with its mask
words replaced by column indices, so the same float64 evaluation and bound apply).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn

import fastquant
from fastquant.kernels import extension, reference
from fastquant.kernels.ops import sparse_csr_linear
from fastquant.modules import SparseLinear
from helpers import assert_within, available_cpu_isas, call_kernel, random_weight, replacing
from test_sparse_linear import SPARSITIES, VALUE_DTYPES, X_DTYPES, expected_and_bound, make_case

GROUP_SIZES = [-1, 16, 32, 128]
# (M, K, N): decode and prefill row counts around the 8-row tile, K not a multiple of 16 or of a group.
SHAPES = [(1, 17, 3), (3, 1000, 17), (17, 1025, 100), (9, 4096, 64), (1, 4096, 1000)]
PORTABLE_SHAPES = SHAPES[:3]


def csr_args(args):
    x, values, masks, row_offsets, scales, bias = args
    indices = reference.sparse_column_indices(masks, x.shape[-1], values.numel())
    return x, values, indices, row_offsets, scales, bias


def run_csr(args, group_size: int) -> torch.Tensor:
    x, values, indices, row_offsets, scales, bias = csr_args(args)
    return sparse_csr_linear(
        x, values, indices, row_offsets, scales, bias, in_features=x.shape[-1], group_size=group_size
    )


def kernel_cases():
    i = 0
    for shape in SHAPES:
        for vdtype in VALUE_DTYPES:
            for xdtype in X_DTYPES:
                i += 1
                sparsity = SPARSITIES[i % len(SPARSITIES)]
                group = GROUP_SIZES[i % len(GROUP_SIZES)] if vdtype == torch.int8 else -1
                for isa in available_cpu_isas():
                    if isa == "portable" and shape not in PORTABLE_SHAPES:
                        continue
                    tag = f"{isa}-{'x'.join(map(str, shape))}-{vdtype}-{xdtype}-s{sparsity}-g{group}"
                    yield pytest.param(isa, shape, vdtype, xdtype, sparsity, group, i % 2 == 0, id=tag)


@pytest.mark.parametrize(
    ("cpu_isa", "shape", "values_dtype", "x_dtype", "sparsity", "group_size", "with_bias"),
    kernel_cases(),
    indirect=["cpu_isa"],
)
def test_matches_reference(cpu_isa, shape, values_dtype, x_dtype, sparsity, group_size, with_bias):
    m, k, n = shape
    seed = zlib.crc32(repr((shape, values_dtype, x_dtype, sparsity, group_size)).encode())
    args, g = make_case(m, k, n, values_dtype, x_dtype, group_size, sparsity, "random", with_bias, seed)
    path = extension.sparse_csr_linear_kernel_path(torch.device("cpu"))
    assert path == ("cpu_csr_portable" if cpu_isa == "portable" else "cpu_csr_avx2")
    assert_within(run_csr(args, g), *expected_and_bound(args, g), x_dtype)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 15, 16, 17, 33, 128])
def test_every_row_count(cpu_isa, m):
    """Row counts around the 8-row tile of x (tiles and tails), grouped int8 and 2:4 included."""
    for vdtype, group, pattern in ((torch.float32, -1, "random"), (torch.int8, 64, "2:4")):
        args, g = make_case(m, 576, 70, vdtype, torch.float32, group, 0.6, pattern, True, seed=m)
        assert_within(run_csr(args, g), *expected_and_bound(args, g), torch.float32)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
def test_all_zero_rows_and_dense_rows(cpu_isa):
    gen = torch.Generator().manual_seed(4)
    k, n = 1025, 40
    weight = random_weight(n, k, gen)
    weight[::3] = 0.0
    mask = weight != 0
    for vdtype in (torch.float32, torch.bfloat16, torch.float16):
        args = (torch.randn(5, k, generator=gen), *reference.sparse_pack(weight.to(vdtype), mask), None, None)
        y = run_csr(args, -1)
        assert bool((y[:, ::3] == 0).all())
        assert_within(y, *expected_and_bound(args, -1), torch.float32)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
def test_widest_columns_and_any_order(cpu_isa):
    """K = 65536 (column 65535 is int16 -1) and indices in any order, repeated ones adding up, like the reference."""
    gen = torch.Generator().manual_seed(6)
    k = 2**16
    x = torch.randn(3, k, generator=gen)
    columns = torch.tensor([65535, 7, 40000, 7, 0, 32768, 65535, 1])
    values = torch.cat([torch.randn(8, generator=gen), torch.zeros(64)])
    indices = torch.cat([torch.where(columns >= 2**15, columns - 2**16, columns), torch.zeros(64, dtype=torch.int64)])
    row_offsets = torch.tensor([0, 3, 3, 8])
    y = sparse_csr_linear(x, values, indices.to(torch.int16), row_offsets, in_features=k)
    expected = torch.stack(
        [
            (x[:, columns[:3]] * values[:3]).sum(1),
            torch.zeros(3),
            (x[:, columns[3:8]] * values[3:8]).sum(1),
        ],
        dim=1,
    )
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        y, reference.sparse_csr_linear(x, values, indices.short(), row_offsets, None, None, k, -1)
    )


@pytest.mark.parametrize("k", [1, 16, 17, 1025])
def test_column_indices_follow_the_packed_values(k):
    gen = torch.Generator().manual_seed(k)
    weight = torch.randn(9, k, generator=gen) * (torch.rand(9, k, generator=gen) > 0.6)
    values, masks, row_offsets = reference.sparse_pack(weight)
    indices = reference.sparse_column_indices(masks, k, values.numel())
    assert indices.dtype == torch.int16 and indices.shape == values.shape
    nnz = int(row_offsets[-1])
    assert bool((indices[nnz:] == 0).all())
    assert torch.equal(indices[:nnz].long(), weight.nonzero()[:, 1])
    dense = reference.sparse_csr_dequantize(values, indices, row_offsets, None, k, -1)
    assert torch.equal(dense, weight)
    with pytest.raises(ValueError, match="csr16 column indices hold at most 65536 columns"):
        reference.sparse_column_indices(torch.zeros(1, 4097, dtype=torch.int16), 65537, 64)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
@pytest.mark.parametrize(("values_dtype", "group_size"), [(torch.float32, -1), (torch.int8, -1), (torch.int8, 64)])
def test_opcheck(cpu_isa, values_dtype, group_size):
    args, g = make_case(5, 300, 40, values_dtype, torch.bfloat16, group_size, 0.6, "random", True, seed=7)
    op = torch.ops.fastquant.sparse_csr_linear.default
    torch.library.opcheck(op, (*csr_args(args), 300, g))
    x, values, indices, row_offsets, scales, _ = csr_args(args)
    torch.library.opcheck(op, (x.float(), values, indices, row_offsets, scales, None, 300, g))


def test_reference_kernel_matches_native():
    args, g = make_case(3, 100, 20, torch.int8, torch.float32, 32, 0.5, "random", True, seed=3)
    y = torch.ops.fastquant.sparse_csr_linear.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd), *csr_args(args), 100, g
    )
    torch.testing.assert_close(y, reference.sparse_csr_linear(*csr_args(args), 100, g), rtol=0, atol=0)
    torch.testing.assert_close(y, run_csr(args, g))


def test_torch_compile_fullgraph():
    args, g = make_case(4, 1025, 300, torch.int8, torch.bfloat16, 128, 0.7, "random", True, seed=11)
    _, values, indices, row_offsets, scales, bias = csr_args(args)

    def f(x):
        y = sparse_csr_linear(x, values, indices, row_offsets, scales, bias, in_features=1025, group_size=g)
        return torch.nn.functional.gelu(y) * 2

    compiled = torch.compile(f, fullgraph=True)
    for x in (args[0], torch.randn(9, 1025).bfloat16()):
        torch.testing.assert_close(compiled(x), f(x))


def test_autograd_to_activations():
    args, g = make_case(4, 96, 24, torch.int8, torch.float32, 32, 0.5, "random", True, seed=9)
    x, values, indices, row_offsets, scales, bias = csr_args(args)
    x.requires_grad_(True)
    y = sparse_csr_linear(x, values, indices, row_offsets, scales, bias, in_features=96, group_size=32)
    y.square().sum().backward()
    weight = reference.sparse_csr_dequantize(values, indices, row_offsets, scales, 96, 32)
    torch.testing.assert_close(x.grad, 2 * y.detach() @ weight)


def test_empty_batch_and_empty_layer():
    args, _ = make_case(1, 64, 32, torch.float32, torch.float32, -1, 0.5, "random", True, seed=2)
    _, values, indices, row_offsets, _, bias = csr_args(args)
    assert sparse_csr_linear(torch.empty(0, 64), values, indices, row_offsets, None, bias, in_features=64).shape == (
        0,
        32,
    )
    empty_values, empty_masks, empty_offsets = reference.sparse_pack(torch.zeros(32, 0))
    empty_indices = reference.sparse_column_indices(empty_masks, 0, empty_values.numel())
    y = sparse_csr_linear(torch.empty(3, 0), empty_values, empty_indices, empty_offsets, None, bias, in_features=0)
    torch.testing.assert_close(y, bias.expand(3, 32), rtol=0, atol=0)


def bad_base(device: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(32, 64, generator=gen) > 0.5
    qweight, scales = reference.int8_quantize(random_weight(32, 64, gen) * mask)
    values, masks, row_offsets = reference.sparse_pack(qweight, mask)
    indices = reference.sparse_column_indices(masks, 64, values.numel())
    base = {
        "x": torch.randn(3, 64, generator=gen),
        "values": values,
        "indices": indices,
        "row_offsets": row_offsets,
        "scales": scales,
        "bias": torch.randn(32, generator=gen),
    }
    base = {key: t.to(device) for key, t in base.items()}
    base.update(k=64, g=-1)
    return base


_bad = replacing(("x", "values", "indices", "row_offsets", "scales", "bias", "k", "g"))


BAD_INPUTS = [
    ("x must be float32, bfloat16 or float16", _bad(x=lambda a: a["x"].double())),
    ("values must be a 1-D float32, bfloat16, float16 or int8 tensor", _bad(values=lambda a: a["values"].double())),
    ("column_indices must be an int16 tensor of the values' shape", _bad(indices=lambda a: a["indices"].int())),
    ("column_indices must be an int16 tensor of the values' shape", _bad(indices=lambda a: a["indices"][:-1])),
    (r"row_offsets must be a non-empty 1-D int64 tensor", _bad(row_offsets=lambda a: a["row_offsets"].int())),
    (r"row_offsets must be a non-empty 1-D int64 tensor", _bad(row_offsets=lambda a: a["row_offsets"][:0])),
    (r"in_features must be in \[0, 65536\]", _bad(k=lambda a: 65537)),
    (r"x has 64 input features .* but in_features is 60", _bad(k=lambda a: 60)),
    ("group_size must be -1 .* or a positive multiple of 16, got 24", _bad(g=lambda a: 24)),
    ("int8 values need float32 scales, got None", _bad(scales=lambda a: None)),
    (r"per-channel scales must have shape \(N,\) = \(31,\)", _bad(row_offsets=lambda a: a["row_offsets"][:-1])),
    (r"bias must have shape \(32,\)", _bad(bias=lambda a: a["bias"][:5])),
]


@pytest.mark.parametrize(("message", "make_args"), BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_input_is_named(message, make_args, device):
    """The native kernel and the fake kernel (what torch.compile traces) reject the same input alike."""
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastquant.sparse_csr_linear(*make_args(bad_base(device)))


def _edited(key, fn):
    def make(a):
        t = a[key].clone()
        fn(t)
        return t

    return make


CORRUPT = [
    ("row_offsets\\[0\\] must be 0, got 1", _bad(row_offsets=_edited("row_offsets", lambda ro: ro.add_(1)))),
    (
        "row_offsets must not decrease: row 4 goes from",
        _bad(row_offsets=_edited("row_offsets", lambda ro: ro[5].fill_(int(ro[4]) - 1))),
    ),
    (  # an offset far before values, or far past it: refused before any read (each thread checks its rows)
        "row_offsets must not decrease: row 3 goes from",
        _bad(row_offsets=_edited("row_offsets", lambda ro: ro[4].fill_(-(10**12)))),
    ),
    (
        "row_offsets must not decrease: row 5 goes from",
        _bad(row_offsets=_edited("row_offsets", lambda ro: ro[5].fill_(10**12))),
    ),
    (
        r"row_offsets\[N\] = \d+ kept weights but values has \d+ elements",
        _bad(row_offsets=_edited("row_offsets", lambda ro: ro[-1].add_(65))),
    ),
    (
        r"row 0 has column index 64, not below in_features \(64\)",
        _bad(indices=_edited("indices", lambda i: i[1].fill_(64))),
    ),
    (  # int16 -1 is column 65535, far past x
        r"row 31 has column index 65535, not below in_features \(64\)",
        _bad(indices=_edited("indices", lambda i: i[int((i != 0).nonzero()[-1])].fill_(-1))),
    ),
]


@pytest.mark.parametrize(("message", "make_args"), CORRUPT, ids=[m for m, _ in CORRUPT])
@pytest.mark.parametrize("kernel", ["native", "reference"])
@pytest.mark.parametrize("m", [1, 9])
@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
def test_corrupt_indices_are_rejected(message, make_args, kernel, m, cpu_isa):
    """Offsets or column indices that would make a kernel read outside values or x are refused before (M = 9
    takes the AVX2 kernel's transposed-x path)."""
    args = list(make_args(bad_base("cpu")))
    args[0] = torch.randn(m, args[0].shape[-1], generator=torch.Generator().manual_seed(m))
    with pytest.raises(RuntimeError, match=message):
        call_kernel(torch.ops.fastquant.sparse_csr_linear, kernel, args)


@pytest.mark.parametrize("int8", [False, True])
def test_layer_layouts_compute_the_same(int8):
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(300, 70)
    mask = torch.rand(70, 300, generator=gen) > 0.8
    if int8:
        qweight, scales = reference.int8_quantize(linear.weight.detach() * mask, 32)
        layer = SparseLinear.from_pruned(linear, mask, qweight, scales, group_size=32)
    else:
        layer = SparseLinear.from_pruned(linear, mask)
    x = torch.randn(4, 300, generator=gen)
    with torch.no_grad():
        bitmap = layer(x)
        bitmap_bytes = layer.packed_bytes()
        layer.set_layout("csr16")
        assert layer.layout == "csr16" and "csr16" in layer.format
        assert layer.packed_bytes() == bitmap_bytes + layer.values.numel() * 2
        assert "column_indices" not in layer.state_dict()
        torch.testing.assert_close(layer(x), bitmap)
        for rows in (1, 4):  # the csr16 op runs at decode and prefill alike
            with torch.profiler.profile() as prof:
                layer(x[:rows])
            names = {event.name for event in prof.events()}
            assert "fastquant::sparse_csr_linear" in names and "fastquant::sparse_linear" not in names
        assert layer.set_layout("bitmap16").column_indices is None
    with pytest.raises(ValueError, match="layout must be one of"):
        layer.set_layout("csr32")


def test_saved_layout_is_restored(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64))
    fastquant.patch(
        model, "int8+sparse", pruning="magnitude", sparsity=0.9, sparse_kernel="sparse", skip=(), progress=False
    )
    model[0].set_layout("csr16")
    x = torch.randn(2, 64)
    with torch.no_grad():
        expected = model(x)
    fastquant.save(model, tmp_path / "m.safetensors")
    loaded = fastquant.load(nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64)), tmp_path / "m.safetensors")
    assert loaded[0].layout == "csr16" and loaded[2].layout == "bitmap16"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("cpu_isa", available_cpu_isas(), indirect=True)
def test_bad_index_deep_in_a_long_row_is_rejected(cpu_isa):
    """Indices are checked block by block as the M = 1 kernel goes (per row for more rows of x): one past the
    first blocks is still caught."""
    gen = torch.Generator().manual_seed(12)
    weight = random_weight(3, 4096, gen) * (torch.rand(3, 4096, generator=gen) > 0.3)
    values, masks, row_offsets = reference.sparse_pack(weight)
    indices = reference.sparse_column_indices(masks, 4096, values.numel())
    indices[int(row_offsets[1]) + 1500] = 4096
    for m in (1, 2, 8):  # the M = 1 loop, the scalar row tiles, the transposed-x tiles
        with pytest.raises(RuntimeError, match=r"row 1 has column index 4096, not below in_features \(4096\)"):
            sparse_csr_linear(torch.randn(m, 4096), values, indices, row_offsets, in_features=4096)


def test_layers_wider_than_csr16_keep_bitmap16():
    """in_features past 65536 cannot hold 16-bit columns: the choice times bitmap16 only, set_layout refuses."""
    layer = SparseLinear.from_pruned(nn.Linear(2**16 + 1, 2), torch.rand(2, 2**16 + 1) > 0.9)
    assert layer.layouts() == ("bitmap16",)
    with pytest.raises(ValueError, match="csr16 column indices hold at most 65536 columns, got 65537"):
        layer.set_layout("csr16")
    choice = fastquant.kernels.kernel_choice.choose_kernel(layer, nn.Linear(2**16 + 1, 2))
    assert set(choice.sparse_ms) == {"bitmap16"} and choice.layout == "bitmap16"


def test_loading_new_weights_into_a_csr16_layer_derives_its_indices_again():
    """load_state_dict brings new masks; indices derived from the old ones would compute with wrong columns."""
    gen = torch.Generator().manual_seed(8)
    linear = nn.Linear(96, 40)

    def mask_keeping_20_per_row():  # same kept count, different columns: the state dicts fit each other
        order = torch.rand(40, 96, generator=gen).argsort(dim=1)
        return torch.zeros(40, 96, dtype=torch.bool).scatter_(1, order[:, :20], True)

    layer = SparseLinear.from_pruned(linear, mask_keeping_20_per_row()).set_layout("csr16")
    new = SparseLinear.from_pruned(linear, mask_keeping_20_per_row())
    assert not torch.equal(layer.masks, new.masks)
    layer.load_state_dict(new.state_dict())
    assert layer.layout == "csr16" and torch.equal(layer.masks, new.masks)
    x = torch.randn(3, 96, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), new(x))
