"""Weight pruning: magnitude, global magnitude, Wanda and SparseGPT, unstructured or N:M, optionally with int8.

Every algorithm works on (out_features, in_features) weights (transformers Conv1D layers are handled through
their transposed view) and runs on the weights' device. Wanda and SparseGPT need calibration inputs and
calibrate *sequentially*: each group of layers that reads the same tensor (q/k/v, gate/up) is calibrated on the
activations of the model whose earlier layers are already pruned, so later layers compensate for earlier ones.

Entry point: :func:`prune_layers` (used by ``fastquant.patch`` for the sparse methods). Layer-level building
blocks (:func:`magnitude_mask`, :func:`wanda_mask`, :func:`sparsegpt_prune`, :func:`refit_kept_weights`,
:func:`global_magnitude_masks`) take plain tensors, so they can be used and tested without a model.

Masks are boolean with True = kept.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastquant.algorithms.grids import ColumnRounder, Grid, Int4Grid, Int8Grid, PermutedRounder
from fastquant.choices import CALIBRATED_METHODS, DEFAULT_CALIBRATION_SEQUENCES, PRUNING_METHODS
from fastquant.configs import SUPPORTED_GROUP_SIZES
from fastquant.modules import is_quantizable_linear, linear_weight
from fastquant.progress import progress_bar

PATTERNS_HELP = "'unstructured' or 'N:M' (keep N of every M consecutive input columns, e.g. '2:4', '4:8')"
CALIBRATION_FORM = (
    "an iterable of model inputs: LongTensors of token ids of shape (batch, seq), each called as model(ids), "
    "or dicts of keyword arguments, each called as model(**d) (an 'attention_mask' there excludes padding); "
    "fastquant.pruning.calibration_from_text builds one from text"
)

# SparseGPT's standard knobs (Frantar & Alistarh 2023): columns processed per lazy-update block, and the
# Hessian dampening as a fraction of its mean diagonal.
SPARSEGPT_BLOCK_SIZE = 128
SPARSEGPT_DAMP = 0.01
# After SparseGPT has chosen the mask, the kept weights are re-solved by least squares (refit_kept_weights):
# SparseGPT's one left-to-right pass never revisits a column, so its weights are not the optimum for its own
# mask. Preconditioned CG reaches that optimum to 3 digits of the layer error in ~25 iterations on SmolLM2's
# layers; 0 turns the refit off.
REFIT_ITERATIONS = 25
# Transformers decoders (the block-by-block path): SparseGPT fits each layer to the *dense* model's output
# on the dense model's inputs, min ||W' X_pruned - W X_dense||, rather than to its own weight on the pruned
# model's inputs, so every layer also corrects the error that the layers before it let through. The
# objective equals SparseGPT's for the weight W (X_d^T X_p)(X_p^T X_p)^-1, so SparseGPT and the refit run
# unchanged on that weight. Costs a second (dense) stream of block runs during calibration.
DENSE_TARGET = True
# Wanda and SparseGPT calibrate a decoder block by block, each block's outputs feeding the next (_calibrate_blocks);
# False runs the whole model per group of layers instead (_calibrate_groups), the generic path the tests compare
# the block path with.
DECODER_FAST_PATH = True

CALIBRATION_TEXT = "hamlet.txt"


@dataclass
class PrunedLayer:
    """What pruning did to one layer: ``mask`` (N, K) bool, True where a weight is kept; with int8, the int8
    codes (zero wherever the mask is False) and fp32 scales, (N,) per-channel or (N, ceil(K/G)) per group; with
    int4 (a :class:`~fastquant.algorithms.grids.Int4Grid`), uint8 (N, K) codes 0..15, fp16 scales and offsets (or None).

    ``weight_error``: ||W' - W||_F / ||W||_F of the new weight against the layer's float weight;
    ``output_error``: the same for the layer's output on its calibration inputs, ||(W' - W) X^T|| / ||W X^T||
    (calibrated methods only)."""

    mask: Tensor
    qweight: Tensor | None = None
    scales: Tensor | None = None
    offsets: Tensor | None = None
    weight_error: float | None = None
    output_error: float | None = None


# ------------------------------------------------------------------------------------------ arguments
def parse_pattern(pattern: str, sparsity: float | None) -> tuple[int, int] | None:
    """None for unstructured, else (N, M). Checks that ``sparsity`` agrees with the pattern."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be {PATTERNS_HELP}, got {pattern!r}")
    if pattern == "unstructured":
        check_sparsity(sparsity)
        return None
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"unknown pattern {pattern!r}: expected {PATTERNS_HELP}")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M (N weights kept of every M)")
    implied = 1 - n / m
    if sparsity is not None:
        check_sparsity(sparsity)
        if not math.isclose(sparsity, implied, rel_tol=0, abs_tol=1e-6):
            raise ValueError(
                f"pattern {pattern!r} implies sparsity {implied:g}, but sparsity={sparsity!r} was given "
                "(pass sparsity=None or the implied value)"
            )
    return n, m


def check_sparsity(sparsity: float | None) -> float:
    if sparsity is None:
        raise ValueError("sparsity is required for the 'unstructured' pattern: a fraction in [0, 1)")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if math.isnan(sparsity) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _check_nm_shape(k: int, nm: tuple[int, int] | None, name: str) -> None:
    if nm is not None and k % nm[1] != 0:
        raise ValueError(
            f"layer {name!r}: in_features K={k} is not divisible by M={nm[1]} of the {nm[0]}:{nm[1]} pattern"
        )


# ---------------------------------------------------------------------------------------- layer level
def _mask_from_scores(scores: Tensor, sparsity: float | None, nm: tuple[int, int] | None, per_row: bool) -> Tensor:
    """Keep-mask pruning the lowest scores: exactly round(sparsity * count) of the layer (or of each row), or
    M - N of every group of M consecutive columns."""
    n_rows, k = scores.shape
    mask = torch.ones(n_rows, k, dtype=torch.bool, device=scores.device)
    if nm is not None:
        n, m = nm
        groups = scores.reshape(n_rows, k // m, m)
        drop = torch.topk(groups, m - n, dim=2, largest=False).indices
        mask.view(n_rows, k // m, m).scatter_(2, drop, False)
        return mask
    if per_row:
        n_drop = round(sparsity * k)
        if n_drop > 0:
            mask.scatter_(1, torch.topk(scores, n_drop, dim=1, largest=False).indices, False)
        return mask
    n_drop = round(sparsity * n_rows * k)
    if n_drop > 0:
        mask.view(-1)[torch.topk(scores.reshape(-1), n_drop, largest=False).indices] = False
    return mask


def magnitude_mask(weight: Tensor, sparsity: float | None, pattern: str = "unstructured") -> Tensor:
    """Prune the smallest |w|: round(sparsity * N * K) of the layer, or M - N of every M for 'N:M'."""
    nm = parse_pattern(pattern, sparsity)
    _check_nm_shape(weight.shape[1], nm, "weight")
    return _mask_from_scores(weight.detach().float().abs(), sparsity, nm, per_row=False)


def wanda_mask(weight: Tensor, input_norm: Tensor, sparsity: float | None, pattern: str = "unstructured") -> Tensor:
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, pruned per output row (round(sparsity * K) each) or
    per N:M group. ``input_norm`` (K,) is the L2 norm of each input feature over the calibration tokens."""
    nm = parse_pattern(pattern, sparsity)
    _check_nm_shape(weight.shape[1], nm, "weight")
    if input_norm.shape != (weight.shape[1],):
        raise ValueError(f"input_norm must have shape ({weight.shape[1]},), got {tuple(input_norm.shape)}")
    scores = weight.detach().float().abs() * input_norm.float().to(weight.device)[None, :]
    return _mask_from_scores(scores, sparsity, nm, per_row=True)


def global_magnitude_masks(weights: list[Tensor], sparsity: float) -> list[Tensor]:
    """One |w| threshold across all weights (like torch.nn.utils.prune.global_unstructured): exactly
    round(sparsity * total) weights pruned; ties at the threshold are broken by layer order, then position."""
    sparsity = check_sparsity(sparsity)
    masks = [torch.ones(w.shape, dtype=torch.bool, device=w.device) for w in weights]
    total = sum(w.numel() for w in weights)
    n_drop = round(sparsity * total)
    if n_drop == 0:
        return masks
    device = weights[0].device
    flat = torch.cat([w.detach().float().abs().reshape(-1).to(device) for w in weights])
    threshold = torch.kthvalue(flat, n_drop).values
    del flat
    remaining_ties = n_drop - sum(int((w.detach().float().abs() < threshold).sum()) for w in weights)
    for w, mask in zip(weights, masks, strict=True):
        a = w.detach().float().abs()
        mask &= ~(a < threshold.to(a.device))
        if remaining_ties > 0:
            tied = (a == threshold.to(a.device)).reshape(-1).nonzero().squeeze(1)[:remaining_ties]
            mask.view(-1)[tied] = False
            remaining_ties -= tied.numel()
    return masks


def _cholesky_inverse_upper(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, SparseGPT's precomputed inverse rows."""
    h = hessian.clone()
    h.diagonal().add_(damp * torch.mean(torch.diagonal(h)))
    factor, info = torch.linalg.cholesky_ex(h)
    boost = damp
    # fp32 round-off on a nearly singular X^T X (few tokens, collinear features) can leave it indefinite;
    # more dampening is the standard remedy and only makes the update more conservative.
    while int(info) != 0 and boost < 1e3:
        boost *= 10
        h = hessian.clone()
        h.diagonal().add_(boost * torch.mean(torch.diagonal(h)))
        factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError("the calibration Hessian is not positive definite even with heavy dampening")
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float | None,
    pattern: str = "unstructured",
    *,
    block_size: int = SPARSEGPT_BLOCK_SIZE,
    damp: float = SPARSEGPT_DAMP,
    scales: Tensor | None = None,
    group_size: int = -1,
    keep: Tensor | None = None,
    rounder: ColumnRounder | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """SparseGPT (Frantar & Alistarh 2023) on one layer: returns (new fp32 weight, keep mask, int8 codes or None).

    ``hessian`` is 2 X^T X over the calibration tokens (any positive multiple gives the same result). Columns
    are processed in blocks of ``block_size``; unstructured masks are chosen per block by w^2 / [H^-1]_jj^2 on
    the already-compensated weights (round(sparsity * N * K) in total, spread over the blocks by cumulative
    rounding), N:M masks per group of M; each column's pruning error is spread over the columns to its right.
    With ``scales`` (fp32 (N,) or (N, ceil(K/G)), the int8 grid), each column is also rounded to the grid
    inside the loop and its rounding error compensated the same way (joint sparsify + quantize). With
    ``keep`` ((N, K) bool), that mask is used instead of choosing one (quantization of an already pruned
    and refitted weight). Any other grid (int4) comes as a ``rounder`` (see :mod:`fastquant.algorithms.grids`); the
    third value returned is then its codes, and ``rounder.result()`` holds its scales.
    """
    nm = parse_pattern(pattern, sparsity)
    n_rows, k = weight.shape
    _check_nm_shape(k, nm, "weight")
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must have shape ({k}, {k}), got {tuple(hessian.shape)}")
    if keep is not None and keep.shape != weight.shape:
        raise ValueError(f"keep must have the weight's shape {tuple(weight.shape)}, got {tuple(keep.shape)}")
    # The loop walks the input columns one at a time and updates all columns to the right: on the transposed
    # weight (K, N) each column is a contiguous row and every update is a contiguous rank-1 BLAS call (a
    # strided (N, K) view made each update ~30x slower on CPU).
    wt = weight.detach().float().t().contiguous()
    h = hessian.detach().float().to(wt.device).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    wt[dead, :] = 0  # an input that never fires carries no information: zero its weights, prune them first
    hinv = _cholesky_inverse_upper(h, damp)
    del h

    if scales is not None:
        if rounder is not None:
            raise ValueError("pass scales (the int8 grid) or a rounder, not both")
        rounder = Int8Grid(group_size).rounder(weight, scales.float().to(wt.device))
    if nm is not None:
        block_size = max(nm[1], block_size // nm[1] * nm[1])  # an N:M group never straddles two blocks
    group = rounder.group_size if rounder is not None else 0
    if group > 0:
        if nm is not None:
            raise ValueError("a grid whose groups are fixed inside the loop cannot be combined with an N:M pattern")
        # A group's grid is fixed from its columns' current values: those are up to date only inside the block.
        block_size = max(group, block_size // group * group)
    pruned = torch.zeros(k, n_rows, dtype=torch.bool, device=wt.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        count = i2 - i1
        w1 = wt[i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(hinv1)
        mask1 = torch.zeros(count, n_rows, dtype=torch.bool, device=wt.device)
        if keep is not None:
            mask1 = ~keep[:, i1:i2].t().to(wt.device)
        elif nm is None:
            n_drop = min(round(sparsity * n_rows * i2) - round(sparsity * n_rows * i1), n_rows * count)
            if n_drop > 0:
                score = (w1 / d1[:, None]) ** 2
                mask1.view(-1)[torch.topk(score.reshape(-1), n_drop, largest=False).indices] = True
        for i in range(count):
            if keep is None and nm is not None and i % nm[1] == 0:
                m = nm[1]
                score = (w1[i : i + m] / d1[i : i + m, None]) ** 2
                mask1.scatter_(0, i + torch.topk(score, m - nm[0], dim=0, largest=False).indices, True)
            if group > 0 and (i1 + i) % group == 0:
                rounder.start_group(i1 + i, w1[i : i + group])
            w = w1[i]
            q = w.masked_fill(mask1[i], 0)
            if rounder is not None:
                q = rounder.round(i1 + i, q)
            q1[i] = q
            err = (w - q) / hinv1[i, i]
            w1[i:].addr_(hinv1[i, i:], err, alpha=-1)
            err1[i] = err
        wt[i1:i2] = q1
        pruned[i1:i2] = mask1
        wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1)
    return wt.t().contiguous(), ~pruned.t(), None if rounder is None else rounder.result().codes


def dense_target_weight(weight: Tensor, hessian: Tensor, cross: Tensor, damp: float = SPARSEGPT_DAMP) -> Tensor:
    """The weight whose SparseGPT objective on the pruned model's inputs X_p equals the error against the dense
    model's output: (W' - W_t) H (W' - W_t)^T = ||W' X_p - W X_d||^2 + const, with H = X_p^T X_p and
    ``cross`` = X_d^T X_p. Dampened like SparseGPT (+ damp * mean(diag H) on both sides), so the answer falls
    back to ``weight`` along directions the calibration tokens do not excite: W_t = W (C + d I)(H + d I)^-1.
    """
    k = weight.shape[1]
    if hessian.shape != (k, k) or cross.shape != (k, k):
        raise ValueError(
            f"hessian and cross must have shape ({k}, {k}), got {tuple(hessian.shape)}, {tuple(cross.shape)}"
        )
    h = hessian.detach().float().clone()
    d = damp * float(torch.diagonal(h).mean())
    if d <= 0:
        return weight.detach().float()
    h.diagonal().add_(d)
    c = cross.detach().float().clone()
    c.diagonal().add_(d)
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return weight.detach().float()
    # W_t^T = (H + dI)^-1 (C + dI)^T W^T, H symmetric
    return torch.cholesky_solve(c.T @ weight.detach().float().T, factor).T.contiguous()


def refit_kept_weights(
    weight: Tensor,
    start: Tensor,
    keep: Tensor,
    hessian: Tensor,
    *,
    damp: float = SPARSEGPT_DAMP,
    iterations: int = REFIT_ITERATIONS,
) -> Tensor:
    """The kept weights that best reproduce the dense layer on the calibration inputs, for a fixed mask.

    Minimises SparseGPT's objective tr((W' - W) H (W' - W)^T) over W' with W' = 0 where ``keep`` is False
    (H = X^T X up to a positive factor, dampened as SparseGPT does: + damp * mean(diag H) I, which pulls
    weights the data says little about towards their dense value, not towards zero), i.e. for each row the
    system H_SS w'_S = (H w)_S on its kept set S. Solved by Jacobi-preconditioned conjugate gradient, all rows
    at once (one (N, K) x (K, K) product per iteration), from ``start`` (SparseGPT's answer, already close).
    A row that keeps everything gets its dense weight back.
    """
    if weight.shape != start.shape or weight.shape != keep.shape:
        raise ValueError(
            f"weight, start and keep must have one shape, got {tuple(weight.shape)}, {tuple(start.shape)}, "
            f"{tuple(keep.shape)}"
        )
    k = weight.shape[1]
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must have shape ({k}, {k}), got {tuple(hessian.shape)}")
    hd = hessian.detach().float().to(weight.device).clone()
    mean_diag = float(torch.diagonal(hd).mean())
    if bool(keep.all()):
        return weight.detach().float()
    if iterations <= 0 or mean_diag <= 0:
        return start.detach().float().masked_fill(~keep, 0)
    w = weight.detach().float()
    kept = keep.float()
    hd.diagonal().add_(damp * mean_diag)
    precond = torch.diagonal(hd).reciprocal()[None, :]
    x = start.detach().float() * kept
    residual = ((w - x) @ hd) * kept
    z = residual * precond
    direction = z.clone()
    rz = (residual * z).sum(1, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(iterations):
        hp = (direction @ hd) * kept
        # Rows that have converged (or keep nothing) have a zero direction: clamp so they divide by tiny, not 0.
        alpha = rz / (direction * hp).sum(1, keepdim=True).clamp_min(tiny)
        x.addcmul_(alpha, direction)
        residual.addcmul_(alpha, hp, value=-1)
        z = residual * precond
        rz_next = (residual * z).sum(1, keepdim=True)
        direction = z + (rz_next / rz.clamp_min(tiny)) * direction
        rz = rz_next
    return x


# ------------------------------------------------------------------------------------ model level
class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the layers of interest have run."""


@dataclass
class _Item:
    args: tuple
    kwargs: dict[str, Any]
    token_mask: Tensor | None  # (batch, seq) bool: tokens that count in the statistics


def _calibration_items(calibration: Iterable, device: torch.device, method: str) -> list[_Item]:
    if calibration is None:
        raise ValueError(f"calibration data is required for {method!r}: {CALIBRATION_FORM}")
    if isinstance(calibration, (Tensor, Mapping)):
        calibration = [calibration]
    items = []
    for i, item in enumerate(calibration):
        if isinstance(item, Tensor):
            items.append(_Item((item.to(device),), {}, None))
        elif isinstance(item, Mapping):
            kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in item.items()}
            mask = kwargs.get("attention_mask")
            items.append(_Item((), kwargs, mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None))
        else:
            raise ValueError(f"calibration item {i} is a {type(item).__name__}; expected {CALIBRATION_FORM}")
    if not items:
        raise ValueError(f"calibration data for {method!r} is empty; expected {CALIBRATION_FORM}")
    return items


def _tokens(x: Tensor, token_mask: Tensor | None) -> Tensor:
    """The layer input as (tokens, K) fp32, without padding tokens when the item has an attention mask."""
    if token_mask is not None and x.shape[:-1] == token_mask.shape:
        x = x[token_mask]
    return x.reshape(-1, x.shape[-1]).float()


class _Stats:
    """Statistics of one group's shared input: X^T X for SparseGPT, per-feature sum of squares for Wanda;
    with ``dense_target``, also X_dense^T X (the same tokens' input in the dense model)."""

    def __init__(self, k: int, device: torch.device, method: str, dense_target: bool = False) -> None:
        self.method = method
        self.tokens = 0
        self.cross = None
        if method == "sparsegpt":
            self.xtx = torch.zeros(k, k, dtype=torch.float32, device=device)
            if dense_target:
                self.cross = torch.zeros(k, k, dtype=torch.float32, device=device)
        else:
            self.sumsq = torch.zeros(k, dtype=torch.float32, device=device)

    def add(self, x: Tensor, x_dense: Tensor | None = None) -> None:
        x = x.to(self.xtx.device if self.method == "sparsegpt" else self.sumsq.device)
        self.tokens += x.shape[0]
        if self.method == "sparsegpt":
            self.xtx.addmm_(x.T, x)
            if self.cross is not None:
                self.cross.addmm_(x_dense.to(x.device).T, x)
        else:
            self.sumsq.add_((x * x).sum(0))


def _layer_input(args: tuple, kwargs: dict[str, Any]) -> Tensor:
    if args:
        return args[0]
    return next(v for v in kwargs.values() if isinstance(v, Tensor))


def _execution_groups(
    run: Callable[[_Item], Any], item: _Item, layers: dict[str, nn.Module]
) -> tuple[list[list[str]], list[str]]:
    """Run once, recording the order in which the layers first run; consecutive layers that receive the very
    same input tensor form a group (they share calibration statistics). Also returns the layers never run."""
    order: list[str] = []
    inputs: list[Tensor] = []
    handles = []

    def make_hook(name: str):
        def hook(module, args, kwargs):
            if name not in order:
                order.append(name)
                inputs.append(_layer_input(args, kwargs))
                if len(order) == len(layers):
                    raise _StopForward

        return hook

    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(make_hook(name), with_kwargs=True))
        with contextlib.suppress(_StopForward):
            run(item)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for i, name in enumerate(order):
        prev = inputs[i - 1] if i else None
        x = inputs[i]
        same = prev is not None and (
            x is prev or (x.data_ptr() == prev.data_ptr() and x.shape == prev.shape and x.stride() == prev.stride())
        )
        if same:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups, [name for name in layers if name not in order]


@dataclass
class _DenseStream:
    """The dense model's side of a block for dense-target calibration: a run over its own cached inputs,
    and the dense copy of each layer (by the pruned layer's name)."""

    run: Callable[[_Item], Any]
    items: list[_Item]
    layers: dict[str, nn.Module]


def _layer_inputs(run: Callable[[_Item], Any], item: _Item, last: nn.Module) -> Tensor:
    """Run ``item`` until ``last`` is about to run; its input as (tokens, K) fp32."""
    seen: list[Tensor] = []

    def hook(module, args, kwargs):
        seen.append(_tokens(_layer_input(args, kwargs), item.token_mask))
        raise _StopForward

    handle = last.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with contextlib.suppress(_StopForward):
            run(item)
    finally:
        handle.remove()
    return seen[0]


def _collect(
    run: Callable[[_Item], Any],
    items: list[_Item],
    last: nn.Module,
    stats: _Stats,
    dense: tuple[_DenseStream, nn.Module] | None = None,
) -> None:
    """Run every item until ``last`` is about to run, accumulating its input (and, with ``dense``, the dense
    model's input to the same layer on the same tokens)."""
    for i, item in enumerate(items):
        x = _layer_inputs(run, item, last)
        stats.add(x, None if dense is None else _layer_inputs(dense[0].run, dense[0].items[i], dense[1]))


def _weight_view(layer: nn.Module) -> Tensor:
    return linear_weight(layer).detach()


def _write_weight(layer: nn.Module, new: Tensor) -> None:
    view = _weight_view(layer)
    with torch.no_grad():
        view.copy_(new.to(device=view.device, dtype=view.dtype))


def relative_error(new: Tensor, old: Tensor) -> float:
    """||new - old||_F / ||old||_F (0 when both are zero)."""
    old = old.detach().float()
    norm = float(torch.linalg.vector_norm(old))
    diff = float(torch.linalg.vector_norm(new.detach().float().to(old.device) - old))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def relative_output_error(new: Tensor, old: Tensor, hessian: Tensor) -> float:
    """||(new - old) X^T||_F / ||old X^T||_F for inputs X with X^T X proportional to ``hessian``: the layer's
    relative output error on its calibration tokens, from the statistics GPTQ has anyway (one N x K x K product)."""
    old = old.detach().float()
    h = hessian.detach().float().to(old.device)
    delta = new.detach().float().to(old.device) - old
    num = float(((delta @ h) * delta).sum().clamp_min(0))
    den = float(((old @ h) * old).sum().clamp_min(0))
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def _finish(layer: nn.Module, weight: Tensor, mask: Tensor, grid: Grid | None) -> PrunedLayer:
    """Zero the pruned weights, quantize if asked (round to nearest), and write the layer's float weight back in
    place (when quantized, the dequantized weight, so later calibration sees what the quantized layer computes)."""
    original = weight  # may be a view of the layer's weight: errors are measured before writing it
    weight = weight.masked_fill(~mask, 0)
    if grid is None:
        error = relative_error(weight, original)
        _write_weight(layer, weight)
        return PrunedLayer(mask, weight_error=error)
    q = grid.rtn(weight)
    new = grid.dequantize(q)
    error = relative_error(new, original)
    _write_weight(layer, new)
    return PrunedLayer(mask, q.codes, q.scales, q.offsets, weight_error=error)


def _prune_one(
    name: str,
    layer: nn.Module,
    stats: _Stats | None,
    *,
    sparsity: float | None,
    pattern: str,
    pruning: str,
    grid: Grid | None,
    act_order: bool = False,
) -> PrunedLayer:
    weight = _weight_view(layer)
    if pruning == "magnitude":
        return _finish(layer, weight.float(), magnitude_mask(weight, sparsity, pattern), grid)
    if stats is None or stats.tokens == 0:
        raise ValueError(f"layer {name!r} saw no calibration tokens")
    if pruning == "wanda":
        norm = stats.sumsq.sqrt()
        return _finish(layer, weight.float(), wanda_mask(weight, norm, sparsity, pattern), grid)
    # The module-level knobs are read at call time so that a caller (the accuracy benchmark) can tune them.
    hessian = stats.xtx * (2 / stats.tokens)
    original = weight.float().clone()  # the layer's own weight is overwritten below

    def errors(new: Tensor) -> dict[str, float]:
        return {
            "weight_error": relative_error(new, original),
            "output_error": relative_output_error(new, original, hessian),
        }

    if stats.cross is not None:
        weight = dense_target_weight(weight, hessian, stats.cross * (2 / stats.tokens), SPARSEGPT_DAMP)
    knobs = {"block_size": SPARSEGPT_BLOCK_SIZE, "damp": SPARSEGPT_DAMP}
    new, mask, _ = sparsegpt_prune(weight, hessian, sparsity, pattern, **knobs)
    new = refit_kept_weights(weight, new, mask, hessian, damp=SPARSEGPT_DAMP, iterations=REFIT_ITERATIONS)
    if grid is None:
        _write_weight(layer, new)
        return PrunedLayer(mask, **errors(new))
    # The int8 grid comes from the pruned, refitted weights (they may outgrow the original range); SparseGPT's
    # column loop then rounds them with the mask fixed, compensating each column's rounding error. The int4
    # grid fixes each group's scale inside the loop (see fastquant.algorithms.grids), the same loop otherwise.
    rounder = grid.rounder(new)
    if act_order:
        new = _gptq_act_order(new, hessian, mask, rounder, knobs)
    else:
        new, _, _ = sparsegpt_prune(new, hessian, sparsity, pattern, keep=mask, rounder=rounder, **knobs)
    q = rounder.result()
    _write_weight(layer, new)
    return PrunedLayer(mask, q.codes, q.scales, q.offsets, **errors(new))


def _gptq_act_order(
    weight: Tensor, hessian: Tensor, keep: Tensor, rounder: ColumnRounder, knobs: dict[str, Any]
) -> Tensor:
    """GPTQ's rounding loop in activation order (descending Hessian diagonal, as GPTQ's ``act_order`` /
    AutoGPTQ's ``desc_act``): the inputs with the most energy are rounded first, while many columns are left to
    absorb their error, and the small ones last. Every group's grid is fixed from the weight before the loop
    ("static groups"), so the codes and scales keep the weight's own column order and the kernels need no
    permutation at run time. Returns the new weight, in the original order."""
    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    rounder.fix_groups(weight.t())
    permuted = PermutedRounder(rounder, perm)
    # The mask is fixed (keep): whatever pattern chose it, the loop only has to keep its zeros.
    new, _, _ = sparsegpt_prune(
        weight[:, perm], hessian[perm][:, perm], 0.0, "unstructured", keep=keep[:, perm], rounder=permuted, **knobs
    )
    return new[:, torch.argsort(perm)]


def _decoder_blocks(model: nn.Module, layers: dict[str, nn.Module]) -> nn.ModuleList | None:
    """``model.model.layers`` of a transformers decoder, if every selected layer sits inside one of them."""
    inner = getattr(model, "model", None)
    blocks = getattr(inner, "layers", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return None
    inside = {id(m) for block in blocks for m in block.modules()}
    return blocks if all(id(layer) in inside for layer in layers.values()) else None


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _run_model(model: nn.Module) -> Callable[[_Item], Any]:
    return lambda item: model(*item.args, **item.kwargs)


def _calibrate_groups(
    run: Callable[[_Item], Any],
    items: list[_Item],
    layers: dict[str, nn.Module],
    bar: tqdm,
    prune: Callable[[str, nn.Module, _Stats], PrunedLayer],
    method: str,
    dense: _DenseStream | None = None,
) -> dict[str, PrunedLayer]:
    groups, missing = _execution_groups(run, items[0], layers)
    if missing:
        raise ValueError(f"layers never ran on the calibration inputs, so they cannot be calibrated: {missing}")
    results = {}
    for group in groups:
        last = layers[group[-1]]
        k = _weight_view(last).shape[1]
        stats = _Stats(k, _weight_view(last).device, method, dense_target=dense is not None)
        _collect(run, items, last, stats, None if dense is None else (dense, dense.layers[group[-1]]))
        for name in group:
            results[name] = prune(name, layers[name], stats)
        del stats
        bar.update(len(group))
    return results


def _calibrate_blocks(
    model: nn.Module,
    blocks: nn.ModuleList,
    items: list[_Item],
    layers: dict[str, nn.Module],
    bar: tqdm,
    prune: Callable[[str, nn.Module, _Stats], PrunedLayer],
    method: str,
) -> dict[str, PrunedLayer]:
    """The transformers-decoder fast path: catch each item's inputs to the first block once, then calibrate
    block by block on cached hidden states, so each group costs a partial block run, not a model run."""
    cached: list[_Item] = []

    def catch(module, args, kwargs):
        # A KV cache would grow with every calibration run; the blocks never need one here.
        kwargs = {k: (None if type(v).__name__.endswith("Cache") else v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        cached.append(_Item(tuple(args), kwargs, current[0].token_mask))
        raise _StopForward

    current: list[_Item] = []
    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for item in items:
            current[:] = [item]
            with contextlib.suppress(_StopForward):
                model(*item.args, **{"use_cache": False, **item.kwargs})
    finally:
        handle.remove()

    def run_block(block: nn.Module) -> Callable[[_Item], Any]:
        return lambda item: block(*item.args, **item.kwargs)

    dense_cached = list(cached) if DENSE_TARGET and method == "sparsegpt" else None
    results: dict[str, PrunedLayer] = {}
    for block in blocks:
        relative = {id(m): name for name, m in block.named_modules()}
        block_layers = {name: layer for name, layer in layers.items() if id(layer) in relative}
        dense_block = block
        if block_layers:
            dense = None
            if dense_cached is not None:
                dense_block = copy.deepcopy(block)  # before any of its layers is pruned
                dense_layers = {
                    name: dense_block.get_submodule(relative[id(layer)]) for name, layer in block_layers.items()
                }
                dense = _DenseStream(run_block(dense_block), dense_cached, dense_layers)
            results.update(_calibrate_groups(run_block(block), cached, block_layers, bar, prune, method, dense))
        if len(results) == len(layers):
            break
        _advance(block, cached)
        if dense_cached is not None:
            _advance(dense_block, dense_cached)
    return results


def _advance(block: nn.Module, cached: list[_Item]) -> None:
    """Replace each cached block input by the block's output (the next block's input)."""
    for i, item in enumerate(cached):
        out = block(*item.args, **item.kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        if item.args:
            cached[i] = _Item((hidden, *item.args[1:]), item.kwargs, item.token_mask)
        else:
            key = next(k for k, v in item.kwargs.items() if isinstance(v, Tensor))
            cached[i] = _Item((), {**item.kwargs, key: hidden}, item.token_mask)


def prune_layers(
    model: nn.Module,
    layers: dict[str, nn.Module],
    *,
    sparsity: float | None,
    pattern: str,
    pruning: str,
    calibration: Iterable | None,
    int8: bool = False,
    group_size: int | None = None,
    progress: bool | None = None,
    label: str | None = None,
    grid: Grid | None = None,
    act_order: bool = False,
) -> dict[str, PrunedLayer]:
    """Prune ``layers`` (name -> nn.Linear or transformers Conv1D, all inside ``model``) in place.

    Args:
        sparsity: fraction of weights pruned, in [0, 1), for ``pattern="unstructured"``; for ``"N:M"`` None or
            1 - N/M.
        pattern: ``"unstructured"`` or ``"N:M"``: keep N of every M consecutive input columns of each row.
        pruning: ``"magnitude"`` (per layer), ``"global-magnitude"`` (one threshold over all the layers,
            unstructured), ``"wanda"`` or ``"sparsegpt"`` (both need ``calibration``).
        calibration: model inputs, see :data:`CALIBRATION_FORM`; ignored by the magnitude methods.
        int8: also quantize to int8 (SparseGPT jointly, compensating the rounding error; the others after
            pruning) with scales per output channel (``group_size`` None) or per group of 32..256.
        progress: a progress bar per layer: None on a terminal only, True always, False never.
        label: the bar's description (default ``"pruning (<method>)"``).
        grid: quantize onto this grid instead (:class:`~fastquant.algorithms.grids.Int8Grid` is what ``int8=True,
            group_size=...`` means; :class:`~fastquant.algorithms.grids.Int4Grid` for int4, with sparsity 0 only). With
            ``pruning="sparsegpt"`` and sparsity 0 this is GPTQ.
        act_order: SparseGPT/GPTQ only: round the columns in order of decreasing input energy, with every
            group's grid fixed before the loop (see :class:`~fastquant.configs.GPTQ`).

    Each layer's float weight is replaced: pruned (SparseGPT: and compensated; with int8: the dequantized
    int8 weight). Returns name -> :class:`PrunedLayer`.
    """
    if pruning not in PRUNING_METHODS:
        raise ValueError(f"unknown pruning {pruning!r}: expected one of {PRUNING_METHODS}")
    nm = parse_pattern(pattern, sparsity)
    if nm is not None and pruning == "global-magnitude":
        raise ValueError(
            "'global-magnitude' ranks weights across layers and is unstructured only; "
            f"for {pattern!r} use 'magnitude' (N:M groups are local to a row anyway)"
        )
    if int8 and group_size is not None and group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be None (per-channel) or one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    if int8 and grid is not None:
        raise ValueError("pass int8=True (with group_size) or a grid, not both")
    if int8:
        grid = Int8Grid(-1 if group_size is None else group_size)
    if isinstance(grid, Int4Grid) and (nm is not None or sparsity != 0):
        # Pruned weights must dequantize to exactly 0, which an asymmetric group cannot promise.
        raise ValueError("int4 quantization is not combined with pruning: use sparsity=0 (GPTQ or round to nearest)")

    unique: dict[str, nn.Module] = {}
    aliases: dict[str, str] = {}  # a module listed under several names is pruned once
    seen: dict[int, str] = {}
    for name, layer in layers.items():
        if not is_quantizable_linear(layer):
            raise ValueError(f"layer {name!r} is a {type(layer).__name__}; expected nn.Linear or transformers Conv1D")
        weight = _weight_view(layer)
        _check_nm_shape(weight.shape[1], nm, name)
        if not torch.isfinite(weight).all():
            bad = int((~torch.isfinite(weight)).sum())
            raise ValueError(f"layer {name!r}: weight of shape {tuple(weight.shape)} has {bad} NaN/inf values")
        if id(layer) in seen:
            aliases[name] = seen[id(layer)]
        else:
            seen[id(layer)] = name
            unique[name] = layer

    items = None
    if pruning in CALIBRATED_METHODS:
        items = _calibration_items(calibration, _model_device(model), pruning)

    def prune(name: str, layer: nn.Module, stats: _Stats | None) -> PrunedLayer:
        return _prune_one(
            name, layer, stats, sparsity=sparsity, pattern=pattern, pruning=pruning, grid=grid, act_order=act_order
        )

    results: dict[str, PrunedLayer] = {}
    with (
        torch.inference_mode(),
        progress_bar(total=len(unique), desc=label or f"pruning ({pruning})", progress=progress) as bar,
    ):
        if pruning == "global-magnitude":
            masks = global_magnitude_masks([_weight_view(layer) for layer in unique.values()], sparsity)
            for (name, layer), mask in zip(unique.items(), masks, strict=True):
                results[name] = _finish(layer, _weight_view(layer).float(), mask, grid)
                bar.update()
        elif pruning == "magnitude":
            for name, layer in unique.items():
                results[name] = prune(name, layer, None)
                bar.update()
        else:
            was_training = [(m, m.training) for m in model.modules()]
            model.eval()  # dropout off: the statistics must describe the deterministic model
            try:
                blocks = _decoder_blocks(model, unique) if DECODER_FAST_PATH else None
                if blocks is not None:
                    results = _calibrate_blocks(model, blocks, items, unique, bar, prune, pruning)
                else:
                    results = _calibrate_groups(_run_model(model), items, unique, bar, prune, pruning)
            finally:
                for m, training in was_training:
                    m.training = training
    for name, target in aliases.items():
        results[name] = results[target]
    return {name: results[name] for name in layers}


# ----------------------------------------------------------------------------------- model helpers
def prunable_layers(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> dict[str, nn.Module]:
    """The model's linear layers (nn.Linear, transformers Conv1D) except those named in ``skip`` (a full name
    or a name component) and those whose weight is tied to a non-linear module (an embedding)."""
    skip = tuple(skip)
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(param.data_ptr(), []).append(module)
    chosen = {}
    for name, module in model.named_modules():
        if not is_quantizable_linear(module):
            continue
        parts = name.split(".")
        if any(name == s or s in parts for s in skip):
            continue
        if any(not is_quantizable_linear(m) for m in owners.get(module.weight.data_ptr(), [])):
            continue
        chosen[name] = module
    return chosen


def calibration_text() -> str:
    """The embedded calibration text (the whole of Hamlet; the evaluation text is The Tempest)."""
    return resources.files("fastquant").joinpath("data", CALIBRATION_TEXT).read_text(encoding="utf-8")


def calibration_from_text(
    tokenizer,
    text: str | None = None,
    n_sequences: int = DEFAULT_CALIBRATION_SEQUENCES,
    seq_len: int = 256,
    batch_size: int = 8,
) -> list[Tensor]:
    """``n_sequences`` windows of ``seq_len`` tokens spread evenly over the text (the embedded Hamlet by
    default), as (batch, seq_len) LongTensors of up to ``batch_size`` rows, ready for :func:`prune_layers`."""
    ids = tokenizer(text if text is not None else calibration_text(), return_tensors="pt").input_ids[0]
    if ids.numel() < seq_len:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    if n_sequences < 1:
        raise ValueError(f"n_sequences must be >= 1, got {n_sequences}")
    last = ids.numel() - seq_len
    starts = [round(i * last / max(n_sequences - 1, 1)) for i in range(n_sequences)]
    windows = torch.stack([ids[s : s + seq_len] for s in starts])
    return list(windows.split(batch_size))
