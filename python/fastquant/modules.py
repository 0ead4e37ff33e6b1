"""Drop-in replacements for float layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastquant.algorithms.grids import check_int4_group_size
from fastquant.configs import check_group_size
from fastquant.kernels import extension, ops, reference

SPARSE_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)
SPARSE_CHUNK = 16  # input columns per bitmap16 mask


def linear_weight(layer: nn.Module) -> Tensor:
    """The (out_features, in_features) weight of an nn.Linear or a transformers Conv1D (stored transposed)."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
        return layer.weight.t()
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(layer).__name__}")


def is_quantizable_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


class _CompressedLinear(nn.Module):
    """What every compressed linear layer shares: fp32 scales that survive dtype moves, the activation dtype,
    and how it prints. Subclasses set in_features, out_features, group_size, scales (or None), bias, _dtype.

    Their forward passes read buffers and the bias from the module's ``_buffers`` / ``_parameters`` dicts:
    ``self.name`` reaches them through ``nn.Module.__getattr__``, ~0.2 us per lookup, which at five or six
    tensors per call was ~1 us of a 7-10 us decode call of a small layer."""

    def _init_bias(self, out_features: int, bias: bool, device: torch.device | str | None, dtype: torch.dtype) -> None:
        """The bias (frozen, in the activation dtype) and the activation dtype itself."""
        if dtype not in ops.ACTIVATION_DTYPES:
            raise ValueError(f"dtype must be one of {ops.ACTIVATION_DTYPES}, got {dtype}")
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._dtype = dtype

    @property
    def group_size_arg(self) -> int:
        return -1 if self.group_size is None else self.group_size

    @property
    def dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else self._dtype

    # Buffers that are part of the stored format, whose dtype a model-wide .to(dtype) must not change.
    _FORMAT_BUFFERS: tuple[str, ...] = ("scales",)

    def _apply(self, fn, recurse: bool = True):
        # Module.to(dtype) and .half() cast every floating tensor. The scales must keep their precision (int8's
        # fp32 scales are applied in fp32 so fp16 activations never overflow; int4's fp16 scales are the format):
        # only the activation dtype moves. Float sparse values do follow the model's dtype, as a float weight would.
        kept = {name: t for name in self._FORMAT_BUFFERS if (t := self._buffers.get(name)) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            if self._buffers[name].dtype != before.dtype:
                self._buffers[name] = before.to(self._buffers[name].device)
        probe = fn(torch.empty(0, dtype=self._dtype))
        if probe.dtype in ops.ACTIVATION_DTYPES:
            self._dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format}"
        )


class Int8Linear(_CompressedLinear):
    """A linear layer whose weight is stored as int8 with fp32 scales (per output channel or per group).

    The forward pass runs ``torch.ops.fastquant.int8_linear``: a fused dequantize-matmul that never
    materializes the float weight. Activations keep their dtype; accumulation is fp32.

    ``int8_activations``: x is rounded to int8 per block of 32 columns at every call (llama.cpp's Q8_0
    activations, fbgemm's dynamic quantization; ``reference.int8_activation_round``), so the CPU decode kernel
    multiplies bytes by bytes; off, x is used as it is.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        int8_activations: bool = False,
    ) -> None:
        super().__init__()
        check_group_size(group_size)
        if not isinstance(int8_activations, bool):
            raise ValueError(f"int8_activations must be True or False, got {int8_activations!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.int8_activations = int8_activations
        scale_shape = (out_features,) if group_size is None else (out_features, -(-in_features // group_size))
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self._init_bias(out_features, bias, device, dtype)

    @property
    def format(self) -> str:
        x = " x=int8" if self.int8_activations else ""
        return ("int8 per-channel" if self.group_size is None else f"int8 group={self.group_size}") + x

    @classmethod
    def from_linear(
        cls, linear: nn.Module, group_size: int | None = None, *, int8_activations: bool = False
    ) -> Int8Linear:
        """Quantize an nn.Linear (or transformers Conv1D). Raises ValueError on NaN/inf weights."""
        check_group_size(group_size)
        weight = linear_weight(linear)
        if not torch.isfinite(weight).all():
            bad = (~torch.isfinite(weight)).sum().item()
            raise ValueError(f"cannot quantize a weight of shape {tuple(weight.shape)} with {bad} NaN/inf values")
        qweight, scales = reference.int8_quantize(weight, -1 if group_size is None else group_size)
        return cls.from_codes(linear, qweight, scales, group_size, int8_activations=int8_activations)

    @classmethod
    def from_codes(
        cls,
        linear: nn.Module,
        qweight: Tensor,
        scales: Tensor,
        group_size: int | None = None,
        *,
        int8_activations: bool = False,
    ) -> Int8Linear:
        """An Int8Linear holding given int8 codes and scales (e.g. from a pruning algorithm that quantized
        jointly), with the bias and dtype of ``linear``."""
        weight = linear_weight(linear)
        if tuple(qweight.shape) != tuple(weight.shape) or qweight.dtype != torch.int8:
            raise ValueError(
                f"qweight must be int8 of shape {tuple(weight.shape)}, got {qweight.dtype} {tuple(qweight.shape)}"
            )
        out_features, in_features = weight.shape
        dtype = weight.dtype if weight.dtype in ops.ACTIVATION_DTYPES else torch.float32
        layer = cls(
            in_features, out_features, linear.bias is not None, group_size, weight.device, dtype, int8_activations
        )
        if tuple(scales.shape) != tuple(layer.scales.shape):
            raise ValueError(f"scales must have shape {tuple(layer.scales.shape)}, got {tuple(scales.shape)}")
        layer.qweight.copy_(qweight)
        layer.scales.copy_(scales)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        buffers = self._buffers  # see _CompressedLinear: the dicts, not nn.Module.__getattr__
        return ops.int8_linear(
            x,
            buffers["qweight"],
            buffers["scales"],
            self._parameters["bias"],
            self.group_size_arg,
            int8_activations=self.int8_activations,
        )

    def dequantize(self) -> Tensor:
        """The float weight this layer computes with, (out_features, in_features), in the layer's dtype."""
        return reference.int8_dequantize(self.qweight, self.scales, self.group_size_arg).to(self._dtype)


class SparseLinear(_CompressedLinear):
    """A linear layer whose pruned weight is stored in the ``bitmap16`` sparse format.

    Per row and per 16 input columns, a 16-bit mask says which weights are kept; the kept weights are packed
    row by row (``values``), in the float dtype of the original weight or as int8 codes with fp32 scales. At
    decode (few tokens) the layer is bound by the bytes it reads, so bytes per weight decide the speed:
    1/8 + 4(1 - s) for float32 values and 1/8 + (1 - s) for int8 values at sparsity s, against 4 and 1 dense.
    The forward pass runs ``torch.ops.fastquant.sparse_linear``, which never builds the dense weight.

    ``layout`` says which kernel reads it: ``"bitmap16"`` (the stored format), or ``"csr16"``, where
    :meth:`set_layout` derives a 16-bit column index per kept value once and the forward pass runs
    ``torch.ops.fastquant.sparse_csr_linear`` (work per kept weight rather than per 16 columns: faster at
    high sparsity on CPUs without a vector expand, at decode and prefill). The indices are derived, not saved:
    a checkpoint stores bitmap16 and the layout name, and loading derives them again.
    """

    LAYOUTS = ("bitmap16", "csr16")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_values: int,
        bias: bool = True,
        values_dtype: torch.dtype = torch.float32,
        group_size: int | None = None,
        pattern: str = "unstructured",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """An empty layer with room for ``n_values`` packed values (kept weights plus the format's padding)."""
        super().__init__()
        if values_dtype not in SPARSE_VALUE_DTYPES:
            raise ValueError(f"values_dtype must be one of {SPARSE_VALUE_DTYPES}, got {values_dtype}")
        if values_dtype != torch.int8 and group_size is not None:
            raise ValueError("group_size applies to int8 values only")
        check_group_size(group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.pattern = pattern
        n_chunks = -(-in_features // SPARSE_CHUNK)
        self.register_buffer("values", torch.zeros(n_values, dtype=values_dtype, device=device))
        self.register_buffer("masks", torch.zeros(out_features, n_chunks, dtype=torch.int16, device=device))
        self.register_buffer("row_offsets", torch.zeros(out_features + 1, dtype=torch.int64, device=device))
        if values_dtype == torch.int8:
            scale_shape = (out_features,) if group_size is None else (out_features, -(-in_features // group_size))
            self.register_buffer("scales", torch.ones(scale_shape, dtype=torch.float32, device=device))
        else:
            self.scales = None
        self._init_bias(out_features, bias, device, dtype)
        self.layout = "bitmap16"
        self.register_buffer("column_indices", None, persistent=False)
        # csr16 only: rows of x from which calls go to the bitmap16 op's prefill kernel (0: never).
        self.bitmap16_prefill_rows = 0

    def layouts(self) -> tuple[str, ...]:
        """The layouts this layer can run: csr16's 16-bit column indices need in_features <= 65536."""
        if self.in_features > reference.SPARSE_CSR_MAX_IN_FEATURES:
            return ("bitmap16",)
        return self.LAYOUTS

    def set_layout(self, layout: str) -> SparseLinear:
        """Run the layer with the ``"bitmap16"`` or the ``"csr16"`` kernel (derives the column indices once).

        A csr16 layer still hands calls of more than 16 rows (prefill) to the bitmap16 op where that op has a
        prefill kernel (int8 values on AVX-512 CPUs: ``cpu_avx512_bf16_tiles``, 1.4-5.7x faster than csr16 at
        M = 128-512 for 90% sparse 4096 x 4096), as the native module reports it: the masks stay in the layer
        either way. That kernel rounds fp32 activations to bf16 only under
        ``torch.set_float32_matmul_precision("medium")``, so the hand-over is decided under the precision set
        when the layout is (this call, and moves with ``.to()``): forward cannot ask torch's setting without
        breaking ``torch.compile(fullgraph=True)``. Either op follows the precision of the call itself, so a
        later change of the setting changes which layout serves prefill, never the contract."""
        if layout not in self.LAYOUTS:
            raise ValueError(f"layout must be one of {self.LAYOUTS}, got {layout!r}")
        self.column_indices = (
            reference.sparse_column_indices(self.masks, self.in_features, self.values.numel())
            if layout == "csr16"
            else None
        )
        self.layout = layout
        self._update_prefill_rows()
        return self

    def _update_prefill_rows(self) -> None:
        self.bitmap16_prefill_rows = (
            extension.sparse_linear_prefill_rows(
                self.masks.device, self.in_features, self.values.dtype, self.dtype, self.group_size_arg
            )
            if self.layout == "csr16"
            else 0
        )

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._update_prefill_rows()  # the device or dtype may have changed which kernels exist
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # New masks make the derived column indices stale: derive them again from what was loaded.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.column_indices is not None:
            self.set_layout("csr16")

    @classmethod
    def from_pruned(
        cls,
        linear: nn.Module,
        mask: Tensor,
        qweight: Tensor | None = None,
        scales: Tensor | None = None,
        group_size: int | None = None,
        pattern: str = "unstructured",
    ) -> SparseLinear:
        """Pack a pruned nn.Linear (or Conv1D): its float weight where ``mask`` is True, or, when ``qweight``
        and ``scales`` are given, those int8 codes (zero where pruned) with their scales."""
        weight = linear_weight(linear).detach()
        if mask.shape != weight.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        out_features, in_features = weight.shape
        dtype = weight.dtype if weight.dtype in ops.ACTIVATION_DTYPES else torch.float32
        source = weight.to(dtype) if qweight is None else qweight
        values, masks, row_offsets = reference.sparse_pack(source.contiguous(), mask.to(weight.device))
        layer = cls(
            in_features,
            out_features,
            values.numel(),
            linear.bias is not None,
            values.dtype,
            group_size if qweight is not None else None,
            pattern,
            weight.device,
            dtype,
        )
        layer.values.copy_(values)
        layer.masks.copy_(masks)
        layer.row_offsets.copy_(row_offsets)
        if qweight is not None:
            if scales is None:
                raise ValueError("int8 values need their scales")
            layer.scales.copy_(scales)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @property
    def n_kept(self) -> int:
        return int(self.row_offsets[-1])

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n_kept / (self.out_features * self.in_features)

    @property
    def format(self) -> str:
        if self.values.dtype == torch.int8:
            scales = "per-channel" if self.group_size is None else f"group={self.group_size}"
            values = f"int8 {scales}"
        else:
            values = str(self.values.dtype).removeprefix("torch.")
        return f"sparse {self.sparsity:.0%} {self.pattern} {self.layout}, {values} values"

    def packed_bytes(self) -> int:
        """Bytes the layer holds: the bitmap16 weight, plus the column indices where the csr16 kernel runs (the
        masks stay: they are what a checkpoint stores)."""
        tensors = (self.values, self.masks, self.column_indices, self.row_offsets, self.scales)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def forward(self, x: Tensor) -> Tensor:
        buffers = self._buffers  # see _CompressedLinear: the dicts, not nn.Module.__getattr__
        values, row_offsets, scales, bias = (
            buffers["values"],
            buffers["row_offsets"],
            buffers.get("scales"),
            self._parameters["bias"],
        )
        column_indices = buffers["column_indices"]
        prefill_rows = self.bitmap16_prefill_rows
        if column_indices is not None and not (prefill_rows and x.numel() >= prefill_rows * self.in_features):
            return ops.sparse_csr_linear(
                x,
                values,
                column_indices,
                row_offsets,
                scales,
                bias,
                in_features=self.in_features,
                group_size=self.group_size_arg,
            )
        return ops.sparse_linear(
            x,
            values,
            buffers["masks"],
            row_offsets,
            scales,
            bias,
            in_features=self.in_features,
            group_size=self.group_size_arg,
        )

    def dequantize(self) -> Tensor:
        """The dense weight this layer computes with (zeros where pruned), in the layer's dtype."""
        dense = reference.sparse_unpack(self.values, self.masks, self.row_offsets, self.in_features)
        if self.scales is not None:
            dense = reference.int8_dequantize(dense, self.scales, self.group_size_arg)
        return dense.to(self._dtype)


class Int4Linear(_CompressedLinear):
    """A linear layer whose weight is stored as 4-bit codes, two per byte, with an fp16 scale per group of
    ``group_size`` input columns (and, when asymmetric, an fp16 offset per group).

    Layout (the contract of ``torch.ops.fastquant.int4_linear``): ``qweight`` is uint8 (N, ceil(K/64) * 32); the
    32 bytes of block b of a row hold k = 64b + j in the low nibble of byte j and k = 64b + 32 + j in its high
    nibble, so a kernel streams each row linearly. Symmetric: w = s * (q - 8) (llama.cpp Q4_0's grid);
    asymmetric: w = s * q + o (Q4_1's). The forward pass never materializes the float weight.

    ``int8_activations``: x is rounded to int8 per block of 32 columns at every call (llama.cpp's Q8_0
    activations for Q4_0, torchao's int8 dynamic activations; ``reference.int8_activation_round``), which halves
    the multiplies per weight of the CPU decode kernel; off, x is used as it is.
    """

    _FORMAT_BUFFERS = ("scales", "offsets")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 32,
        symmetric: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        int8_activations: bool = False,
    ) -> None:
        super().__init__()
        check_int4_group_size(group_size)
        if not isinstance(int8_activations, bool):
            raise ValueError(f"int8_activations must be True or False, got {int8_activations!r}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.symmetric = bool(symmetric)
        self.int8_activations = int8_activations
        n_groups = -(-in_features // group_size)
        packed = -(-in_features // reference.INT4_BLOCK) * (reference.INT4_BLOCK // 2)
        self.register_buffer("qweight", torch.zeros(out_features, packed, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16, device=device))
        if symmetric:
            self.offsets = None
        else:
            self.register_buffer("offsets", torch.zeros(out_features, n_groups, dtype=torch.float16, device=device))
        self._init_bias(out_features, bias, device, dtype)

    @property
    def format(self) -> str:
        x = " x=int8" if self.int8_activations else ""
        return f"int4 {'sym' if self.symmetric else 'asym'} group={self.group_size}{x}"

    @classmethod
    def from_linear(
        cls, linear: nn.Module, group_size: int = 32, symmetric: bool = True, *, int8_activations: bool = False
    ) -> Int4Linear:
        """Quantize an nn.Linear (or transformers Conv1D) by round-to-nearest. Raises ValueError on NaN/inf
        weights or an unsupported group size."""
        check_int4_group_size(group_size)
        weight = linear_weight(linear)
        if not torch.isfinite(weight).all():
            bad = (~torch.isfinite(weight)).sum().item()
            raise ValueError(f"cannot quantize a weight of shape {tuple(weight.shape)} with {bad} NaN/inf values")
        qweight, scales, offsets = reference.int4_quantize(weight, group_size, symmetric)
        bias = linear.bias.detach() if linear.bias is not None else None
        dtype = weight.dtype if weight.dtype in ops.ACTIVATION_DTYPES else torch.float32
        return cls.from_codes(
            qweight,
            scales,
            offsets,
            bias,
            group_size,
            in_features=weight.shape[1],
            dtype=dtype,
            device=weight.device,
            int8_activations=int8_activations,
        )

    @classmethod
    def from_codes(
        cls,
        codes: Tensor,
        scales: Tensor,
        offsets: Tensor | None = None,
        bias: Tensor | None = None,
        group_size: int = 32,
        *,
        in_features: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        int8_activations: bool = False,
    ) -> Int4Linear:
        """An Int4Linear holding given codes and grid (from GPTQ, or a GGUF Q4_0/Q4_1 file).

        ``codes``: uint8 (N, K) codes 0..15, or the packed (N, ceil(K/64) * 32) ``qweight`` (then
        ``in_features`` K is required). ``scales``/``offsets``: float16 (N, ceil(K/group_size)); offsets None
        means symmetric. ``bias``: (N,) or None. ``dtype``: the activation dtype (default: the bias's, else
        float32). Everything is checked (shapes, dtypes, codes <= 15, zero padding past K): ValueError."""
        check_int4_group_size(group_size)
        if codes.dim() != 2 or codes.dtype != torch.uint8:
            raise ValueError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
        n = codes.shape[0]
        unpacked = in_features is None or codes.shape[1] == in_features
        k = codes.shape[1] if in_features is None else int(in_features)
        packed_width = -(-k // reference.INT4_BLOCK) * (reference.INT4_BLOCK // 2)
        if unpacked:
            if codes.numel() and int(codes.max()) > 15:
                raise ValueError(f"int4 codes must be in 0..15, got a maximum of {int(codes.max())}")
            qweight = reference.int4_pack(codes)
        elif codes.shape[1] == packed_width:
            qweight = codes
            check_int4_padding(qweight, k)
        else:
            raise ValueError(
                f"codes of shape {tuple(codes.shape)} are neither (N, K) = ({n}, {k}) codes nor the packed "
                f"(N, ceil(K/64) * 32) = ({n}, {packed_width})"
            )
        n_groups = -(-k // group_size)
        for what, t in (("scales", scales), ("offsets", offsets)):
            if t is not None and (t.dtype != torch.float16 or tuple(t.shape) != (n, n_groups)):
                raise ValueError(
                    f"{what} must be float16 of shape (N, ceil(K/group_size)) = ({n}, {n_groups}), "
                    f"got {t.dtype} {tuple(t.shape)}"
                )
            if t is not None and not torch.isfinite(t).all():
                raise ValueError(f"{what} hold NaN/inf values")
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        if dtype is None:
            dtype = bias.dtype if bias is not None and bias.dtype in ops.ACTIVATION_DTYPES else torch.float32
        device = qweight.device if device is None else device
        layer = cls(k, n, bias is not None, group_size, offsets is None, device, dtype, int8_activations)
        layer.qweight.copy_(qweight)
        layer.scales.copy_(scales)
        if offsets is not None:
            layer.offsets.copy_(offsets)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def packed_bytes(self) -> int:
        """Bytes of the stored format: codes, scales and offsets (0.5 + 2/group_size (+ 2/group_size) per weight)."""
        tensors = (self.qweight, self.scales, self.offsets)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def forward(self, x: Tensor) -> Tensor:
        buffers = self._buffers  # see _CompressedLinear: the dicts, not nn.Module.__getattr__
        return ops.int4_linear(
            x,
            buffers["qweight"],
            buffers["scales"],
            buffers.get("offsets"),
            self._parameters["bias"],
            in_features=self.in_features,
            group_size=self.group_size,
            int8_activations=self.int8_activations,
        )

    def dequantize(self) -> Tensor:
        """The float weight this layer computes with, (out_features, in_features), in the layer's dtype."""
        return reference.int4_dequantize(self.qweight, self.scales, self.offsets, self.in_features, self.group_size).to(
            self._dtype
        )


def check_int4_padding(qweight: Tensor, in_features: int) -> None:
    """Packed int4 codes past K (the tail of the last 64-block) must be 0: ValueError otherwise (corrupt data)."""
    if in_features % reference.INT4_BLOCK == 0 or qweight.numel() == 0:
        return
    codes = reference.int4_unpack(qweight[:, -(reference.INT4_BLOCK // 2) :], reference.INT4_BLOCK)
    tail = codes[:, in_features % reference.INT4_BLOCK :]
    if bool(tail.any()):
        raise ValueError(
            f"packed int4 codes past in_features={in_features} must be 0 (the padding of the last 64-block); "
            f"{int((tail != 0).sum())} are not: corrupt or mis-sized qweight"
        )
