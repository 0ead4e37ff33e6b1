"""fastquant.distill and `fastquant distill`: masks stay fixed, the loss falls, resume and data parallel give the same
weights as one uninterrupted process, the output folder loads, bad configs fail clearly. Tiny random Llamas only."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distill_ddp_worker import tiny_data, tiny_pair, trained_weights

import fastquant
from fastquant import Int4Linear, Int8Linear, SparseLinear
from fastquant.algorithms.distillation import (
    DistillConfig,
    MaskedLinear,
    WeightGrid,
    distill,
    kl_loss,
    squarehead_loss,
    token_windows,
)
from fastquant.app import cli
from fastquant.kernels import reference

transformers = pytest.importorskip("transformers")

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: more threads only add synchronization, which on a busy machine costs seconds per step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**overrides) -> DistillConfig:
    base = dict(max_steps=12, batch_size=4, micro_batch_size=2, seq_len=16, lr=3e-3, warmup_steps=0, progress=False)
    return DistillConfig(**{**base, **overrides})


def _sparse_layers(model: torch.nn.Module) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def test_masks_stay_fixed_and_loss_falls():
    teacher, student = tiny_pair()
    before = {n: (m.masks.clone(), m.dequantize()) for n, m in _sparse_layers(student).items()}
    result = distill(student, teacher, tiny_data(), _config())
    after = _sparse_layers(student)
    assert set(after) == set(before) and len(after) == 14  # 7 linear layers per block, lm_head tied and skipped
    changed = 0
    for name, layer in after.items():
        masks, weight = before[name]
        assert torch.equal(layer.masks, masks), name  # same kept positions, stored as bitmap16 again
        dense = layer.dequantize()
        assert torch.all(dense[weight == 0] == 0), name  # pruned weights exactly zero
        changed += int(not torch.equal(dense, weight))
    assert changed == len(after)  # every layer trained
    assert result.steps == 12 and len(result.losses) == 12 and result.stopped_by == "max_steps"
    assert sum(result.losses[-3:]) / 3 < 0.7 * sum(result.losses[:3]) / 3, result.losses
    assert all(not p.requires_grad for p in student.parameters())


@pytest.mark.parametrize("quantization", ["ste", "requantize"])
def test_int8_sparse_student_comes_back_int8(quantization):
    teacher, _ = tiny_pair()
    student = fastquant.patch(
        copy.deepcopy(teacher), "int8+sparse", sparsity=0.5, pruning="magnitude", sparse_kernel="sparse"
    )
    masks = {n: m.masks.clone() for n, m in _sparse_layers(student).items()}
    result = distill(student, teacher, tiny_data(), _config(quantization=quantization))
    for name, layer in _sparse_layers(student).items():
        assert layer.values.dtype == torch.int8 and layer.scales is not None
        assert torch.equal(layer.masks, masks[name])
    assert result.quantization == quantization
    assert result.losses[-1] < result.losses[0]


def test_ste_forward_uses_the_int8_weight_and_passes_the_gradient():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(17, 33, generator=gen)
    mask = torch.rand(17, 33, generator=gen) > 0.5
    layer = MaskedLinear(weight, None, mask, WeightGrid(8, -1))
    x = torch.randn(3, 33, generator=gen)
    codes, scales = fastquant.int8_quantize(weight * mask, -1)
    expected = x @ fastquant.int8_dequantize(codes, scales, -1).t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()
    # straight through: d/dW of sum(x @ W.T) is the column sums of x, masked
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(17, 33) * mask)


@pytest.mark.parametrize("quantization", ["ste", "requantize"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_student_comes_back_int4(quantization, symmetric):
    teacher, _ = tiny_pair()
    student = fastquant.patch(copy.deepcopy(teacher), "int4", group_size=32, symmetric=symmetric, progress=False)
    before = {n: m.dequantize() for n, m in student.named_modules() if isinstance(m, Int4Linear)}
    assert len(before) == 14
    data = tiny_data()

    def kl_to_teacher() -> float:
        with torch.no_grad():
            return float(kl_loss(student(data).logits, teacher(data).logits, 1.0))

    kl_before = kl_to_teacher()
    # lr 1e-3, not the int8 tests' 3e-3: a code moves a whole int4 step (~1/8 of its group's range) when its float
    # weight crosses a rounding boundary, and larger Adam steps make those jumps overshoot on this tiny model.
    result = distill(student, teacher, data, _config(quantization=quantization, lr=1e-3, max_steps=24))
    after = {n: m for n, m in student.named_modules() if isinstance(m, Int4Linear)}
    assert set(after) == set(before)
    changed = 0
    for name, layer in after.items():
        assert layer.group_size == 32 and layer.symmetric == symmetric
        assert (layer.offsets is None) == symmetric
        weight = layer.dequantize()
        # what the layer stores is on its grid: rounding it again changes nothing
        torch.testing.assert_close(WeightGrid(4, 32, symmetric).round(weight), weight, rtol=0, atol=1e-6)
        changed += int(not torch.equal(weight, before[name]))
    assert changed >= 12  # a few small steps may leave a layer's codes where they were, not most layers
    assert result.quantization == quantization and result.layers == 14
    # measured: STE 0.19 -> 0.11 (sym) / 0.16 -> 0.12 (asym); requantize only ~5-10% lower (it never sees the grid)
    assert kl_to_teacher() < (0.8 if quantization == "ste" else 1.0) * kl_before


@pytest.mark.parametrize(
    ("config", "layer_type"),
    [
        (fastquant.Int8(group_size=32, int8_activations=True), Int8Linear),
        (fastquant.Int4(int8_activations=True), Int4Linear),
    ],
    ids=["int8", "int4"],
)
def test_int8_activations_survive_distillation(config, layer_type):
    """The layers are packed back with the option they came with (training itself sees unrounded inputs)."""
    teacher, _ = tiny_pair()
    student = fastquant.patch(copy.deepcopy(teacher), config, progress=False)
    distill(student, teacher, tiny_data(), _config(max_steps=2))
    layers = [m for m in student.modules() if isinstance(m, layer_type)]
    assert len(layers) == 14 and all(m.int8_activations for m in layers)
    assert all(m.format.endswith(" x=int8") for m in layers)


@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_forward_uses_the_int4_weight_and_passes_the_gradient(symmetric):
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(17, 80, generator=gen)  # K = 80: a partial last group of 32 and a partial 64-block
    mask = torch.ones(17, 80, dtype=torch.bool)
    layer = MaskedLinear(weight, None, mask, WeightGrid(4, 32, symmetric))
    x = torch.randn(3, 80, generator=gen)
    qweight, scales, offsets = reference.int4_quantize(weight, 32, symmetric)
    rounded = reference.int4_dequantize(qweight, scales, offsets, 80, 32)
    assert not torch.equal(rounded, weight)
    torch.testing.assert_close(layer(x), x @ rounded.t(), rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(17, 80))


def test_dense_kernel_pruned_layers_keep_their_zeros():
    teacher, _ = tiny_pair()
    student = fastquant.patch(
        copy.deepcopy(teacher), "sparse", sparsity=0.5, pruning="magnitude", sparse_kernel="dense"
    )
    layers = {n: m for n, m in student.named_modules() if getattr(m, "_fastquant_pruned", False)}
    zeros = {n: m.weight == 0 for n, m in layers.items()}
    assert len(layers) == 14 and all(z.float().mean() >= 0.5 for z in zeros.values())
    distill(student, teacher, tiny_data(), _config(max_steps=4))
    for name in layers:
        layer = student.get_submodule(name)
        assert type(layer) is torch.nn.Linear and not layer.weight.requires_grad
        assert torch.all(layer.weight[zeros[name]] == 0)
        assert not torch.equal(layer.weight, teacher.get_submodule(name).weight * ~zeros[name])


def test_linear_schedule_decays_to_zero_after_warm_up():
    teacher, student = tiny_pair()
    result = distill(student, teacher, tiny_data(), _config(max_steps=5, lr=1e-3, warmup_steps=2, lr_schedule="linear"))
    # warm-up to the peak (step 1: 1/2 of it), then the peak times the share of training left
    expected = [1e-3 * min(1.0, (i + 1) / 2) * (1 - i / 5) for i in range(5)]
    assert result.lrs == pytest.approx(expected)
    teacher, student = tiny_pair()
    constant = distill(student, teacher, tiny_data(), _config(max_steps=3, lr=1e-3))
    assert constant.lrs == pytest.approx([1e-3] * 3)


def test_bf16_mixed_precision_trains_fp32_weights():
    teacher, student = tiny_pair()
    before = {n: m.masks.clone() for n, m in _sparse_layers(student).items()}
    result = distill(student, teacher, tiny_data(), _config(precision="bf16"))
    # the loss falls as in fp32 (bf16 matmuls: a coarser gradient, the same direction)
    assert sum(result.losses[-3:]) / 3 < 0.7 * sum(result.losses[:3]) / 3, result.losses
    for name, layer in _sparse_layers(student).items():
        assert layer.values.dtype == torch.float32 and torch.equal(layer.masks, before[name])


def test_hidden_state_loss_and_kl():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    assert kl_loss(t, t, 2.0).abs() < 1e-6
    p_t = torch.softmax(t / 2.0, -1)
    manual = (p_t * (torch.log_softmax(t / 2.0, -1) - torch.log_softmax(s / 2.0, -1))).sum(-1).mean() * 4.0
    torch.testing.assert_close(kl_loss(s, t, 2.0), manual)
    hs = [torch.zeros(1), torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)]
    ht = [torch.ones(1), 3 * torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)]
    manual = sum(((a - b) ** 2).mean() / (b**2).mean() for a, b in zip(hs[1:], ht[1:], strict=True)) / 2
    torch.testing.assert_close(squarehead_loss(hs, ht), manual)
    teacher, student = tiny_pair()
    result = distill(student, teacher, tiny_data(), _config(max_steps=3, hidden_weight=1.0))
    assert all(m > 0 for m in result.hidden_mse)


def test_resume_gives_the_uninterrupted_result(tmp_path):
    teacher, student = tiny_pair()
    straight = distill(student, teacher, tiny_data(), _config(max_steps=6, checkpoint_dir=str(tmp_path / "a")))

    teacher2, part = tiny_pair()
    first = distill(part, teacher2, tiny_data(), _config(max_steps=3, checkpoint_dir=str(tmp_path / "b")))
    assert first.steps == 3 and (tmp_path / "b" / "distill-state.pt").is_file()
    _, fresh = tiny_pair()  # a new process: the compressed model again, the trained state from the checkpoint
    resumed = distill(
        fresh, teacher2, tiny_data(), _config(max_steps=6, checkpoint_dir=str(tmp_path / "b"), resume=True)
    )
    assert resumed.resumed_from == 3 and resumed.steps == 6
    torch.testing.assert_close(resumed.losses, straight.losses, rtol=1e-6, atol=1e-7)
    for name, weight in trained_weights(student).items():
        torch.testing.assert_close(trained_weights(fresh)[name], weight, rtol=1e-6, atol=1e-7)
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000


def test_resume_refuses_a_different_data_order(tmp_path):
    teacher, student = tiny_pair()
    distill(student, teacher, tiny_data(), _config(max_steps=1, checkpoint_dir=str(tmp_path)))
    _, student = tiny_pair()
    with pytest.raises(ValueError, match="seed=0.*seed=1"):
        distill(student, teacher, tiny_data(), _config(max_steps=2, checkpoint_dir=str(tmp_path), resume=True, seed=1))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(max_steps=None, minutes=None), "max_steps or minutes"),
        (dict(temperature=0.0), "temperature must be a positive"),
        (dict(lr=-1.0), "lr must be a positive"),
        (dict(batch_size=5, micro_batch_size=2), "multiple of micro_batch_size"),
        (dict(micro_batch_size=0), "micro_batch_size must be a positive integer"),
        (dict(hidden_weight=float("nan")), "hidden_weight must be a finite number"),
        (dict(quantization="fp8"), "quantization must be one of"),
        (dict(resume=True), "resume needs a checkpoint_dir"),
        (dict(max_steps=2.5), "max_steps must be a positive integer"),
        (dict(precision="fp16"), "precision must be one of"),
        (dict(lr_schedule="cosine"), "lr_schedule must be one of"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_bad_inputs_are_refused():
    teacher, student = tiny_pair()
    with pytest.raises(ValueError, match="no compressed layers"):
        distill(copy.deepcopy(teacher), teacher, tiny_data(), _config())
    with pytest.raises(ValueError, match="same model"):
        distill(student, student, tiny_data(), _config())
    with pytest.raises(ValueError, match=r"shape \(batch, seq_len=16\)"):
        distill(student, teacher, [torch.zeros(2, 8, dtype=torch.long)], _config())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        distill(student, teacher, None, _config())
    with pytest.raises(ValueError, match="not linear"):
        distill(student, teacher, tiny_data(), _config(), masks={"model.norm": torch.ones(64, dtype=torch.bool)})
    with pytest.raises(TypeError, match="DistillConfig"):
        distill(student, teacher, tiny_data(), {"max_steps": 1})


def test_token_windows_from_ids_and_batches():
    ids = torch.arange(50)
    assert torch.equal(token_windows(ids, None, 16), ids[:48].reshape(3, 16))
    batches = [torch.ones(2, 16, dtype=torch.long), torch.zeros(3, 16, dtype=torch.long)]
    assert token_windows(iter(batches), None, 16).shape == (5, 16)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        token_windows(torch.arange(5), None, 16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_weights_of_one(tmp_path):
    """torchrun, 2 processes on gloo: the same global batch split in two gives the one-process weights."""
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(TESTS / "distill_ddp_worker.py"), str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(out, weights_only=True)
    assert two["world"] == 2

    teacher, student = tiny_pair()
    config = DistillConfig(
        max_steps=3, batch_size=4, micro_batch_size=1, seq_len=16, lr=1e-3, warmup_steps=0, progress=False
    )
    one = distill(student, teacher, tiny_data(), config)
    torch.testing.assert_close(two["losses"], one.losses, rtol=1e-5, atol=1e-6)
    weights = trained_weights(student)
    assert set(weights) == set(two["weights"])
    moved = 0.0
    for name, weight in weights.items():
        torch.testing.assert_close(two["weights"][name], weight, rtol=1e-4, atol=1e-5)
        moved = max(moved, (weight - tiny_pair()[1].get_submodule(name).dequantize()).abs().max().item())
    assert moved > 1e-3  # the weights did train: equal weights are not untouched ones


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from test_cli import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-distill"), 64, 128, 4, 256)


@pytest.mark.parametrize("method", ["int8+sparse", "int4"])
def test_cli_distill_writes_a_loadable_folder(llama_dir, tmp_path, method):
    out = tmp_path / "out"
    argv = [
        "distill", str(llama_dir), "--method", method, "--pruning", "magnitude", "--steps", "2",
        "--batch-size", "2", "--micro-batch-size", "1", "--seq-len", "32", "--eval-tokens", "96", "--window", "32",
        "--calibration-sequences", "2", "-o", str(out), "--no-progress",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "distill-loss.png").stat().st_size > 1000
    summary = json.loads((out / "distill.json").read_text())
    assert set(summary["perplexity"]) == {"float", method, "distilled"}
    assert set(summary["perplexity"]["distilled"]) == {"held-out", "train"}
    assert summary["distill"]["steps"] == 2 and len(summary["losses"]) == 2
    model, tokenizer = fastquant.from_pretrained(out)
    assert tokenizer is not None
    kinds = (SparseLinear, Int8Linear) if method == "int8+sparse" else (Int4Linear,)
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    assert len(layers) == 14
    from fastquant.app.evaluate import perplexity

    # the loaded model computes what the distilled model computed: its held-out perplexity again
    held_out = tokenizer(
        fastquant.algorithms.distillation.bundled_text("julius_caesar.txt"), return_tensors="pt"
    ).input_ids[0]
    ppl = perplexity(model, held_out[:96], window=32, stride=16)
    assert ppl == pytest.approx(summary["perplexity"]["distilled"]["held-out"], rel=1e-4)


def test_cli_distill_refuses_bad_options_before_loading(tmp_path, capsys):
    assert cli.main(["distill", "no-such-model", "-o", str(tmp_path), "--minutes", "0"]) == 2
    assert "minutes must be a positive" in capsys.readouterr().out
    assert cli.main(["distill", "no-such-model", "-o", str(tmp_path)]) == 2
    assert "max_steps or minutes" in capsys.readouterr().out
