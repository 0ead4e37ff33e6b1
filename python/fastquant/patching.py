"""fastquant.patch: swap compressed layers into a model in place, and report what was done."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastquant.algorithms import pruning as pruning_lib
from fastquant.algorithms.grids import Grid, Int4Grid, Int8Grid
from fastquant.choices import DEFAULT_PRUNING
from fastquant.configs import GPTQ, SPARSE_KERNELS, Int4, Int8, Method, Sparse
from fastquant.kernels import extension, ops
from fastquant.kernels.kernel_choice import MIN_TIMED_WEIGHTS, choose_kernel
from fastquant.modules import Int4Linear, Int8Linear, SparseLinear, is_quantizable_linear, linear_weight

METHODS = ("int8", "int4", "sparse", "int8+sparse")
COMPRESSED_LAYERS = (Int8Linear, Int4Linear, SparseLinear)

# Below this many weights the int8 kernel cannot beat the float one: the layer is a few KiB, sits in
# L1/L2 either way, and the per-call overhead dominates.
MIN_WEIGHT_ELEMENTS = 4096

# Magnitude pruning above this fraction ruins language models (SmolLM2-135M at 50%: 12.6x the float
# perplexity), so it warns there.
MAGNITUDE_WARN_SPARSITY = 0.3
MAGNITUDE_METHODS = ("magnitude", "global-magnitude")

FilterFn = Callable[[nn.Module, str], bool]


class AlreadyPatchedError(ValueError):
    """patch/prune was asked to compress layers that are compressed already."""


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    format: str
    bytes_before: int
    bytes_after: int
    kernel: str
    note: str = ""
    # ||W' - W||_F / ||W||_F against the float weight, and the same for the layer's output on its calibration
    # inputs (calibrated methods); None where unknown (float layers, layers loaded from a checkpoint).
    weight_error: float | None = None
    output_error: float | None = None


@dataclass
class Report:
    layers: list[LayerReport]

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    def to_markdown(self) -> str:
        lines = [
            "| layer | shape (out, in) | format | bytes before | bytes after | weight error | output error (calib.) "
            "| kernel (M=1 / M=512) | note |",
            "|---|---|---|---:|---:|---:|---:|---|---|",
        ]
        for r in self.layers:
            lines.append(
                f"| {r.name} | {r.shape[0]}x{r.shape[1]} | {r.format} | {r.bytes_before:,} | {r.bytes_after:,} "
                f"| {_percent(r.weight_error)} | {_percent(r.output_error)} | {r.kernel} | {r.note} |"
            )
        ratio = self.bytes_before / max(self.bytes_after, 1)
        lines.append(f"| **total** | | | {self.bytes_before:,} | {self.bytes_after:,} | | | | {ratio:.2f}x smaller |")
        lines.append(
            "\nweight error: ||W' - W||_F / ||W||_F of the stored weight against the float one; output error: the "
            "same for the layer's output on the calibration inputs (calibrated methods)."
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}%"


def _matches(name: str, patterns: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(name == p or p in parts or name.endswith("." + p) for p in patterns)


def _tensor_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """For each parameter storage, the modules that hold it (several when weights are tied)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(param.data_ptr(), []).append((name, module))
    return owners


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _select_layers(
    model: nn.Module,
    skip: Iterable[str],
    filter_fn: FilterFn | None,
    compress_tied: bool,
    notes: dict[str, str],
) -> list[tuple[str, nn.Module, list[str]]]:
    """The linear layers to compress, each with the non-linear modules (embeddings) sharing its weight.

    Every layer left alone gets its reason in ``notes``.
    """
    skip = tuple(skip)
    owners = _tensor_owners(model)
    chosen = []
    patched = []
    for name, module in model.named_modules(remove_duplicate=False):
        compressed = isinstance(module, COMPRESSED_LAYERS)
        if not is_quantizable_linear(module) and not compressed:
            continue
        if _matches(name, skip):
            notes[name] = "skipped by name"
            continue
        if filter_fn is not None and not filter_fn(module, name):
            notes[name] = "rejected by filter_fn"
            continue
        if compressed:
            patched.append(f"{name} ({module.format})")
            continue
        weight = linear_weight(module)
        if weight.numel() < MIN_WEIGHT_ELEMENTS:
            notes[name] = f"too small to gain ({weight.numel()} weights < {MIN_WEIGHT_ELEMENTS})"
            continue
        other_owners = [n for n, m in owners.get(module.weight.data_ptr(), []) if not is_quantizable_linear(m)]
        if other_owners and not compress_tied:
            notes[name] = f"weight tied to {', '.join(other_owners)}; pass quantize_tied=True to compress a copy"
            continue
        chosen.append((name, module, other_owners))
    if patched:
        # Compressing a compressed layer again would quantize or prune its already rounded weights: refuse
        # rather than skip, so a second patch never looks as if it had done something.
        raise AlreadyPatchedError(
            f"{len(patched)} layers are compressed already: {', '.join(patched[:3])}"
            f"{', ...' if len(patched) > 3 else ''}; patch a fresh float model, or leave these layers out "
            "with skip= or filter_fn="
        )
    return chosen


def is_language_model(model: nn.Module) -> bool:
    """A transformers causal or masked language model (by its architecture name)."""
    config = getattr(model, "config", None)
    names = [type(model).__name__, *(getattr(config, "architectures", None) or [])]
    return any(n.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration")) for n in names)


def _pruning_calibration(
    model: nn.Module, pruning: str, sparsity: float | None, pattern: str, calibration: Iterable | None, tokenizer
) -> Iterable | None:
    """Checks ``pruning`` and returns the calibration to prune with: ``calibration``, or, for a calibrated
    method given none, the embedded calibration text (see :func:`_embedded_calibration`). Warns (at the caller
    of patch/prune) when magnitude pruning is asked to go too far on a language model."""
    if pruning not in pruning_lib.PRUNING_METHODS:
        raise ValueError(f"unknown pruning {pruning!r}: expected one of {pruning_lib.PRUNING_METHODS}")
    if pruning in MAGNITUDE_METHODS and is_language_model(model):
        nm = pruning_lib.parse_pattern(pattern, sparsity)
        fraction = 1 - nm[0] / nm[1] if nm is not None else sparsity
        if fraction > MAGNITUDE_WARN_SPARSITY:
            warnings.warn(
                f"pruning={pruning!r} at {fraction:.0%} on a language model: magnitude pruning above "
                f"{MAGNITUDE_WARN_SPARSITY:.0%} usually ruins its output (SmolLM2-135M at 50%: 12.6x the float "
                f"perplexity); pruning={DEFAULT_PRUNING!r} (the default) calibrates on text",
                UserWarning,
                stacklevel=4,
            )
    if calibration is not None or pruning not in pruning_lib.CALIBRATED_METHODS:
        return calibration
    return _embedded_calibration(
        model,
        tokenizer,
        f"pruning={pruning!r}",
        f"{pruning_lib.CALIBRATION_FORM}), or tokenizer= to calibrate on the embedded text; pruning='magnitude' "
        "needs no data but is far less accurate",
    )


def _embedded_calibration(model: nn.Module, tokenizer, what: str, alternatives: str) -> Iterable:
    """The embedded calibration text tokenized by ``tokenizer`` (or the tokenizer saved with the model, found
    through its ``name_or_path``), with a warning at the caller of patch/prune."""
    if tokenizer is None:
        tokenizer = _saved_tokenizer(model)
    if tokenizer is None:
        raise ValueError(f"{what} calibrates on model inputs: pass calibration= ({alternatives}")
    warnings.warn(
        f"{what} without calibration: calibrating on {pruning_lib.DEFAULT_CALIBRATION_SEQUENCES} "
        "windows of 256 tokens of the embedded text (Hamlet); pass calibration= to use your own data",
        UserWarning,
        stacklevel=4,
    )
    return pruning_lib.calibration_from_text(tokenizer)


def method_config(
    method: str | Method,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    sparsity: float | None = 0.5,
    pattern: str = "unstructured",
    pruning: str = DEFAULT_PRUNING,
    calibration: Iterable | None = None,
    sparse_kernel: str = "auto",
) -> Method:
    """The typed config a method string and its keyword options stand for (a config passes through, and then
    the keyword options must keep their defaults)."""
    options = {
        "group_size": (group_size, None),
        "symmetric": (symmetric, True),
        "sparsity": (sparsity, 0.5),
        "pattern": (pattern, "unstructured"),
        "pruning": (pruning, DEFAULT_PRUNING),
        "calibration": (calibration, None),
        "sparse_kernel": (sparse_kernel, "auto"),
    }
    if isinstance(method, (Int8, Int4, Sparse)):
        given = [name for name, (value, default) in options.items() if value is not default and value != default]
        if given:
            raise TypeError(f"pass either a method config or keyword options, not both (got {', '.join(given)})")
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS} or a fastquant.Int8/Int4/Sparse config")
    if sparse_kernel not in SPARSE_KERNELS:
        raise ValueError(f"sparse_kernel must be one of {SPARSE_KERNELS}, got {sparse_kernel!r}")
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be True or False, got {symmetric!r}")
    if not symmetric and method != "int4":
        raise ValueError(f"symmetric=False applies to method='int4' only (int8 grids are symmetric), got {method!r}")
    if method == "int4":
        return Int4.from_method(group_size, symmetric, calibration)
    if method == "int8":
        return Int8.from_method(group_size, calibration)
    return Sparse.from_method(
        method,
        sparsity=sparsity,
        pattern=pattern,
        pruning=pruning,
        calibration=calibration,
        group_size=group_size,
        kernel=sparse_kernel,
    )


def _saved_tokenizer(model: nn.Module):
    """The tokenizer in the folder a transformers model was loaded from, or None."""
    folder = getattr(model, "name_or_path", None)
    if not folder:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except (ImportError, OSError, ValueError):  # no transformers, or no tokenizer files there
        return None


def _untie(module: nn.Module) -> None:
    """Give a linear layer its own copy of a weight it shares with an embedding, so pruning it in place
    leaves the embedding intact."""
    module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=module.weight.requires_grad)


def patch(
    model: nn.Module,
    method: str | Method = "int8",
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    sparsity: float | None = 0.5,
    pattern: str = "unstructured",
    pruning: str = DEFAULT_PRUNING,
    calibration: Iterable | None = None,
    tokenizer=None,
    skip: Iterable[str] = ("lm_head",),
    filter_fn: FilterFn | None = None,
    quantize_tied: bool = False,
    sparse_kernel: str = "auto",
    progress: bool | None = None,
) -> nn.Module:
    """Replace the model's linear layers with compressed ones, in place, and return the model.

    Args:
        method: a typed config (:class:`fastquant.Int8`, :class:`fastquant.Int4`, :class:`fastquant.Sparse`: the
            keyword options below then keep their defaults), or a string shortcut with keyword options:
            ``"int8"``: int8 weight-only, per-channel scales or per-group with ``group_size``; rounded to
            nearest, or, when ``calibration`` is given, by GPTQ (rounding errors compensated on the calibration
            inputs: slower to patch, closer to the float model).
            ``"int4"``: 4-bit weight-only, two codes per byte, an fp16 scale per group of ``group_size`` input
            columns (and an fp16 offset when not ``symmetric``); rounded to nearest, or by GPTQ with ``calibration``
            (each group's scale is fixed when GPTQ reaches the group). Half of int8's bytes; at group 32 the
            symmetric grid is llama.cpp's Q4_0, the asymmetric one Q4_1.
            ``"sparse"``: prune, then store the kept weights in the bitmap16 sparse format (float values).
            ``"int8+sparse"``: prune, then int8-quantize the kept weights (SparseGPT compensates the rounding).
        group_size: int8 methods: None for one scale per output channel, else one of 32, 64, 128, 256.
            ``"int4"``: one of 32 (the default), 64, 128, 256.
        symmetric: ``"int4"`` only: False adds a per-group offset (w = s q + o instead of s (q - 8)).
        sparsity: fraction of each layer's weights to remove, in [0, 1) (sparse methods; implied by an N:M
            ``pattern``, where it may be None).
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``: at most N kept of every M input columns).
        pruning: ``"sparsegpt"`` (the default), ``"wanda"`` (both calibrated), ``"magnitude"`` (per layer) or
            ``"global-magnitude"``; the magnitude methods warn above 30% on a language model.
        calibration: an iterable of model inputs (LongTensors of token ids, or dicts of keyword arguments)
            for ``"wanda"`` and ``"sparsegpt"``; layers are calibrated in order, each on the activations of
            the already-pruned layers before it. None: the sparse methods calibrate on 32 windows of 256
            tokens of the embedded text (Hamlet), tokenized with ``tokenizer``, and say so with a warning;
            ``"int8"`` and ``"int4"`` round to nearest.
        tokenizer: tokenizes the embedded calibration text when ``calibration`` is None (default: the
            tokenizer saved in the model's ``name_or_path`` folder, if any).
        skip: layer names (full qualified names or single name components) to leave in float.
        filter_fn: ``filter_fn(module, qualified_name) -> bool``; only layers it accepts are compressed.
        quantize_tied: a linear weight shared with an embedding is left in float unless this is True;
            then the linear layer gets its own compressed copy and the embedding keeps the float weight.
        sparse_kernel: ``"auto"``: per layer, the fastest of the sparse layouts and the dense kernel (below);
            ``"sparse"``: always the bitmap16 sparse format (smallest memory); ``"csr16"``: always the csr16
            layout (16-bit column per kept weight; in_features <= 65536); ``"dense"``: prune but keep dense
            weights.
        progress: progress bars while calibrating: None on a terminal only, True always, False never.

    Patching a layer that is compressed already raises :class:`AlreadyPatchedError` (leave it out with
    ``skip`` or ``filter_fn`` to patch the rest). Sparse layers keep the fastest of the sparse kernels
    (bitmap16, and csr16 for very sparse layers) and the dense kernel of the same numbers (float for
    ``"sparse"``, int8 for ``"int8+sparse"``), timed on this machine for the layer's shape at decode (one
    token); layers of fewer than 64K weights keep bitmap16 untimed. Pruned weights stay pruned either way.
    Layers left alone and kernel choices keep a reason, shown by :func:`fastquant.report`, with each layer's
    reconstruction error.
    """
    config = method_config(
        method,
        group_size=group_size,
        symmetric=symmetric,
        sparsity=sparsity,
        pattern=pattern,
        pruning=pruning,
        calibration=calibration,
        sparse_kernel=sparse_kernel,
    )
    notes: dict[str, str] = getattr(model, "_fastquant_notes", {})
    errors: dict[str, tuple[float | None, float | None]] = getattr(model, "_fastquant_errors", {})
    chosen = _select_layers(model, skip, filter_fn, quantize_tied, notes)
    if isinstance(config, (Int8, Int4)):
        grid: Grid = (
            Int4Grid(config.group_size, config.symmetric)
            if isinstance(config, Int4)
            else Int8Grid(-1 if config.group_size is None else config.group_size)
        )
        if isinstance(config.rounding, GPTQ):
            calibration = config.rounding.calibration
            if calibration is None:
                calibration = _embedded_calibration(
                    model, tokenizer, "GPTQ rounding", f"{pruning_lib.CALIBRATION_FORM})"
                )
            _patch_quantized_calibrated(
                model, chosen, grid, calibration, config.rounding.act_order, progress, notes, errors
            )
        else:
            _patch_quantized(model, chosen, grid, notes, errors)
        if config.int8_activations:
            layer_type = Int4Linear if isinstance(config, Int4) else Int8Linear
            for name, _, _ in chosen:
                layer = model.get_submodule(name)
                if isinstance(layer, layer_type):
                    layer.int8_activations = True
    else:
        name = config.pruning.name
        calibration = _pruning_calibration(model, name, config.sparsity, config.pattern, config.calibration, tokenizer)
        method = "sparse" if config.values is None else "int8+sparse"
        group_size = None if config.values is None else config.values.group_size
        _patch_sparse(
            model,
            chosen,
            method,
            group_size,
            config.sparsity,
            config.pattern,
            name,
            calibration,
            config.kernel,
            progress,
            notes,
            errors,
        )
    model._fastquant_notes = notes
    model._fastquant_errors = errors
    return model


def _quantized_layer(module: nn.Module, grid: Grid) -> Int8Linear | Int4Linear:
    if isinstance(grid, Int4Grid):
        return Int4Linear.from_linear(module, grid.group_size, grid.symmetric)
    return Int8Linear.from_linear(module, None if grid.group_size == -1 else grid.group_size)


def _grid_name(grid: Grid) -> str:
    return "int4" if isinstance(grid, Int4Grid) else "int8"


def _layer_from_codes(module: nn.Module, grid: Grid, result: pruning_lib.PrunedLayer) -> Int8Linear | Int4Linear:
    if isinstance(grid, Int4Grid):
        weight = linear_weight(module)
        dtype = weight.dtype if weight.dtype in ops.ACTIVATION_DTYPES else torch.float32
        bias = module.bias.detach() if module.bias is not None else None
        return Int4Linear.from_codes(
            result.qweight, result.scales, result.offsets, bias, grid.group_size, dtype=dtype, device=weight.device
        )
    return Int8Linear.from_codes(
        module, result.qweight, result.scales, None if grid.group_size == -1 else grid.group_size
    )


def _patch_quantized(
    model: nn.Module,
    chosen: list[tuple[str, nn.Module, list[str]]],
    grid: Grid,
    notes: dict[str, str],
    errors: dict[str, tuple[float | None, float | None]],
) -> None:
    replaced: dict[int, nn.Module] = {}  # weight storage -> its quantized layer, so shared linears stay shared
    weight_errors: dict[int, float] = {}
    for name, module, other_owners in chosen:
        storage = module.weight.data_ptr()
        if storage not in replaced:
            try:
                replaced[storage] = _quantized_layer(module, grid)
            except ValueError as exc:
                raise ValueError(f"layer {name!r}: {exc}") from exc
            weight_errors[storage] = pruning_lib.relative_error(replaced[storage].dequantize(), linear_weight(module))
        _set_submodule(model, name, replaced[storage])
        errors[name] = (weight_errors[storage], None)
        copy_note = f"{_grid_name(grid)} copy; float weight kept for {', '.join(other_owners)}"
        notes[name] = copy_note if other_owners else ""


def _layers_to_rewrite(chosen: list[tuple[str, nn.Module, list[str]]], action: str) -> dict[str, nn.Module]:
    """The layers a calibrated algorithm will rewrite in place, each with a weight of its own (a weight tied to
    an embedding is copied first, so the embedding keeps its float values)."""
    for name, module, other_owners in chosen:
        if not torch.isfinite(linear_weight(module)).all():
            raise ValueError(f"layer {name!r}: cannot {action} a weight with NaN/inf values")
        if other_owners:
            _untie(module)
    return {name: module for name, module, _ in chosen}


def _patch_quantized_calibrated(
    model: nn.Module,
    chosen: list[tuple[str, nn.Module, list[str]]],
    grid: Grid,
    calibration: Iterable,
    act_order: bool,
    progress: bool | None,
    notes: dict[str, str],
    errors: dict[str, tuple[float | None, float | None]],
) -> None:
    # GPTQ: SparseGPT's column-by-column quantization with nothing pruned. Each rounding error is pushed onto
    # the columns not yet quantized, weighted by the inverse Hessian of the layer's calibration inputs, so the
    # layer's output error (not its weight error) is what rounding minimizes. One loop for every grid.
    layers = _layers_to_rewrite(chosen, "quantize")
    kind = _grid_name(grid)
    results = pruning_lib.prune_layers(
        model,
        layers,
        sparsity=0.0,
        pattern="unstructured",
        pruning="sparsegpt",
        calibration=calibration,
        grid=grid,
        act_order=act_order,
        progress=progress,
        label=f"{kind} GPTQ rounding" + (" (act order)" if act_order else ""),
    )
    replaced: dict[int, nn.Module] = {}
    for name, module, other_owners in chosen:
        storage = module.weight.data_ptr()
        result = results[name]
        if storage not in replaced:
            replaced[storage] = _layer_from_codes(module, grid, result)
        _set_submodule(model, name, replaced[storage])
        errors[name] = (result.weight_error, result.output_error)
        notes[name] = f"{kind}, GPTQ rounding{' in activation order' if act_order else ''} on the calibration data"
        if other_owners:
            notes[name] += f"; float weight kept for {', '.join(other_owners)}"


def _patch_sparse(
    model: nn.Module,
    chosen: list[tuple[str, nn.Module, list[str]]],
    method: str,
    group_size: int | None,
    sparsity: float | None,
    pattern: str,
    pruning: str,
    calibration: Iterable | None,
    sparse_kernel: str,
    progress: bool | None,
    notes: dict[str, str],
    errors: dict[str, tuple[float | None, float | None]],
) -> None:
    int8 = method == "int8+sparse"
    layers = _layers_to_rewrite(chosen, "prune")
    pruned = pruning_lib.prune_layers(
        model,
        layers,
        sparsity=sparsity,
        pattern=pattern,
        pruning=pruning,
        calibration=calibration,
        int8=int8,
        group_size=group_size,
        progress=progress,
    )
    replaced: dict[int, nn.Module] = {}
    for name, module, other_owners in chosen:
        storage = module.weight.data_ptr()
        result = pruned[name]
        errors[name] = (result.weight_error, result.output_error)
        if storage not in replaced:
            sparse = SparseLinear.from_pruned(module, result.mask, result.qweight, result.scales, group_size, pattern)
            dense = Int8Linear.from_codes(module, result.qweight, result.scales, group_size) if int8 else module
            if sparse_kernel == "auto" and sparse.out_features * sparse.in_features < MIN_TIMED_WEIGHTS:
                replaced[storage] = sparse
                notes[name] = (
                    f"{pruning} {sparse.sparsity:.0%} pruned; sparse bitmap16 kept untimed (fewer than "
                    f"{MIN_TIMED_WEIGHTS} weights: either kernel takes microseconds)"
                )
            elif sparse_kernel == "auto":
                choice = choose_kernel(sparse, dense)
                replaced[storage] = sparse.set_layout(choice.layout) if choice.winner == "sparse" else dense
                notes[name] = f"{pruning} {choice.describe()}"
            else:
                if sparse_kernel == "csr16":
                    sparse.set_layout("csr16")
                replaced[storage] = dense if sparse_kernel == "dense" else sparse
                notes[name] = f"{pruning} {sparse.sparsity:.0%} pruned; {sparse_kernel} kernel as asked"
            if replaced[storage] is dense:
                # A dense layer's zeros are its pruned weights: fastquant.distill keeps them at zero.
                dense._fastquant_pruned = True
        _set_submodule(model, name, replaced[storage])
        if other_owners:
            notes[name] += f"; float weight kept for {', '.join(other_owners)}"


def prune(
    model: nn.Module,
    config: Sparse | None = None,
    *,
    sparsity: float | None = 0.5,
    pattern: str = "unstructured",
    pruning: str = DEFAULT_PRUNING,
    calibration: Iterable | None = None,
    tokenizer=None,
    skip: Iterable[str] = ("lm_head",),
    filter_fn: FilterFn | None = None,
    progress: bool | None = None,
) -> dict[str, Tensor]:
    """Prune the model's linear layers in place and keep them dense; returns each layer's keep-mask.

    The weights are zeroed for good (unlike ``torch.nn.utils.prune``, no mask is kept around): use this to
    study accuracy, then :func:`patch` with a sparse method for the speed. ``config`` (a
    :class:`fastquant.Sparse`; its values and kernel do not apply) or the keyword options as in :func:`patch`;
    weights tied to an embedding are left alone.
    """
    if config is None:
        config = method_config("sparse", sparsity=sparsity, pattern=pattern, pruning=pruning, calibration=calibration)
    elif not isinstance(config, Sparse):
        raise TypeError(f"config must be a fastquant.Sparse, got {config!r}")
    else:
        method_config(config, sparsity=sparsity, pattern=pattern, pruning=pruning, calibration=calibration)
    notes: dict[str, str] = getattr(model, "_fastquant_notes", {})
    layers = {name: module for name, module, _ in _select_layers(model, skip, filter_fn, False, notes)}
    model._fastquant_notes = notes
    name = config.pruning.name
    calibration = _pruning_calibration(model, name, config.sparsity, config.pattern, config.calibration, tokenizer)
    results = pruning_lib.prune_layers(
        model,
        layers,
        sparsity=config.sparsity,
        pattern=config.pattern,
        pruning=name,
        calibration=calibration,
        progress=progress,
    )
    return {name: result.mask for name, result in results.items()}


def _kernel_paths(layer: Int8Linear | Int4Linear | SparseLinear) -> str:
    if isinstance(layer, Int4Linear):
        return _int4_kernel_paths(layer)
    if isinstance(layer, SparseLinear) and layer.layout == "csr16":
        path = extension.sparse_csr_linear_kernel_path(layer.values.device)
        if layer.bitmap16_prefill_rows:
            prefill = extension.sparse_linear_kernel_path(
                layer.values.device,
                layer.bitmap16_prefill_rows,
                layer.out_features,
                layer.in_features,
                layer.values.dtype,
                layer.dtype,
                layer.group_size_arg,
            )
            return f"{path} / {prefill} (prefill)"
        return path
    if isinstance(layer, SparseLinear):
        device, (n, k) = layer.masks.device, (layer.out_features, layer.in_features)
        paths = [
            extension.sparse_linear_kernel_path(device, m, n, k, layer.values.dtype, layer.dtype, layer.group_size_arg)
            for m in (1, 512)
        ]
    else:
        device, (n, k) = layer.qweight.device, layer.qweight.shape
        paths = [
            extension.int8_linear_kernel_path(
                device, m, n, k, layer.group_size_arg, layer.dtype, layer.int8_activations
            )
            for m in (1, 512)
        ]
    return paths[0] if paths[0] == paths[1] else " / ".join(paths)


def _int4_kernel_paths(layer: Int4Linear) -> str:
    device, (n, k) = layer.qweight.device, (layer.out_features, layer.in_features)
    paths = [
        extension.int4_linear_kernel_path(device, m, n, k, layer.group_size, layer.dtype, layer.int8_activations)
        for m in (1, 512)
    ]
    return paths[0] if paths[0] == paths[1] else " / ".join(paths)


def report(model: nn.Module) -> Report:
    """A per-layer table of the model's linear layers: name, shape, format, bytes before/after, reconstruction
    error (weight, and layer output on the calibration inputs where calibrated), kernel."""
    notes: dict[str, str] = getattr(model, "_fastquant_notes", {})
    errors: dict[str, tuple[float | None, float | None]] = getattr(model, "_fastquant_errors", {})
    rows: list[LayerReport] = []
    for name, module in model.named_modules():
        if isinstance(module, COMPRESSED_LAYERS):
            n, k = module.out_features, module.in_features
            float_bytes = n * k * torch.finfo(module.dtype).bits // 8
            if isinstance(module, (SparseLinear, Int4Linear)):
                packed_bytes = module.packed_bytes()
            else:
                packed_bytes = module.qweight.numel() + module.scales.numel() * module.scales.element_size()
            rows.append(
                LayerReport(
                    name,
                    (n, k),
                    module.format,
                    float_bytes,
                    packed_bytes,
                    _kernel_paths(module),
                    notes.get(name, ""),
                    *errors.get(name, (None, None)),
                )
            )
        elif is_quantizable_linear(module):
            weight = linear_weight(module)
            size = weight.numel() * weight.element_size()
            rows.append(
                LayerReport(
                    name,
                    tuple(weight.shape),
                    f"float ({str(weight.dtype).removeprefix('torch.')})",
                    size,
                    size,
                    "torch",
                    notes.get(name, ""),
                )
            )
    return Report(rows)
