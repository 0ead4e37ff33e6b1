"""Typed method configs for :func:`fastquant.patch` and :func:`fastquant.prune`.

Each config validates itself once, when it is made, so a bad value fails where it is written, not half-way
through calibrating a model::

    fastquant.patch(model, fastquant.Int8(group_size=128, rounding=fastquant.GPTQ(batches)))
    fastquant.patch(model, fastquant.Sparse(0.5, pruning=fastquant.SparseGPT(batches), values=fastquant.Int8()))
    fastquant.patch(model, fastquant.Sparse(pattern="2:4", pruning=fastquant.Wanda(batches)))

The strings (``"int8"``, ``"sparse"``, ``"int8+sparse"``) stay as shortcuts with keyword arguments; both
spellings reach the same code through :meth:`Int8.from_method` / :meth:`Sparse.from_method`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from fastquant.choices import DEFAULT_PRUNING, PRUNING_METHODS

# Group sizes the compressed layers take: whole 16-column mask words for sparse int8 values, and tiles the
# CPU and CUDA kernels are tuned for.
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
# How a sparse layer is stored and run (fastquant.patch documents each).
SPARSE_KERNELS = ("auto", "sparse", "csr16", "dense")


def check_group_size(group_size: int | None) -> None:
    """None (one scale per output channel) or one of SUPPORTED_GROUP_SIZES."""
    if group_size is not None and (isinstance(group_size, bool) or group_size not in SUPPORTED_GROUP_SIZES):
        raise ValueError(f"group_size must be None (per-channel) or one of {SUPPORTED_GROUP_SIZES}, got {group_size}")


# ---------------------------------------------------------------- rounding


@dataclass(frozen=True)
class RTN:
    """Round each weight to the nearest point of its grid."""


@dataclass(frozen=True)
class GPTQ:
    """GPTQ rounding: each column's rounding error is compensated on the columns not yet rounded, weighted by
    the layer's inputs on ``calibration`` (model inputs: LongTensors of token ids or dicts of keyword
    arguments). None: the embedded text, tokenized with the model's tokenizer (with a warning).

    ``act_order``: round the input columns in order of decreasing energy on the calibration data (the Hessian's
    diagonal; GPTQ's ``act_order``, AutoGPTQ's ``desc_act``), so the columns that matter most are rounded while
    many others are left to absorb their error. Each group's scale is then fixed from the weight before the loop
    ("static groups"), so the stored format and the kernels are the same as without it."""

    calibration: Iterable | None = field(default=None, compare=False)
    act_order: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.act_order, bool):
            raise ValueError(f"GPTQ.act_order must be True or False, got {self.act_order!r}")


Rounding = RTN | GPTQ


# ---------------------------------------------------------------- pruning


@dataclass(frozen=True)
class Magnitude:
    """Drop the smallest weights of each layer (``global_=True``: across all layers at once). No data, but far
    less accurate than the calibrated methods on language models."""

    global_: bool = False

    @property
    def name(self) -> str:
        return "global-magnitude" if self.global_ else "magnitude"


@dataclass(frozen=True)
class Wanda:
    """Drop the weights of smallest |w| * ||x|| per output row, ``x`` the layer's inputs on ``calibration``."""

    calibration: Iterable | None = field(default=None, compare=False)
    name = "wanda"


@dataclass(frozen=True)
class SparseGPT:
    """Prune and compensate the kept weights layer by layer on ``calibration`` (the default method)."""

    calibration: Iterable | None = field(default=None, compare=False)
    name = "sparsegpt"


Pruning = Magnitude | Wanda | SparseGPT


def pruning_from_name(name: str, calibration: Iterable | None = None) -> Pruning:
    """The pruning config a ``pruning=`` string names."""
    if name not in PRUNING_METHODS:
        raise ValueError(f"unknown pruning {name!r}: expected one of {PRUNING_METHODS}")
    if name in ("magnitude", "global-magnitude"):
        return Magnitude(global_=name == "global-magnitude")
    return Wanda(calibration) if name == "wanda" else SparseGPT(calibration)


# ---------------------------------------------------------------- methods


@dataclass(frozen=True)
class Int8:
    """int8 weight-only quantization: one fp32 scale per output channel (``group_size=None``) or per group of
    ``group_size`` input columns; rounded to nearest or by GPTQ.

    ``int8_activations``: each layer rounds its input to int8 per block of 32 columns at every call, as
    llama.cpp's Q8_0 and fbgemm's ``quantize_dynamic`` do: the CPU decode kernel then multiplies bytes by bytes
    (one multiply-add instruction per 32 weights instead of fp32 conversions and FMAs), at the cost of that
    rounding (|error| <= max|x of the block| / 254). GPTQ calibrates on unrounded inputs either way. Not for
    the int8 values of :class:`Sparse` layers."""

    group_size: int | None = None
    rounding: Rounding = field(default_factory=RTN)
    int8_activations: bool = False

    def __post_init__(self) -> None:
        check_group_size(self.group_size)
        if not isinstance(self.int8_activations, bool):
            raise ValueError(f"int8_activations must be True or False, got {self.int8_activations!r}")
        if not isinstance(self.rounding, (RTN, GPTQ)):
            raise TypeError(f"rounding must be fastquant.RTN() or fastquant.GPTQ(calibration), got {self.rounding!r}")

    @classmethod
    def from_method(cls, group_size: int | None, calibration: Iterable | None) -> Int8:
        """``patch(model, "int8", group_size=..., calibration=...)``: calibration selects GPTQ."""
        return cls(group_size, RTN() if calibration is None else GPTQ(calibration))


@dataclass(frozen=True)
class Int4:
    """4-bit weight-only quantization, two codes per byte, one fp16 scale per group of ``group_size`` input
    columns (32, 64, 128 or 256) and, when not ``symmetric``, an fp16 offset; rounded to nearest or by GPTQ.
    At group 32 the symmetric grid is llama.cpp's Q4_0, the asymmetric one Q4_1.

    ``int8_activations``: each layer rounds its input to int8 per block of 32 columns at every call, as
    llama.cpp does for Q4_0 (and torchao's int8-dynamic-activation int4-weight): the CPU decode kernel then
    needs half the multiplies per weight (faster where it is compute-bound), at the cost of that rounding
    (|error| <= max|x of the block| / 254). GPTQ calibrates on unrounded inputs either way."""

    group_size: int = 32
    symmetric: bool = True
    rounding: Rounding = field(default_factory=RTN)
    int8_activations: bool = False

    def __post_init__(self) -> None:
        from fastquant.algorithms.grids import check_int4_group_size  # torch: loaded with the first config

        check_int4_group_size(self.group_size)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be True or False, got {self.symmetric!r}")
        if not isinstance(self.int8_activations, bool):
            raise ValueError(f"int8_activations must be True or False, got {self.int8_activations!r}")
        if not isinstance(self.rounding, (RTN, GPTQ)):
            raise TypeError(f"rounding must be fastquant.RTN() or fastquant.GPTQ(calibration), got {self.rounding!r}")

    @classmethod
    def from_method(cls, group_size: int | None, symmetric: bool, calibration: Iterable | None) -> Int4:
        """``patch(model, "int4", group_size=..., symmetric=..., calibration=...)``: calibration selects GPTQ."""
        rounding = RTN() if calibration is None else GPTQ(calibration)
        return cls(32 if group_size is None else group_size, symmetric, rounding)


@dataclass(frozen=True)
class Sparse:
    """Pruning to ``sparsity`` (a fraction in [0, 1); None with an N:M ``pattern``, which implies it) with
    ``pattern`` ``"unstructured"`` or ``"N:M"`` (at most N kept of every M input columns), stored sparse.

    ``values``: None keeps the kept weights in float; ``Int8(group_size)`` stores them as int8 codes (SparseGPT
    rounds them jointly with the pruning; its rounding must be RTN). ``kernel``: ``"auto"`` (per layer, the
    fastest of the sparse layouts and the dense kernel, timed here), ``"sparse"`` (bitmap16 always),
    ``"csr16"``, or ``"dense"`` (pruned, stored dense)."""

    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    pruning: Pruning = field(default_factory=SparseGPT)
    values: Int8 | None = None
    kernel: str = "auto"

    def __post_init__(self) -> None:
        from fastquant.algorithms.pruning import (
            parse_pattern,  # torch: loaded with the first config, not with fastquant
        )

        parse_pattern(self.pattern, self.sparsity)
        if not isinstance(self.pruning, (Magnitude, Wanda, SparseGPT)):
            raise TypeError(
                "pruning must be fastquant.SparseGPT(calibration), fastquant.Wanda(calibration) or "
                f"fastquant.Magnitude(), got {self.pruning!r}"
            )
        if self.values is not None:
            if not isinstance(self.values, Int8):
                raise TypeError(f"values must be None (float) or fastquant.Int8(...), got {self.values!r}")
            if not isinstance(self.values.rounding, RTN):
                raise ValueError("the rounding of sparse int8 values is the pruning method's: leave it RTN()")
            if self.values.int8_activations:
                raise ValueError("int8_activations applies to int8 and int4 layers, not to sparse int8 values")
        if self.kernel not in SPARSE_KERNELS:
            raise ValueError(f"kernel must be one of {SPARSE_KERNELS}, got {self.kernel!r}")

    @property
    def calibration(self) -> Iterable | None:
        return getattr(self.pruning, "calibration", None)

    @classmethod
    def from_method(
        cls,
        method: str,
        *,
        sparsity: float | None,
        pattern: str,
        pruning: str = DEFAULT_PRUNING,
        calibration: Iterable | None = None,
        group_size: int | None = None,
        kernel: str = "auto",
    ) -> Sparse:
        """``patch(model, "sparse" | "int8+sparse", ...)`` as a config."""
        if method == "sparse" and group_size is not None:
            raise ValueError("group_size applies to the int8 methods; method='sparse' keeps float values")
        values = Int8(group_size) if method == "int8+sparse" else None
        return cls(sparsity, pattern, pruning_from_name(pruning, calibration), values, kernel)


Method = Int8 | Int4 | Sparse
