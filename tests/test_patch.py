"""fastquant.patch / Int8Linear / fastquant.report on models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import fastquant
from fastquant import Int8Linear
from fastquant.kernels import extension, reference
from fastquant.patching import MIN_WEIGHT_ELEMENTS


class Block(nn.Module):
    def __init__(self, dim: int = 256, hidden: int = 512, vocab: int = 300) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.tiny = nn.Linear(dim, 8)  # 2048 weights: below the size where int8 can gain
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_head(h) + self.tiny(h).sum(-1, keepdim=True)


def make_block(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    return Block().eval()


def test_from_linear_error_is_bounded_by_half_a_step():
    """One layer: |y_int8 - y_float| <= sum_k |x_k| * step_n / 2, the exact round-to-nearest bound."""
    torch.manual_seed(1)
    linear = nn.Linear(1025, 300)
    x = torch.randn(7, 1025)
    for group_size in (None, 32, 128):
        layer = Int8Linear.from_linear(linear, group_size)
        step = reference.expand_group_scales(layer.scales, 1025, layer.group_size_arg)
        bound = x.abs() @ (step / 2).T + 1e-4
        with torch.no_grad():
            assert bool(((layer(x) - linear(x)).abs() <= bound).all())
        assert layer.dequantize().shape == linear.weight.shape
        assert layer.dequantize().dtype == torch.float32


def test_patch_replaces_and_skips_with_reasons():
    model = make_block()
    tokens = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        expected = model(tokens)
    assert fastquant.patch(model) is model
    assert isinstance(model.up, Int8Linear) and isinstance(model.down, Int8Linear)
    assert type(model.lm_head) is nn.Linear and type(model.tiny) is nn.Linear
    rows = {row.name: row for row in fastquant.report(model).layers}
    assert rows["lm_head"].note == "skipped by name"
    assert rows["tiny"].note.startswith("too small to gain") and str(MIN_WEIGHT_ELEMENTS) in rows["tiny"].note
    assert rows["up"].format == "int8 per-channel" and rows["up"].kernel != "torch"
    assert rows["up"].bytes_before == 256 * 512 * 4 and rows["up"].bytes_after == 256 * 512 + 512 * 4
    with torch.no_grad():
        got = model(tokens)
    # Two int8 layers of Gaussian weights: about 1% relative error each.
    assert (got - expected).norm() / expected.norm() < 0.03


def test_filter_fn_and_group_size_and_skip():
    model = make_block()
    seen = []

    def only_up(module: nn.Module, name: str) -> bool:
        seen.append(name)
        return name == "up"

    fastquant.patch(model, group_size=64, skip=(), filter_fn=only_up)
    assert isinstance(model.up, Int8Linear) and model.up.group_size == 64
    assert type(model.down) is nn.Linear and type(model.lm_head) is nn.Linear
    assert set(seen) == {"up", "down", "tiny", "lm_head"}
    assert "int8 group=64" in repr(model.up)


def test_tied_weights_stay_float_unless_asked():
    model = make_block()
    model.lm_head.weight = model.embed.weight  # tied, as in most small LMs
    fastquant.patch(model, skip=())
    assert type(model.lm_head) is nn.Linear
    note = {row.name: row.note for row in fastquant.report(model).layers}["lm_head"]
    assert "tied to embed" in note and "quantize_tied=True" in note

    model = make_block()
    model.lm_head.weight = model.embed.weight
    embed_before = model.embed.weight.detach().clone()
    fastquant.patch(model, skip=(), quantize_tied=True)
    assert isinstance(model.lm_head, Int8Linear)
    assert torch.equal(model.embed.weight, embed_before)  # the embedding keeps its float weight


def test_shared_linear_stays_shared():
    torch.manual_seed(0)
    shared = nn.Linear(128, 128)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    fastquant.patch(model)
    assert isinstance(model[0], Int8Linear) and model[0] is model[2]


def test_transformers_conv1d_is_transposed():
    import transformers

    config = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=300, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        expected = model(tokens).logits
    fastquant.patch(model)
    attn = model.transformer.h[0].attn
    assert isinstance(attn.c_attn, Int8Linear) and attn.c_attn.qweight.shape == (384, 128)
    with torch.no_grad():
        got = model(tokens).logits
    assert (got - expected).norm() / expected.norm() < 0.03


def test_nan_weight_names_the_layer():
    model = make_block()
    with torch.no_grad():
        model.down.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'down'.*1 NaN/inf"):
        fastquant.patch(model)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown method"):
        fastquant.patch(make_block(), method="int3")
    with pytest.raises(ValueError, match="group_size"):
        fastquant.patch(make_block(), group_size=48)


@pytest.mark.parametrize("group_size", [None, 32])
def test_patch_with_int8_activations_rounds_every_layer_input(group_size):
    """Int8(int8_activations=True): every int8 layer rounds its input (the report says so and names the kernel
    that runs then), each layer computes what reference.int8_linear(..., int8_activations=True) gives at decode
    and prefill row counts, and the model stays close to the one without the rounding (not equal)."""
    plain = fastquant.patch(make_block(), fastquant.Int8(group_size))
    model = fastquant.patch(make_block(), fastquant.Int8(group_size, int8_activations=True))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert sorted(layers) == ["down", "up"] and all(m.int8_activations for m in layers.values())
    assert not any(m.int8_activations for m in plain.modules() if isinstance(m, Int8Linear))
    layout = "per-channel" if group_size is None else f"group={group_size}"
    rows = {row.name: row for row in fastquant.report(model).layers}
    assert rows["up"].format == f"int8 {layout} x=int8" and f"format=int8 {layout} x=int8" in repr(model.up)
    assert {row.name: row.format for row in fastquant.report(plain).layers}["up"] == f"int8 {layout}"
    decode_path = extension.int8_linear_kernel_path(
        torch.device("cpu"), 1, 512, 256, model.up.group_size_arg, torch.float32, True
    )
    assert rows["up"].kernel.split(" / ")[0] == decode_path
    gen = torch.Generator().manual_seed(1)
    for layer in layers.values():
        for m in (1, 5):
            x = torch.randn(m, layer.in_features, generator=gen)
            args = (x, layer.qweight, layer.scales, layer.bias, layer.group_size_arg)
            expected = reference.int8_linear(*args, int8_activations=True)
            with torch.no_grad():
                got = layer(x)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert not torch.equal(expected, reference.int8_linear(*args))  # the rounding changes the output
    tokens = torch.randint(0, 300, (2, 9), generator=gen)
    with torch.no_grad():
        a, b = model(tokens), plain(tokens)
    assert not torch.equal(a, b)
    assert (a - b).norm() / b.norm() < 0.02  # x~ is within 0.4% of x per block


def test_int8_activations_with_gptq_and_not_for_sparse_values():
    """GPTQ rounding (calibrated on unrounded inputs) keeps the option; sparse int8 values refuse it."""
    tokens = [torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = fastquant.patch(
        make_block(), fastquant.Int8(rounding=fastquant.GPTQ(tokens), int8_activations=True), progress=False
    )
    assert isinstance(model.up, Int8Linear) and model.up.int8_activations and model.down.int8_activations
    assert "GPTQ rounding" in {row.name: row.note for row in fastquant.report(model).layers}["up"]
    with pytest.raises(ValueError, match="not to sparse int8 values"):
        fastquant.Sparse(values=fastquant.Int8(int8_activations=True))


def test_int8_activations_must_be_a_bool():
    with pytest.raises(ValueError, match="int8_activations must be True or False"):
        fastquant.Int8(int8_activations="yes")
    with pytest.raises(ValueError, match="int8_activations must be True or False"):
        Int8Linear(64, 8, int8_activations=1)


def test_from_linear_and_from_codes_keep_int8_activations():
    linear = nn.Linear(96, 40)
    layer = Int8Linear.from_linear(linear, 32, int8_activations=True)
    assert layer.int8_activations and layer.format == "int8 group=32 x=int8"
    copy = Int8Linear.from_codes(linear, layer.qweight, layer.scales, 32, int8_activations=True)
    assert copy.int8_activations and torch.equal(copy.qweight, layer.qweight)
    assert not Int8Linear.from_codes(linear, layer.qweight, layer.scales, 32).int8_activations


def test_dtype_moves_keep_fp32_scales():
    model = fastquant.patch(make_block())
    model.to(torch.bfloat16)
    assert model.up.scales.dtype == torch.float32 and model.up.qweight.dtype == torch.int8
    assert model.up.bias.dtype == torch.bfloat16 and model.up.dtype == torch.bfloat16
    tokens = torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        assert model(tokens).dtype == torch.bfloat16
    model.half()
    assert model.up.scales.dtype == torch.float32 and model.up.dequantize().dtype == torch.float16


def test_state_dict_holds_int8_codes():
    model = fastquant.patch(make_block())
    state = model.state_dict()
    assert state["up.qweight"].dtype == torch.int8 and state["up.scales"].dtype == torch.float32
    fresh = fastquant.patch(make_block(seed=1))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.up.qweight, model.up.qweight)


def test_compiled_patched_model_matches_eager():
    model = fastquant.patch(make_block())
    tokens = torch.randint(0, 300, (2, 7))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_report_markdown_totals():
    model = fastquant.patch(make_block())
    report = fastquant.report(model)
    text = report.to_markdown()
    assert "| up | 512x256 | int8 per-channel |" in text and "x smaller" in text
    assert report.bytes_after < report.bytes_before


def test_info_command_reports_kernel_paths():
    out = subprocess.run([sys.executable, "-m", "fastquant.info"], capture_output=True, text=True, check=True)
    assert "fastquant" in out.stdout and "int8_linear cpu float32 M=1:" in out.stdout
    assert "int8_linear (int8 activations) cpu float32 M=1:" in out.stdout
    assert "sparse_linear (bitmap16) cpu int8 values M=1:" in out.stdout
    assert "sparse_csr_linear (csr16) cpu:" in out.stdout
    if extension.native is not None:
        assert "CPU features:" in out.stdout


def test_info_reports_the_int8_kernel_with_int8_activations():
    from fastquant.app.info import info_lines

    (line,) = [line for line in info_lines() if line.startswith("int8_linear (int8 activations) cpu")]
    expected = extension.int8_linear_kernel_path(torch.device("cpu"), 1, 4096, 4096, -1, torch.float32, True)
    assert line == f"int8_linear (int8 activations) cpu float32 M=1: {expected}"


def test_info_require_cuda_names_what_is_missing():
    """--require-cuda reads the dispatcher's table (no GPU needed): on a build without CUDA kernels it fails and
    says why; every op always has its CPU kernel where the extension loaded."""
    from fastquant.app import info

    assert info.fastquant_ops() == sorted(
        f"fastquant::{name}"
        for name in ("decode_attention", "int4_linear", "int8_linear", "sparse_csr_linear", "sparse_linear")
    )
    if extension.native is not None:
        assert info.ops_without_kernel("CPU") == []
    out = subprocess.run([sys.executable, "-m", "fastquant.info", "--require-cuda"], capture_output=True, text=True)
    if extension.has_cuda_kernels():
        assert out.returncode == 0 and "CUDA kernels registered for every op" in out.stdout
    else:
        assert out.returncode == 1
        assert "CUDA build check: " in out.stderr and "CUDA kernels registered" not in out.stdout


@pytest.mark.parametrize("method", ["int8", "int8+sparse", "sparse"])
def test_layers_agree_with_and_without_autograd(method):
    """Without gradients the layers skip the op's Python autograd kernel (its per-call cost matters at
    decode): same outputs in every grad mode, and gradients still reach the activations when enabled."""
    model = fastquant.patch(
        make_block(), method, pruning="magnitude", sparsity=0.5, sparse_kernel="sparse", progress=False
    )
    layer = model.up
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        y_no_grad = layer(x)
    with torch.inference_mode():
        y_inference = layer(x)
    x_grad = x.clone().requires_grad_(True)
    y_grad = layer(x_grad)
    assert y_grad.requires_grad and not y_no_grad.requires_grad
    torch.testing.assert_close(y_no_grad, y_grad.detach(), rtol=0, atol=0)
    torch.testing.assert_close(y_inference, y_no_grad, rtol=0, atol=0)
    y_grad.sum().backward()
    expected = layer.dequantize().sum(0).expand_as(x)  # d(sum(x @ W.T)) / dx = column sums of W
    torch.testing.assert_close(x_grad.grad, expected, rtol=1e-5, atol=1e-5)


def test_repatching_a_patched_layer_is_an_error():
    model = fastquant.patch(make_block())
    with pytest.raises(
        fastquant.AlreadyPatchedError, match=r"2 layers are compressed already: up \(int8 per-channel\)"
    ):
        fastquant.patch(model, "int8")
    with pytest.raises(fastquant.AlreadyPatchedError, match="down"):
        fastquant.prune(model, pruning="magnitude", skip=("up",))
    # Layers left out by name or filter are fine: the rest can still be patched.
    fastquant.patch(model, skip=(), filter_fn=lambda module, name: name == "lm_head")
    assert isinstance(model.lm_head, Int8Linear)


def test_info_names_the_compiler():
    from fastquant.app.info import compiler_name, info_lines

    assert compiler_name("12.2.0") == "gcc 12.2.0"  # GCC's __VERSION__ is the bare number
    assert compiler_name("Clang 17.0.6") == "Clang 17.0.6"
    if extension.native is not None:
        assert any(
            line.startswith("native extension: built for torch ") and ", compiler " in line for line in info_lines()
        )
