"""Helpers shared by the kernel tests.

Tolerance rule for int8_linear (every kernel, every device): with y64 the float64 evaluation of the
reference formula and y_ref the fp32 reference kernel's output in the activation dtype,

    |y - y64| <= 2 * |y_ref - y64| + c_path * sqrt((x^2) @ (W^2)^T) + ulp(dtype) * |y64|

where W is the dequantized weight. The first term allows what PyTorch itself loses at this precision;
the second is the rounding of the kernel's products: c_path = 2^-16 for kernels that multiply in fp32,
and 2^-6 (8 standard deviations of a 2^-9 relative rounding per product) for kernels that round
activations to bf16 before a bf16 dot product; the last is one unit of the output dtype's rounding.
sqrt((x^2) @ (W^2)^T) is the natural scale of a sum of independent products, so losing even one group of
32 terms out of thousands exceeds the bound.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fastquant.kernels import extension, reference

ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def product_rounding(path: str) -> float:
    return 2.0**-6 if "bf16" in path else 2.0**-16


def assert_int8_linear_close(
    y, x, qweight, scales, bias, group_size, path: str, int8_activations: bool = False
) -> None:
    """The int8 rule (module docstring). ``int8_activations``: the same rule with x~
    (reference.int8_activation_round of finite x) in place of x: cpu_avx2_int8x sums each block's products
    exactly in int32 and scales them in fp32 (the fp32 term), the other kernels run on x~."""
    dtype = x.dtype
    if int8_activations and bool(torch.isfinite(x).all()):
        x = reference.int8_activation_round(x)
    weight = reference.int8_dequantize(qweight, scales, group_size).double()
    x64 = x.double()
    y64 = x64 @ weight.T
    if bias is not None:
        y64 = y64 + bias.double()
    y_ref = reference.int8_linear(x, qweight, scales, bias, group_size)
    scale = ((x64**2) @ (weight**2).T).sqrt()
    bound = 2 * (y_ref.double() - y64).abs() + product_rounding(path) * scale + ULP[dtype] * y64.abs()
    assert_within(y, y64, bound, dtype, f"kernel {path}: ")


def assert_within(
    y: torch.Tensor, y64: torch.Tensor, bound: torch.Tensor, x_dtype: torch.dtype, what: str = ""
) -> None:
    """|y - y64| <= bound everywhere, y in the activation dtype and of y64's shape; names the worst element."""
    assert y.dtype == x_dtype and y.shape == y64.shape
    if y.numel() == 0:
        return
    err = (y.double() - y64).abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"{what}error {err.flatten()[worst].item():.3g} exceeds bound {bound.flatten()[worst].item():.3g} at flat "
        f"index {worst.item()} (y64={y64.flatten()[worst].item():.4g})"
    )


def fp16_cancelling_case(
    m: int = 2, n: int = 4, k: int = 512, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 x (m, k) and an fp32 (n, k) weight whose partial sums reach 4e5, past fp16's 65504, and cancel to a
    small result."""
    x = torch.full((m, k), 100.0, dtype=torch.float16, device=device)
    weight = torch.cat([torch.full((n, k // 2), 8.0), torch.full((n, k // 2), -8.0)], dim=1).to(device)
    weight[:, 0] += 0.5
    return x, weight


def signed_ones_weight(rows: int, k: int) -> torch.Tensor:
    """Codes at their largest for the fixed-point sums: rows of ones, row 1 of -1, row 2 alternating signs
    (its sum cancels to exactly 0), row 3 with every third weight zero."""
    weight = torch.ones(rows, k)
    weight[1] = -1.0
    weight[2, 1::2] = -1.0
    weight[3, ::3] = 0.0
    return weight


def assert_gradients_reach_activations(run, x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor) -> None:
    """Autograd through a frozen compressed weight W, y = run(x, bias): d(sum y^2)/dx = 2y @ W and
    d(sum y^2)/dbias = the column sums of 2y."""
    x.requires_grad_(True)
    bias.requires_grad_(True)
    y = run(x, bias)
    y.square().sum().backward()
    grad_y = 2 * y.detach()
    torch.testing.assert_close(x.grad, grad_y @ weight)
    torch.testing.assert_close(bias.grad, grad_y.sum(0))


def replacing(keys: tuple[str, ...]):
    """``bad(**changes)``: a function of a dict of good arguments that returns them in ``keys`` order, each
    ``key=fn`` of ``changes`` replaced by ``fn(arguments)`` (the bad-input tables of the kernel tests)."""

    def bad(**changes):
        def make(a):
            args = dict(a)
            for key, fn in changes.items():
                args[key] = fn(a)
            return [args[key] for key in keys]

        return make

    return bad


def shape_id(shape: tuple[int, ...]) -> str:
    """A shape as test ids name it: ``3x96x17``."""
    return "x".join(map(str, shape))


def shape_table(text: str) -> list[tuple[int, ...]]:
    """The shapes of a table written as the test ids name them (``"1x32x1 3x96x17"``, any white space between),
    so that the id of a failing case is found in its table by a search."""
    return [tuple(int(v) for v in shape.split("x")) for shape in text.split()]


def shape_params(text: str) -> list:
    """The shapes of a :func:`shape_table` as ``shape`` parameters, each with its id (``3x96x17``)."""
    return [pytest.param(shape, id=shape_id(shape)) for shape in shape_table(text)]


def isa_shape_cases(shapes: list[tuple[int, ...]], portable_shapes: list[tuple[int, ...]]) -> list:
    """(cpu_isa, shape) parameters of a dense kernel test: every available ISA on ``shapes``, the portable
    kernel (slow) on ``portable_shapes`` only; ids like ``avx2-3x96x17``."""
    return [
        pytest.param(isa, shape, id=f"{isa}-{shape_id(shape)}")
        for isa in available_cpu_isas()
        for shape in (portable_shapes if isa == "portable" else shapes)
    ]


# The dispatch keys of the pure-PyTorch reference kernel every op registers (see fastquant.kernels.ops).
REFERENCE_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def call_kernel(op, kernel: str, args) -> torch.Tensor:
    """``torch.ops.fastquant.<op>`` on its native kernel (``kernel`` "native") or on its reference kernel."""
    return op(*args) if kernel == "native" else op.default.redispatch(REFERENCE_KEYS, *args)


def path_cases(argnames: tuple[str, ...], cases: list[tuple], dtype_in_id: bool = False):
    """Parametrizes a CUDA dispatch test over (path, m, k, n, ...) cases, each named ``path-MxKxN`` (and the
    dtype that follows N when ``dtype_in_id``: cases that differ by it alone)."""
    ids = [
        f"{c[0]}-{c[1]}x{c[2]}x{c[3]}" + (f"-{str(c[4]).removeprefix('torch.')}" if dtype_in_id else "") for c in cases
    ]
    return pytest.mark.parametrize(argnames, cases, ids=ids)


def bf16_activations_allowed(dtype: torch.dtype) -> bool:
    """Whether the AVX-512 prefill paths may round activations of ``dtype`` to bf16: fp32 only under torch's
    "medium" float32 matmul precision (the numerical contract in the README)."""
    return dtype != torch.float32 or torch.get_float32_matmul_precision() == "medium"


def available_cpu_isas(with_vbmi: bool = False) -> list[str]:
    """The ISA levels this CPU can run, lowest first. "avx512_vbmi" only changes the kernels that expand int8
    values (sparse_linear at M = 1), so only their tests ask for it; elsewhere it runs the avx512 kernels."""
    if extension.native is None:
        return []
    order = ["portable", "avx2", "avx512", "avx512_vbmi"]
    best = extension.native.best_cpu_isa()
    available = order[: order.index(best) + 1]
    return available if with_vbmi else [isa for isa in available if isa != "avx512_vbmi"]


# The 2-layer, 4-head Llama most tests build; each passes the fields it needs otherwise.
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def tiny_llama_config(**fields):
    """A transformers.LlamaConfig of TINY_LLAMA with ``fields`` (any LlamaConfig argument) on top."""
    import transformers

    return transformers.LlamaConfig(**{**TINY_LLAMA, **fields})


def prune(model: torch.nn.Module | None = None, layers: dict | None = None, **options) -> dict:
    """``prune_layers`` with the options a test does not name: 50% unstructured magnitude pruning, no
    calibration, no progress bar; the model defaults to one Linear(30, 8), the layers to that one."""
    from fastquant.algorithms.pruning import prune_layers

    model = model if model is not None else torch.nn.Sequential(torch.nn.Linear(30, 8))
    layers = layers if layers is not None else {"0": model[0]}
    defaults = dict(sparsity=0.5, pattern="unstructured", pruning="magnitude", calibration=None, progress=False)
    return prune_layers(model, layers, **{**defaults, **options})


def spy_init_devices(monkeypatch, cls: type) -> list[str]:
    """The ``device`` argument of every ``cls(...)`` built from now on (the list fills as they are built)."""
    devices: list[str] = []
    original = cls.__init__

    def spy(self, *args, device=None, **kwargs):
        devices.append(str(device))
        original(self, *args, device=device, **kwargs)

    monkeypatch.setattr(cls, "__init__", spy)
    return devices


def random_weight(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Rows with different magnitudes (as in trained layers) so per-row scales differ."""
    row_scale = torch.rand(n, 1, generator=generator) * 2 + 0.05
    return torch.randn(n, k, generator=generator) * row_scale


# pytestmark of the CUDA kernel tests: they need a GPU of compute capability 8.0+ (bf16 mma.sync, cp.async) and
# an extension built with its CUDA kernels.
CUDA_KERNEL_MARKS = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA kernels cannot run here"),
    pytest.mark.skipif(
        not extension.has_cuda_kernels(),
        reason="fastquant was built without CUDA kernels (CPU-only torch or no nvcc; rebuild with FASTQUANT_CUDA=ON)",
    ),
    pytest.mark.skipif(
        torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8,
        reason="the CUDA kernels need compute capability 8.0+ (bf16 mma.sync, cp.async)",
    ),
]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def assert_cuda_rule(y, x, weight, bias, y_torch, what: str = "") -> None:
    """The CUDA kernels' tolerance rule (tests/test_int8_linear_cuda.py): with W the dequantized ``weight``,
    y64 = x @ W.T + bias in float64 and ``y_torch`` what PyTorch gives at x's dtype,
    |y - y64| <= 2 |y_torch - y64| + 2^-12 sqrt((x^2) @ (W^2)^T) + 4 u |y64|, u the dtype's unit roundoff."""
    w64, x64 = weight.double(), x.double()
    y64 = x64 @ w64.T
    if bias is not None:
        y64 = y64 + bias.double()
    scale = ((x64**2) @ (w64**2).T).sqrt()
    bound = 2 * (y_torch.double() - y64).abs() + 2.0**-12 * scale + 4 * UNIT_ROUNDOFF[x.dtype] * y64.abs()
    assert y.device == x.device
    assert_within(y, y64, bound, x.dtype, what)


def assert_compiled_matches_eager(f, k: int, rows=(1, 4, 100)) -> None:
    """torch.compile(f, fullgraph=True) gives f's result for bf16 x of shape (2, m, k) on the GPU, for each m of
    ``rows`` (a new batch size retraces or runs dynamic). Inductor fuses what follows the op in fp32 without
    rounding in between: bf16 tolerance, not equality."""
    compiled = torch.compile(f, fullgraph=True)
    for m in rows:
        x = torch.randn(2, m, k, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(compiled(x), f(x))


def cuda_graph_of(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    """``fn(static_x)`` captured in a CUDA graph after two warm-up calls off the default stream (as capture
    requires), static_x a copy of ``x``: (graph, static_x, static_y). Copy new input into static_x and replay."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = fn(static_x)
    return graph, static_x, static_y


def launched_kernels(fn: Callable[[], object]) -> list[str]:
    """Names of the CUDA kernels ``fn`` launches (demangled, template arguments included), from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]


def int4_kernel_path(
    device: torch.device, m: int, n: int, k: int, group_size: int, dtype: torch.dtype, int8_activations: bool = False
) -> str:
    return extension.int4_linear_kernel_path(device, m, n, k, group_size, dtype, int8_activations)


def fixed16_block_max(x: torch.Tensor) -> torch.Tensor:
    """max|x| of each element's 32-column block (float64, x's shape): the scale of the fixed16 kernels' rounding."""
    k = x.shape[-1]
    padded = torch.nn.functional.pad(x.double().abs(), (0, -k % 32))
    block_max = padded.unflatten(-1, (-1, 32)).amax(dim=-1)
    return block_max.repeat_interleave(32, dim=-1)[..., :k]


def assert_int4_linear_close(
    y, x, qweight, scales, offsets, bias, in_features, group_size, path: str, int8_activations: bool = False
) -> None:
    """The int8 rule (module docstring) with the dequantized int4 weight. Kernels that multiply in fp32 get
    c_path = 2^-16 on sqrt((x^2) @ (W^2)^T). cpu_avx2_fixed16 and cpu_avx512_vnni_fixed16 compute exactly with x
    rounded to 16-bit fixed point per 32-column block (error <= max|x of the block| / 65024, uniform): their term
    is 2^-13 (9 standard deviations, and above the worst case sum for K <= 32) times sqrt((xmax^2) @ (W^2)^T), xmax
    the block max.
    cpu_avx512_bf16 rounds x to bf16 and multiplies it by the codes minus 8 (the offsets multiply fp32 sums of x):
    the int8 rule's bf16 term, 2^-6, times sqrt((x^2) @ (Wc^2)^T) with Wc = s (q - 8), the part of W that meets
    the rounded x (W itself when symmetric).
    ``int8_activations``: the same rules with x~ (reference.int8_activation_round of finite x) in place of x:
    cpu_avx2_int8x computes x~ @ W^T exactly per block (the fp32 term), the other kernels run on x~."""
    dtype = x.dtype
    if int8_activations and bool(torch.isfinite(x).all()):
        x = reference.int8_activation_round(x)
    weight = reference.int4_dequantize(qweight, scales, offsets, in_features, group_size).double()
    x64 = x.double()
    y64 = x64 @ weight.T
    if bias is not None:
        y64 = y64 + bias.double()
    y_ref = reference.int4_linear(x, qweight, scales, offsets, bias, in_features, group_size)
    if "fixed16" in path:
        rounding = 2.0**-13 * ((fixed16_block_max(x) ** 2) @ (weight**2).T).sqrt()
    elif "bf16" in path:
        codes_part = reference.int4_dequantize(qweight, scales, None, in_features, group_size).double()
        rounding = 2.0**-6 * ((x64**2) @ (codes_part**2).T).sqrt()
    else:
        rounding = 2.0**-16 * ((x64**2) @ (weight**2).T).sqrt()
    bound = 2 * (y_ref.double() - y64).abs() + rounding + ULP[dtype] * y64.abs()
    assert_within(y, y64, bound, dtype, f"kernel {path}: ")
