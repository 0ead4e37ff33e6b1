"""Knowledge distillation: train a compressed (pruned, int8 or int4) student to match its float teacher.

    import fastquant
    from fastquant.algorithms.distillation import DistillConfig, distill
    student = fastquant.patch(copy.deepcopy(teacher), "sparse", sparsity=0.5, tokenizer=tokenizer)
    result = distill(student, teacher, "train.txt", DistillConfig(minutes=30, checkpoint_dir="ckpt"), tokenizer)

How the student trains:

* Every compressed layer (:class:`~fastquant.SparseLinear`, :class:`~fastquant.Int8Linear`,
  :class:`~fastquant.Int4Linear`, and a pruned layer that ``fastquant.patch`` kept dense because the dense kernel was
  faster) is unpacked into a :class:`MaskedLinear`: a
  float ``nn.Linear`` whose weight is multiplied by a fixed keep-mask in every forward pass, so pruned weights get no
  gradient and stay exactly zero. Everything else (embeddings, norms, lm_head) is frozen.
* int8 and int4 layers train either with a straight-through estimator (``quantization="ste"``: the forward pass
  uses the weight rounded to the layer's grid, the gradient passes to the float weight unchanged) or in plain float
  (``"requantize"``); either way the weights are rounded to the grid once more at the end (round-to-nearest: a
  GPTQ rounding of the patched model is not redone).
* The loss is the KL divergence KL(teacher || student) of the temperature-softened next-token distributions, scaled
  by T^2 so that its gradient does not shrink with T; optionally plus SquareHead's per-layer hidden-state loss
  (each layer's MSE divided by the teacher's mean square there, averaged over layers) and a cross-entropy on the text
  (off by default: the student should approach the teacher, not adapt to the training text).
* At the end every layer is packed back into the format it came in (same pattern, layout, group size and
  ``int8_activations``; training itself sees unrounded inputs, as GPTQ calibrates on them).

Data parallel: under ``torchrun --nproc_per_node N`` (or any launcher setting ``RANK``/``WORLD_SIZE``), the student is
wrapped in ``torch.nn.parallel.DistributedDataParallel`` (gloo on CPU, NCCL on GPU). Each optimizer step takes the
same global batch of token windows whatever the number of processes: each rank takes its slice, accumulates
gradients over micro-batches and DDP averages them, so N processes give the same weights as one (up to float
rounding). Only rank 0 writes checkpoints, the loss curve and the result.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastquant.kernels import reference
from fastquant.modules import Int4Linear, Int8Linear, SparseLinear, is_quantizable_linear, linear_weight
from fastquant.progress import progress_bar

# The bundled plays: training text by default (Hamlet is also the pruning calibration text, The Tempest the
# evaluation text of `fastquant demo/eval`); Julius Caesar is used by nothing but distillation's held-out score.
TRAIN_TEXTS = ("hamlet.txt", "tempest.txt", "macbeth.txt")
HELD_OUT_TEXT = "julius_caesar.txt"
STATE_FILE = "distill-state.pt"
QUANTIZATION_MODES = ("ste", "requantize")
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "linear")
# The attribute fastquant.patch sets on a pruned layer it kept in a dense format (nn.Linear or Int8Linear): its
# zeros are pruned weights, to be kept at zero when it trains.
PRUNED_MARKER = "_fastquant_pruned"
DISTRIBUTED_TIMEOUT_HOURS = 2


@dataclass
class DistillConfig:
    """What :func:`distill` does; every field is checked when the config is made (ValueError naming the field).

    Attributes:
        temperature: softens both distributions before the KL divergence (> 0); the loss is scaled by T^2.
        hidden_weight: weight of SquareHead's normalized per-layer hidden-state MSE (0: off).
        ce_weight: weight of the cross-entropy on the training text (0: off, the default).
        lr: AdamW's peak learning rate, reached after ``warmup_steps`` of linear warm-up.
        lr_schedule: after the warm-up, ``"constant"``, or ``"linear"`` decay to zero at the end of training (the
            end is ``max_steps``, or ``minutes`` by rank 0's clock, whichever comes first).
        precision: ``"fp32"``, or ``"bf16"``: the teacher's and the student's forward and backward passes run under
            ``torch.autocast(bfloat16)`` while the trained weights, their gradients and AdamW's state stay fp32
            (mixed precision). 1.4x the tokens/s of fp32 on a CPU with AVX-512 BF16 (SmolLM2-135M); slower than
            fp32 on a CPU without bf16 instructions, where torch emulates it.
        batch_size: token windows per optimizer step, over all processes (the global batch).
        micro_batch_size: windows per forward pass on each process; the rest of a process's share of the batch is
            gradient accumulation (``batch_size / world_size / micro_batch_size`` micro-steps).
        seq_len: tokens per window.
        max_steps / minutes: stop after this many optimizer steps / minutes of training (counted over resumed runs
            too); at least one is needed, whichever comes first ends training.
        checkpoint_dir: where the training state (trainable weights, optimizer, step, losses) is saved, every
            ``checkpoint_every`` steps, every ``checkpoint_minutes`` and at the end; None: no checkpoints.
        resume: continue from the state in ``checkpoint_dir`` if there is one (it must have the same seed,
            batch_size and seq_len: they decide which windows each step sees).
        seed: the order of the windows (one permutation per pass over the data).
        quantization: int8/int4 layers: ``"ste"`` trains through their rounding with a straight-through estimator,
            ``"requantize"`` trains float weights and rounds once at the end.
        weight_decay, warmup_steps, max_grad_norm: AdamW's decoupled weight decay; linear warm-up; gradient-norm
            clipping (None: off).
        loss_plot: PNG of the loss curve (None: ``checkpoint_dir/loss.png`` when there is a checkpoint_dir).
        progress: progress bar with loss and tokens/s: None on a terminal only, True always, False never.
    """

    temperature: float = 1.0
    hidden_weight: float = 0.0
    ce_weight: float = 0.0
    lr: float = 1e-4
    lr_schedule: Literal["constant", "linear"] = "constant"
    precision: Literal["fp32", "bf16"] = "fp32"
    batch_size: int = 8
    micro_batch_size: int = 2
    seq_len: int = 256
    max_steps: int | None = None
    minutes: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    checkpoint_minutes: float = 5.0
    resume: bool = False
    seed: int = 0
    quantization: Literal["ste", "requantize"] = "ste"
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float | None = 1.0
    loss_plot: str | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        def positive(name: str, integer: bool) -> None:
            value = getattr(self, name)
            kind = int if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
                raise ValueError(
                    f"DistillConfig.{name} must be a positive {'integer' if integer else 'number'}, got {value!r}"
                )

        for name in ("temperature", "lr"):
            positive(name, integer=False)
        for name in ("batch_size", "micro_batch_size", "seq_len", "checkpoint_every"):
            positive(name, integer=True)
        for name in ("hidden_weight", "ce_weight", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
                raise ValueError(f"DistillConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.max_steps is None and self.minutes is None:
            raise ValueError("DistillConfig needs max_steps or minutes (or both): when should training stop?")
        if self.max_steps is not None:
            positive("max_steps", integer=True)
        if self.minutes is not None:
            positive("minutes", integer=False)
        positive("checkpoint_minutes", integer=False)
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"DistillConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.max_grad_norm is not None:
            positive("max_grad_norm", integer=False)
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(
                f"DistillConfig.quantization must be one of {QUANTIZATION_MODES}, got {self.quantization!r}"
            )
        for name, allowed in (("lr_schedule", LR_SCHEDULES), ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DistillConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"DistillConfig.batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("DistillConfig.resume needs a checkpoint_dir to resume from")


@dataclass
class DistillResult:
    """What a :func:`distill` run did. ``losses``: the loss of every optimizer step since step 0 (resumed runs
    included), averaged over the global batch; ``kl``/``hidden_mse``: the same for the parts of the loss;
    ``lrs``: the learning rate of every step."""

    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    world_size: int
    stopped_by: str
    quantization: str
    trainable_parameters: int
    layers: int
    losses: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    hidden_mse: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    resumed_from: int = 0
    loss_plot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------- trainable layers
@dataclass(frozen=True)
class WeightGrid:
    """The integer grid a compressed layer stores its weights on: ``bits`` 8 (symmetric, ``group_size`` -1 = per
    channel) or 4 (groups of ``group_size``, symmetric or with offsets), rounded to nearest as the layer formats'
    ``from_linear`` does."""

    bits: Literal[8, 4]
    group_size: int
    symmetric: bool = True

    def quantize(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(codes, scales, offsets or None) of ``weight`` (N, K), as the layer format stores them."""
        if self.bits == 8:
            codes, scales = reference.int8_quantize(weight, self.group_size)
            return codes, scales, None
        return reference.int4_quantize(weight, self.group_size, self.symmetric)

    def round(self, weight: Tensor) -> Tensor:
        """``weight`` rounded to the grid, as float32."""
        codes, scales, offsets = self.quantize(weight)
        if self.bits == 8:
            return reference.int8_dequantize(codes, scales, self.group_size)
        return reference.int4_dequantize(codes, scales, offsets, weight.shape[1], self.group_size)


class MaskedLinear(nn.Linear):
    """A float linear layer with a fixed keep-mask: ``y = x @ (weight * mask).T + bias``.

    The mask makes the gradient of every pruned weight zero, so AdamW (whose update of a weight with zero gradient
    and zero state is zero) never moves it; :func:`distill` also re-applies the mask after each step. With a
    ``grid`` the forward pass uses the weight rounded to it and the gradient passes straight through to the float
    weight (straight-through estimator)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, mask: Tensor, grid: WeightGrid | None = None) -> None:
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias is not None, device=weight.device, dtype=torch.float32)
        with torch.no_grad():
            self.weight.copy_(weight.float() * mask)
            if bias is not None:
                self.bias.copy_(bias.detach().float())
                self.bias.requires_grad_(False)
        self.register_buffer("mask", mask.to(device=weight.device, dtype=torch.float32))
        self.grid = grid

    def effective_weight(self) -> Tensor:
        weight = self.weight * self.mask
        if self.grid is not None:
            with torch.no_grad():
                rounded = self.grid.round(weight)
            weight = weight + (rounded - weight).detach()
        return weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@dataclass
class _LayerSpec:
    """How a compressed layer was stored, to pack its trained weights the same way."""

    kind: str  # "sparse", "int8", "int4" or "dense" (a pruned nn.Linear)
    dtype: torch.dtype
    grid: WeightGrid | None  # None: float values
    group_size: int | None  # the layer's own (None: per channel)
    pattern: str = "unstructured"
    layout: str = "bitmap16"
    int8_activations: bool = False  # int8 and int4: the layer rounds its input to int8 per 32 columns


def _unpack(module: nn.Module, mask: Tensor | None, quantization: str) -> tuple[MaskedLinear, _LayerSpec]:
    int8_grid = WeightGrid(8, -1 if getattr(module, "group_size", None) is None else module.group_size)
    if isinstance(module, SparseLinear):
        grid = int8_grid if module.values.dtype == torch.int8 else None
        spec = _LayerSpec("sparse", module.dtype, grid, module.group_size, module.pattern, module.layout)
        keep = reference.sparse_mask_bits(module.masks, module.in_features)
        weight = module.dequantize()
    elif isinstance(module, Int8Linear):
        spec = _LayerSpec("int8", module.dtype, int8_grid, module.group_size, int8_activations=module.int8_activations)
        weight = module.dequantize()
        keep = module.qweight != 0 if getattr(module, PRUNED_MARKER, False) else torch.ones_like(weight, dtype=bool)
    elif isinstance(module, Int4Linear):
        grid = WeightGrid(4, module.group_size, module.symmetric)
        spec = _LayerSpec("int4", module.dtype, grid, module.group_size, int8_activations=module.int8_activations)
        weight = module.dequantize()
        keep = torch.ones_like(weight, dtype=bool)
    else:
        weight = linear_weight(module).detach()
        spec = _LayerSpec("dense", weight.dtype, None, None)
        keep = weight != 0 if getattr(module, PRUNED_MARKER, False) else torch.ones_like(weight, dtype=bool)
    if mask is not None:
        if mask.shape != weight.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        keep = mask.to(weight.device)
    return MaskedLinear(weight, module.bias, keep, spec.grid if quantization == "ste" else None), spec


def _repack(layer: MaskedLinear, spec: _LayerSpec) -> nn.Module:
    with torch.no_grad():
        weight = (layer.weight * layer.mask).to(spec.dtype)
        linear = nn.Linear(
            layer.in_features, layer.out_features, layer.bias is not None, device=weight.device, dtype=spec.dtype
        )
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        linear.weight.requires_grad_(False)
        mask = layer.mask.bool()
        codes = scales = offsets = None
        if spec.grid is not None:
            codes, scales, offsets = spec.grid.quantize(weight.float() * layer.mask)
        if spec.kind == "int4":
            return Int4Linear.from_codes(
                codes,
                scales,
                offsets,
                linear.bias,
                spec.group_size,
                in_features=layer.in_features,
                dtype=spec.dtype,
                device=weight.device,
                int8_activations=spec.int8_activations,
            )
        if spec.kind == "sparse":
            new = SparseLinear.from_pruned(linear, mask, codes, scales, spec.group_size, spec.pattern)
            return new.set_layout(spec.layout)
        if spec.kind == "int8":
            new = Int8Linear.from_codes(linear, codes, scales, spec.group_size, int8_activations=spec.int8_activations)
            if not bool(mask.all()):
                setattr(new, PRUNED_MARKER, True)
            return new
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        setattr(linear, PRUNED_MARKER, True)
        return linear


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def trainable_layers(student: nn.Module, masks: dict[str, Tensor] | None = None) -> list[str]:
    """The layers :func:`distill` trains: every compressed layer, every linear layer ``fastquant.patch`` pruned but
    kept dense, and every layer named in ``masks``."""
    names = []
    masks = masks or {}
    for name, module in student.named_modules():
        compressed = isinstance(module, (Int4Linear, Int8Linear, SparseLinear))
        linear = is_quantizable_linear(module)
        if compressed or (linear and (name in masks or getattr(module, PRUNED_MARKER, False))):
            names.append(name)
    unknown = sorted(set(masks) - set(names))
    if unknown:
        raise ValueError(f"masks names layers the student does not have (or that are not linear): {unknown[:5]}")
    return names


# ------------------------------------------------------------------------------------------------------ data
def bundled_text(name: str) -> str:
    """A play bundled in ``fastquant/data`` (see its README)."""
    return resources.files("fastquant").joinpath("data", name).read_text(encoding="utf-8")


def default_training_text() -> str:
    return "\n\n".join(bundled_text(name) for name in TRAIN_TEXTS)


def token_windows(data: Any, tokenizer: Any, seq_len: int) -> Tensor:
    """The training data as a (windows, seq_len) LongTensor.

    ``data``: None (the bundled plays: Hamlet, The Tempest and Macbeth), a text file path (str or Path), a
    LongTensor of token ids (1-D: cut into windows; 2-D: rows of seq_len tokens), or an iterable of LongTensors of shape
    (batch, seq_len). Texts are tokenized with ``tokenizer`` and cut into consecutive windows (a short tail is
    dropped)."""
    if data is None or isinstance(data, (str, os.PathLike)):
        if tokenizer is None:
            raise ValueError("training on text needs a tokenizer= (or pass token ids instead of text)")
        if data is None:
            text = default_training_text()
        else:
            path = Path(data)
            if not path.is_file():
                raise FileNotFoundError(f"training text {path} does not exist")
            text = path.read_text(encoding="utf-8")
        data = tokenizer(text, return_tensors="pt").input_ids[0]
    if isinstance(data, Tensor) and data.dim() == 1:
        n = data.numel() // seq_len
        if n == 0:
            raise ValueError(f"the training data has {data.numel()} tokens, fewer than seq_len={seq_len}")
        data = data[: n * seq_len].reshape(n, seq_len)
    batches = [data] if isinstance(data, Tensor) else list(data)
    if not batches:
        raise ValueError("the training data is empty")
    for batch in batches:
        if not isinstance(batch, Tensor) or batch.dim() != 2 or batch.dtype != torch.long or batch.shape[1] != seq_len:
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise ValueError(
                f"token batches must be LongTensors of shape (batch, seq_len={seq_len}), got {shape}"
                + (f" {batch.dtype}" if isinstance(batch, Tensor) else "")
            )
    return torch.cat(batches).contiguous()


def _global_batch(windows: Tensor, step: int, batch_size: int, seed: int) -> Tensor:
    """The window indices of optimizer step ``step``: a fresh permutation per pass over the data (seeded by the
    pass number), read in order, so every process and every resumed run agree on them."""
    n = windows.shape[0]
    positions = range(step * batch_size, (step + 1) * batch_size)
    cache: dict[int, Tensor] = {}
    out = []
    for p in positions:
        epoch = p // n
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(cache[epoch][p % n]))
    return torch.tensor(out)


# ------------------------------------------------------------------------------------------------------ losses
def kl_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) per token, averaged over tokens, of the distributions softened by ``temperature``,
    times T^2 (Hinton et al.: keeps the gradient's scale independent of T)."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def squarehead_loss(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor]) -> Tensor:
    """SquareHead (Kurtic et al. 2023): per transformer layer, MSE(student, teacher) / mean(teacher^2), averaged
    over layers; the normalization puts layers of very different activation scales on one footing. The embedding
    output (index 0, never compressed) is left out."""
    losses = [
        F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12)
        for s, t in zip(student_hidden[1:], teacher_hidden[1:], strict=True)
    ]
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------- distributed
def init_distributed() -> tuple[int, int]:
    """(rank, world_size); starts the process group when a launcher (torchrun) set ``WORLD_SIZE`` > 1 and none
    exists yet: NCCL when CUDA is available, gloo otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Rank 0 may score perplexities or write files while the others wait in a collective: minutes on a busy CPU,
    # more than the default 10-30 minute timeouts allow.
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=DISTRIBUTED_TIMEOUT_HOURS))
    return dist.get_rank(), dist.get_world_size()


def _all_reduce(values: Tensor, op: str = "sum") -> Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return values


# ------------------------------------------------------------------------------------------------ checkpoints
def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a run killed while writing leaves the previous state intact


def _load_state(path: Path, config: DistillConfig) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
    saved = state.get("config", {})
    for key in ("seed", "batch_size", "seq_len"):
        if saved.get(key) != getattr(config, key):
            raise ValueError(
                f"cannot resume from {path}: it was trained with {key}={saved.get(key)!r}, this run has "
                f"{key}={getattr(config, key)!r} (they decide which windows each step sees)"
            )
    return state


def plot_losses(losses: Sequence[float], path: str | os.PathLike, title: str = "distillation loss") -> Path | None:
    """A PNG of the per-step loss (and its running mean); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="per step")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        ax.plot(range(window, len(losses) + 1), smooth, lw=1.8, label=f"mean of {window} steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- distill
def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Any = None,
    config: DistillConfig | None = None,
    tokenizer: Any = None,
    *,
    masks: dict[str, Tensor] | None = None,
) -> DistillResult:
    """Train ``student`` (a model patched by :func:`fastquant.patch`) to match ``teacher`` (the float model), in
    place; the compressed layers come back in their original formats with the trained weights.

    Args:
        student: the compressed model; its compressed layers train, everything else is frozen.
        teacher: the float model, same tokenizer and vocabulary; never changed.
        data: see :func:`token_windows` (None: the bundled plays, tokenized with ``tokenizer``).
        config: a :class:`DistillConfig` (default: ``DistillConfig(max_steps=100)``).
        tokenizer: tokenizes text data.
        masks: keep-masks (bool, True = kept) by layer name, for layers whose pruning the model does not record
            (e.g. a pruned layer of a loaded checkpoint that is stored dense); they also override a sparse layer's
            own mask.

    Under ``torchrun`` every process calls this with the same arguments (see the module docstring). Returns a
    :class:`DistillResult`.
    """
    config = config or DistillConfig(max_steps=100)
    if not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
    if student is teacher:
        raise ValueError("student and teacher are the same model: pass the float model as teacher and a patched copy")
    rank, world = init_distributed()
    per_rank, rest = divmod(config.batch_size, world)
    if rest or per_rank % config.micro_batch_size:
        raise ValueError(
            f"batch_size={config.batch_size} must split into {world} processes x whole micro-batches of "
            f"{config.micro_batch_size} (batch_size a multiple of world_size * micro_batch_size)"
        )
    accumulation = per_rank // config.micro_batch_size
    names = trainable_layers(student, masks)
    if not names:
        raise ValueError("the student has no compressed layers to train: patch it with fastquant.patch first")
    windows = token_windows(data, tokenizer, config.seq_len)
    device = next(student.parameters()).device

    # Unpack: float trainable weights behind fixed masks; everything else frozen.
    for p in student.parameters():
        p.requires_grad_(False)
    specs: dict[str, _LayerSpec] = {}
    for name in names:
        layer, specs[name] = _unpack(student.get_submodule(name), (masks or {}).get(name), config.quantization)
        _set_submodule(student, name, layer)
    layers = {name: student.get_submodule(name) for name in names}
    params = [layers[name].weight for name in names]
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    # No dropout anywhere: the student must be a deterministic function of its weights (same result on 1 or N
    # processes and after a resume); the gradients flow in eval mode just the same.
    student.eval()
    model: nn.Module = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # No buffer sync before each forward pass: the masks (the only buffers that could differ) are synced once
        # when DDP starts; re-sending every buffer per step would move the model's size through gloo. torch >= 2.13
        # spells it forward_sync_buffers (and deprecates broadcast_buffers), older torch only broadcast_buffers.
        no_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
            else {"broadcast_buffers": False}
        )
        model = DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None, **no_sync
        )
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    state_path = Path(config.checkpoint_dir) / STATE_FILE if config.checkpoint_dir else None
    start_step, elapsed_before, history = 0, 0.0, {"losses": [], "kl": [], "hidden_mse": [], "lrs": []}
    if config.resume and state_path is not None:
        state = _load_state(state_path, config)
        if state is not None:
            with torch.no_grad():
                for name in names:
                    layers[name].weight.copy_(state["weights"][name])
            optimizer.load_state_dict(state["optimizer"])
            start_step, elapsed_before = int(state["step"]), float(state["elapsed"])
            history = {k: list(state.get(k, [])) for k in history}

    want_hidden = config.hidden_weight > 0

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")

    step = start_step
    tokens_per_step = config.batch_size * config.seq_len
    started = time.perf_counter()
    last_checkpoint = started
    stopped_by = "max_steps"
    step_seconds: list[float] = []

    def save(step: int) -> None:
        if rank != 0 or state_path is None:
            return
        _save_state(
            state_path,
            {
                "step": step,
                "elapsed": elapsed_before + time.perf_counter() - started,
                "weights": {name: layers[name].weight.detach().cpu() for name in names},
                "optimizer": optimizer.state_dict(),
                "config": {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))},
                **history,
            },
        )

    total = config.max_steps
    with progress_bar(
        total=total,
        initial=min(start_step, total or start_step),
        desc="distilling",
        progress=config.progress if rank == 0 else False,
    ) as bar:
        while True:
            elapsed = elapsed_before + time.perf_counter() - started
            stop = 0.0
            if config.max_steps is not None and step >= config.max_steps:
                stop, stopped_by = 1.0, "max_steps"
            elif config.minutes is not None and elapsed >= 60 * config.minutes:
                stop, stopped_by = 1.0, "minutes"
            done = max(
                step / config.max_steps if config.max_steps else 0.0,
                elapsed / (60 * config.minutes) if config.minutes else 0.0,
            )
            # Rank 0's clock decides for everyone: the processes must run the same number of steps, at the same
            # learning rate (the others send zeros, so the maximum is rank 0's).
            flag = torch.tensor([stop, done] if rank == 0 else [0.0, 0.0], device=device)
            stop, done = _all_reduce(flag, "max").tolist()
            if stop > 0:
                break
            lr = config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
            if config.lr_schedule == "linear":
                lr *= max(0.0, 1.0 - done)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_start = time.perf_counter()
            indices = _global_batch(windows, step, config.batch_size, config.seed)
            mine = windows[indices[rank * per_rank : (rank + 1) * per_rank]].to(device)
            sums = torch.zeros(3, device=device, dtype=torch.float64)
            for micro, ids in enumerate(mine.split(config.micro_batch_size)):
                with torch.no_grad(), autocast():
                    t_out = teacher(ids, output_hidden_states=want_hidden, use_cache=False)
                last = micro == accumulation - 1
                sync = model.no_sync() if world > 1 and not last else contextlib.nullcontext()
                with sync:
                    with autocast():
                        s_out = model(ids, output_hidden_states=want_hidden, use_cache=False)
                        kl = kl_loss(s_out.logits, t_out.logits, config.temperature)
                        loss = kl
                        mse = torch.zeros((), device=device)
                        if want_hidden:
                            mse = squarehead_loss(s_out.hidden_states, t_out.hidden_states)
                            loss = loss + config.hidden_weight * mse
                        if config.ce_weight > 0:
                            ce = F.cross_entropy(
                                s_out.logits[:, :-1].reshape(-1, s_out.logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
                            )
                            loss = loss + config.ce_weight * ce
                    # Backward outside autocast, as torch recommends: it runs each op in its forward's dtype.
                    (loss / accumulation).backward()
                sums += torch.stack([loss.detach(), kl.detach(), mse.detach()]).double()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name in names:
                    layers[name].weight.mul_(layers[name].mask)
            sums = _all_reduce(sums) / (accumulation * world)
            loss_v, kl_v, mse_v = sums.tolist()
            history["losses"].append(loss_v)
            history["kl"].append(kl_v)
            history["hidden_mse"].append(mse_v)
            history["lrs"].append(lr)
            step += 1
            step_seconds.append(time.perf_counter() - step_start)
            run_s = time.perf_counter() - started
            bar.update()
            bar.set_postfix(loss=f"{loss_v:.4f}", tok_s=f"{(step - start_step) * tokens_per_step / run_s:.0f}")
            now = time.perf_counter()
            if step % config.checkpoint_every == 0 or now - last_checkpoint >= 60 * config.checkpoint_minutes:
                save(step)
                last_checkpoint = now
    seconds = time.perf_counter() - started
    save(step)

    # Pack the trained weights back into the formats they came in.
    for name in names:
        _set_submodule(student, name, _repack(layers[name], specs[name]))
    if isinstance(model, nn.parallel.DistributedDataParallel):
        del model
    plot = None
    if rank == 0:
        target = config.loss_plot or (str(Path(config.checkpoint_dir) / "loss.png") if config.checkpoint_dir else None)
        if target and history["losses"]:
            plot = plot_losses(history["losses"], target)
    steps_run = step - start_step
    return DistillResult(
        steps=step,
        tokens=step * tokens_per_step,
        seconds=seconds,
        tokens_per_s=steps_run * tokens_per_step / seconds if seconds > 0 else 0.0,
        world_size=world,
        stopped_by=stopped_by,
        quantization=config.quantization,
        trainable_parameters=sum(int(layers[n].mask.sum()) for n in names),
        layers=len(names),
        losses=history["losses"],
        kl=history["kl"],
        hidden_mse=history["hidden_mse"],
        lrs=history["lrs"],
        step_seconds=step_seconds,
        resumed_from=start_step,
        loss_plot=str(plot) if plot else None,
    )


# ------------------------------------------------------------------------------------------------- evaluation
def perplexities(
    models: dict[str, nn.Module],
    texts: dict[str, Tensor],
    window: int = 512,
    progress: bool | None = None,
    stride: int | None = None,
) -> dict[str, dict[str, float]]:
    """Sliding-window perplexity (:func:`fastquant.app.evaluate.perplexity`, stride ``window // 2`` unless given) of
    each model on each token sequence: ``{model: {text: ppl}}``, e.g. teacher / pruned / distilled on held-out and
    training text side by side."""
    from fastquant.app.evaluate import perplexity, perplexity_steps

    out: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        out[name] = {}
        for label, ids in texts.items():
            w = min(window, ids.numel())
            s = min(stride or w // 2, w)
            steps = perplexity_steps(ids.numel(), w, s)
            with progress_bar(total=steps, desc=f"perplexity {name} / {label}", leave=False, progress=progress) as b:
                out[name][label] = perplexity(model, ids, window=w, stride=s, progress=b.update)
    return out


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
