"""Fast generation: the decode step of a transformers model compiled once, with a static KV cache.

At batch 1 a decode step of a small model is dominated by what runs around the matmuls: ~35 Python-dispatched
ops per layer (RMSNorm, rotary, SiLU, residual adds, KV-cache appends), each a few microseconds. Compiling the
step with a KV cache of fixed shape turns the whole forward into one graph (pointwise ops fused into C++ loops
by Inductor, the fastquant ops called directly), and the static cache removes the per-token reallocation of
a growing one. ``generate`` stays transformers' own: greedy, sampling, stopping criteria and streamers work
unchanged.

Two ways to run the compiled step on the CPU. ``backend="inductor"`` is ``torch.compile``: every step first
evaluates Dynamo's guards over the model's ~450 parameters and then runs Inductor's Python wrapper, one Python call
per kernel (211 fastquant ops plus ~60 fused loops for SmolLM2): ~5 ms of a 14 ms token on a small CPU.
``backend="aoti"`` exports the step once (``torch.export``) and compiles it with AOTInductor into a shared library
whose C++ wrapper calls the kernels; a step is then one call with a flat list of tensors. It has no guards, so
:class:`_AotiDecodeStep` checks what it relies on itself (shapes, dtypes, the static cache) and hands any call it
was not built for to ``torch.compile``'s step. The library holds no weights: it reads the model's own tensors
(``user_managed`` constants), so it costs no memory and is cached on disk (in Inductor's cache directory) by the
exported graph's code, the shapes of its inputs and weights, and the values of the few tensors it bakes in.
Layers that read the same input (q, k and v; gate and up) are exported as one merged layer each
(:mod:`fastquant.siblings`): SmolLM2's 211 calls per token become 121, each a longer weight stream.

Grouped-query attention (SmolLM2: 9 query heads on 3 key/value heads) needs care when traced. transformers' ``sdpa``
attention runs a one-token step on the key/value heads (the query heads of a group become rows of one query), but
only outside ``torch.compile``/``torch.export``; traced, it expands the keys and values to every query head, which
copies the whole static cache at every layer and step (26 MB per token for SmolLM2 with a 192-token cache).
:func:`compile_for_decode` therefore switches an ``sdpa`` model to ``"fastquant_sdpa"``, registered with transformers'
attention interfaces: the same mask and the same function, with the one-token grouped step packed when traced too,
and on the CPU run by ``fastquant.decode_attention`` (torch's flash attention spent ~30 us per layer around a
product of a few microseconds: 0.9 ms of a 9.5 ms SmolLM2 token).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fastquant import siblings

log = logging.getLogger(__name__)

Backend = Literal["inductor", "aoti"]
# What a decode step of transformers' generate passes (5.x: ``cache``; 4.x: ``past_key_values``).
_STEP_KWARGS = frozenset(
    {"input_ids", "cache", "past_key_values", "position_ids", "attention_mask", "logits_to_keep", "use_cache"}
)


@dataclass(frozen=True)
class DecodeCompileInfo:
    """What :func:`compile_for_decode` set up, and the seconds its warm-up took (compilation included)."""

    mode: str
    fullgraph: bool
    max_cache_len: int | None
    warmup_seconds: float | None
    backend: Backend = "inductor"


def compile_for_decode(
    model: nn.Module,
    *,
    max_cache_len: int | None = None,
    fullgraph: bool = True,
    mode: str | None = None,
    backend: Backend | None = None,
    merge_projections: bool = True,
) -> nn.Module:
    """Make ``model.generate`` run a compiled decode step with a static KV cache; returns the model.

    Works on any transformers causal LM whose attention supports a static cache (Llama, Mistral, Qwen2,
    SmolLM2, ...), patched by :func:`fastquant.patch` or not. Compiling takes tens of seconds on a small CPU
    (Inductor's on-disk cache makes it faster in later processes). With ``max_cache_len`` it happens here, on
    a 2-token dummy prompt, and the time is logged and kept in ``model._fastquant_decode``; without it the first
    ``generate`` compiles. A cache longer than any before it, a new batch size or a new dtype recompiles, so
    size the cache once for the longest request (prompt plus new tokens). A model on transformers' ``"sdpa"``
    attention is switched to ``"fastquant_sdpa"`` (same results; module docstring): on the CPU its decode step
    skips the cache's empty slots, elsewhere attention reads the whole static cache at every step, so an
    oversized cache costs time there.

    Args:
        max_cache_len: static cache length in tokens; None sizes it by the first call's prompt plus
            ``max_new_tokens`` (a later, longer call grows it and recompiles).
        fullgraph: require one graph for the whole decode step (an error instead of a silent graph break).
        mode: ``torch.compile`` mode; by default ``"reduce-overhead"`` on CUDA (CUDA graphs replay the step),
            ``"default"`` elsewhere.
        backend: ``"aoti"`` (the default on the CPU): the step exported and compiled ahead of time by
            AOTInductor, called without guards or a Python wrapper (see the module docstring; SmolLM2-135M int8
            decodes 1.28x faster than with ``"inductor"`` on 2 cores; the first compile of a shape takes about a
            minute there, later processes load it from disk in seconds); ``"inductor"`` (``torch.compile``; the
            default on CUDA, where CUDA graphs replay the step).
        merge_projections: with ``backend="aoti"``, fastquant int8/int4 layers that read the same input (q, k, v;
            gate, up) run as one call in the compiled step (:mod:`fastquant.siblings`; the same results; their
            weights are laid out as consecutive rows of one tensor, each layer keeping a view of its rows: no extra
            memory). SmolLM2-135M int8: 211 calls per token become 121.
    """
    from transformers import CompileConfig, GenerationMixin

    if not isinstance(model, GenerationMixin) or getattr(model, "generation_config", None) is None:
        raise TypeError(f"compile_for_decode needs a transformers model with generate(), got {type(model).__name__}")
    if max_cache_len is not None and max_cache_len < 2:
        raise ValueError(f"max_cache_len must be at least 2 tokens, got {max_cache_len}")
    if not isinstance(merge_projections, bool):
        raise ValueError(f"merge_projections must be True or False, got {merge_projections!r}")
    if backend not in (None, "inductor", "aoti"):
        raise ValueError(f"backend must be 'inductor' or 'aoti', got {backend!r}")
    device = next(model.parameters()).device
    if backend is None:
        backend = "aoti" if device.type == "cpu" else "inductor"
    if backend == "aoti" and device.type != "cpu":
        # CUDA graphs (mode "reduce-overhead", the default there) already replay the step without Python.
        raise ValueError(f"backend='aoti' is for CPU models; this model is on {device.type}: use backend='inductor'")
    if mode is None:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    config = CompileConfig(fullgraph=fullgraph, dynamic=False, mode=mode)
    # transformers compiles automatically only on accelerators; the CPU decode step gains as much (it is
    # overhead-bound at batch 1), so ask for it on every device.
    config._compile_all_devices = True
    # Models whose attention does not go through transformers' AttentionInterface keep theirs.
    can_switch = getattr(model, "_can_set_attn_implementation", lambda: False)()
    if can_switch and getattr(model.config, "_attn_implementation", None) == "sdpa":
        _register_attention()
        model.set_attn_implementation(PACKED_SDPA)
    generation = model.generation_config
    generation.cache_implementation = "static"
    generation.compile_config = config
    generation.max_cache_len = max_cache_len
    if backend == "aoti":
        # generate asks the model for its compiled step once per call (after the eager prefill); an instance
        # attribute answers instead of transformers' torch.compile.
        model.get_compiled_call = _AotiDecode(model, merge_projections)
    elif "get_compiled_call" in vars(model):
        del model.get_compiled_call

    warmup_seconds = None
    if max_cache_len is not None:
        start = time.perf_counter()
        prompt = torch.zeros((1, 2), dtype=torch.long, device=device)
        # Two new tokens: the prefill runs eagerly, the second step compiles (and runs) the decode graph. Under
        # generate's own no_grad, as a user's call runs: the graph is guarded on the grad mode.
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=2,
            eos_token_id=None,  # no end-of-text stop: the second token always runs the decode step
            do_sample=False,
            pad_token_id=0,
        )
        warmup_seconds = time.perf_counter() - start
        log.info("fastquant.compile_for_decode: decode step compiled in %.1f s", warmup_seconds)
    model._fastquant_decode = DecodeCompileInfo(mode, fullgraph, max_cache_len, warmup_seconds, backend)
    return model


# ---------------------------------------------------------------------------------------------------- attention
PACKED_SDPA = "fastquant_sdpa"


def packed_sdpa_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' ``sdpa`` attention, with a one-token step run on the key/value heads also when traced: query
    (B, H, 1, D) becomes (B, H_kv, H / H_kv, D), one query row per head of a group, against the cache's
    (B, H_kv, S, D) keys and values as they are (no copy), by ``fastquant.decode_attention`` on the CPU (torch's
    SDPA elsewhere, or when a gradient is wanted). The shapes are static in the decode graph, so the test on the
    query's length is decided once, at trace time. Every other call is transformers' own."""
    from transformers.integrations.sdpa_attention import pack_gqa, sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None and dropout == 0.0
    if query.shape[2] != 1 or not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    from fastquant.kernels.ops import decode_attention

    query, mask = pack_gqa(query, groups), pack_gqa(attention_mask, groups)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if query.device.type == "cpu" and not grad:
        # fastquant's CPU kernel: torch's flash attention spends ~30 us per call around this small product.
        out = decode_attention(query, key, value, mask, scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(out.shape[0], -1, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    # The masks sdpa gets: without a registered mask function transformers would build none at all.
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)


# ----------------------------------------------------------------------------------------------- AOTInductor
class _StepModule(nn.Module):
    """The decode step as a function of tensors only, for ``torch.export``: the static cache's per-layer keys,
    values and lengths come in as inputs (mutated in place), so the compiled step writes the very tensors that
    generate's cache object holds and that the eager prefill filled."""

    def __init__(self, model: nn.Module, cache: Any, cache_kwarg: str, logits_to_keep: int | None) -> None:
        super().__init__()
        self.model = model
        self.cache = cache
        self.cache_kwarg = cache_kwarg
        self.logits_to_keep = logits_to_keep

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None,
        keys: list[Tensor],
        values: list[Tensor],
        lengths: list[Tensor],
    ) -> Tensor:
        for layer, k, v, n in zip(self.cache.layers, keys, values, lengths, strict=True):
            layer.keys, layer.values, layer.cumulative_length = k, v, n
        extra = {} if self.logits_to_keep is None else {"logits_to_keep": self.logits_to_keep}
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=True,
            **{self.cache_kwarg: self.cache},
            **extra,
        )
        return out.logits


def _cache_tensor_objects(cache: Any) -> list[Any]:
    """Every layer's keys, then values, then lengths (None where a layer has none): the step's input order."""
    layers = getattr(cache, "layers", ())
    return (
        [getattr(layer, "keys", None) for layer in layers]
        + [getattr(layer, "values", None) for layer in layers]
        + [getattr(layer, "cumulative_length", None) for layer in layers]
    )


def _cache_tensors(cache: Any) -> list[Tensor] | None:
    """A fully initialized static cache's tensors in the step's input order (every layer's keys, then values,
    then lengths), else None."""
    layers = getattr(cache, "layers", None)
    if not getattr(cache, "is_compileable", False) or not layers:
        return None
    if not all(getattr(layer, "is_initialized", False) for layer in layers):
        return None
    tensors = _cache_tensor_objects(cache)
    return tensors if all(isinstance(t, Tensor) for t in tensors) else None


def _live_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters and buffers under the names the exported step gives them (``model.<name>``)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return {f"model.{name}": t for name, t in tensors.items()}


def _meta(t: Tensor | None) -> tuple:
    return None if t is None else (tuple(t.shape), t.dtype, t.device.type)


def _layouts(tensors: list[Tensor]) -> list[tuple]:
    return [(t.shape, t.dtype, t.is_cpu) for t in tensors]


@dataclass
class _LastStep:
    """The previous step's cache, its tensors (in the library's input order) with their shapes, dtypes and
    devices, and the library that served it."""

    cache: Any
    step_key: tuple
    cache_tensors: list[Tensor]
    layouts: list[tuple]
    library: Any

    def holds(self, cache: Any) -> bool:
        """Whether ``cache`` still holds the very same tensors, of the same shapes, dtypes and devices (a tensor
        can be resized or given new data in place)."""
        now = _cache_tensor_objects(cache)
        return (
            len(now) == len(self.cache_tensors)
            and all(a is b for a, b in zip(now, self.cache_tensors, strict=True))
            and _layouts(self.cache_tensors) == self.layouts
        )


class _AotiDecodeStep:
    """generate's compiled step, backed by AOTInductor libraries (one per input signature).

    An AOTI library checks nothing about its inputs, so this class does: a call it can serve has only the
    keyword arguments of a decode step, a 4-D attention mask (the static cache's, of fixed shape) or none, and a
    fully initialized static cache; the library is chosen by the shapes and dtypes of all inputs. Any other call
    goes to ``torch.compile``'s step (same results, with guards)."""

    def __init__(self, model: nn.Module, merge_siblings: bool = True) -> None:
        self.model = model
        self.merge_siblings = merge_siblings
        self.libraries: dict[tuple, Any] = {}
        self.constants: dict[str, Tensor] = {}
        self.fallback_reasons: set[str] = set()
        self.last: _LastStep | None = None

    def _fallback(self, reason: str, kwargs: dict[str, Any]) -> Any:
        if reason not in self.fallback_reasons:
            self.fallback_reasons.add(reason)
            warnings.warn(
                f"fastquant.compile_for_decode(backend='aoti'): {reason}; this call runs torch.compile's step",
                stacklevel=3,
            )
        compiled = type(self.model).get_compiled_call(self.model, self.model.generation_config.compile_config)
        return compiled(**kwargs)

    def __call__(self, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        unknown = sorted(k for k, v in kwargs.items() if k not in _STEP_KWARGS and v is not None and k != "return_dict")
        if unknown:
            return self._fallback(f"arguments {unknown} are not part of the exported step", kwargs)
        cache_kwarg = "cache" if "cache" in kwargs else "past_key_values"
        cache = kwargs.get(cache_kwarg)
        ids, positions, mask = kwargs.get("input_ids"), kwargs.get("position_ids"), kwargs.get("attention_mask")
        if not getattr(cache, "is_compileable", False):
            return self._fallback("the cache is not an initialized static cache", kwargs)
        if not isinstance(ids, Tensor) or ids.dim() != 2 or not isinstance(positions, Tensor):
            return self._fallback("input_ids and position_ids must be tensors", kwargs)
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 4):
            # A 2-D mask grows by a token per step: a new library each step.
            return self._fallback("the attention mask is not the static cache's 4-D mask", kwargs)
        step_key = (cache_kwarg, kwargs.get("logits_to_keep"), _meta(ids), _meta(positions), _meta(mask))
        last = self.last
        # generate calls the step once per token with the same cache and the same cache tensors: the full
        # signature (a tuple of the shapes of every layer's keys, values and lengths, hashed: ~0.2 ms per SmolLM2 step)
        # is rebuilt only when the cache, one of its tensors or any shape or dtype changed.
        if last is None or last.cache is not cache or last.step_key != step_key or not last.holds(cache):
            last = self.last = self._lookup(cache, step_key, ids, positions, mask)
            if last is None:
                return self._fallback("the cache is not an initialized static cache", kwargs)
        inputs = [ids, positions] + ([] if mask is None else [mask]) + last.cache_tensors
        (logits,) = last.library.loader.boxed_run(inputs)
        return CausalLMOutputWithPast(logits=logits, **{cache_kwarg: cache})

    def _lookup(
        self, cache: Any, step_key: tuple, ids: Tensor, positions: Tensor, mask: Tensor | None
    ) -> _LastStep | None:
        """The library for this step's full signature, built if new; None when the cache cannot be served."""
        cache_tensors = _cache_tensors(cache)
        if cache_tensors is None:
            return None
        n = len(cache_tensors) // 3
        keys, values, lengths = cache_tensors[:n], cache_tensors[n : 2 * n], cache_tensors[2 * n :]
        signature = (*step_key, tuple(_meta(t) for t in cache_tensors))
        library = self.libraries.get(signature)
        if library is None:
            cache_kwarg, logits_to_keep = step_key[:2]
            step = _StepModule(self.model, cache, cache_kwarg, logits_to_keep)
            library = self.libraries[signature] = self._build(step, (ids, positions, mask, keys, values, lengths))
        return _LastStep(cache, step_key, cache_tensors, _layouts(cache_tensors), library)

    def _build(self, step: _StepModule, args: tuple) -> Any:
        start = time.perf_counter()
        saved = [(layer.keys, layer.values, layer.cumulative_length) for layer in step.cache.layers]
        groups = []
        if self.merge_siblings:
            # One eager one-token forward without the cache shows which layers read the same tensor.
            ids = torch.zeros((args[0].shape[0], 1), dtype=args[0].dtype, device=args[0].device)
            try:
                groups = siblings.find(self.model, {"input_ids": ids, "use_cache": False})
            except Exception as error:  # a model whose forward wants more than token ids: the step runs unmerged
                warnings.warn(
                    f"fastquant.compile_for_decode: the probe forward that finds layers to merge failed ({error!r}); "
                    "every layer runs alone",
                    stacklevel=2,
                )
        try:
            with torch.no_grad(), siblings.merged(self.model, groups):
                exported = torch.export.export(step, args, strict=False)
        finally:
            # Export traced with fake tensors and left them in the cache's layers.
            for layer, (k, v, n) in zip(step.cache.layers, saved, strict=True):
                layer.keys, layer.values, layer.cumulative_length = k, v, n
        live = _live_tensors(self.model)
        constants = {**exported.constants, **{name: live.get(name, t) for name, t in exported.state_dict.items()}}
        library, path = _load_or_compile(exported, constants)
        # The library reads the model's own tensors: no copy of the weights. They are kept alive here.
        self.constants.update(constants)
        library.load_constants(
            {name: constants[name] for name in library.get_constant_fqns()}, check_full_update=True, user_managed=True
        )
        log.info(
            "fastquant.compile_for_decode: AOTInductor step ready in %.1f s (%s)", time.perf_counter() - start, path
        )
        return library


def _load_or_compile(exported: Any, constants: dict[str, Any]) -> tuple[Any, Path]:
    """The AOTInductor library of an exported step, from Inductor's cache directory or compiled into it.

    A library reads most constants from the caller at run time (its ``get_constant_fqns``) but may bake others into
    its code (the rotary ``inv_freq`` buffer, for one): it can serve another model only if those are equal. So the
    cache is two-level: ``<structure>.json`` (keyed by torch's version, the CPU ISA Inductor compiles for, the
    graph's code and the names, shapes and dtypes of inputs and constants) lists the run-time constants of that
    structure's library, and ``<structure>/<values>.pt2`` is keyed by the values of all the other constants."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    h = hashlib.sha256()
    h.update(f"{torch.__version__}|{pick_vec_isa()}|{exported.graph_module.code}|{exported.call_spec}".encode())
    # The code need not name the inputs' shapes (a cache length, a batch size): the library is built for them.
    for node in exported.graph_module.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, Tensor):
                h.update(f"{node.name}:{tuple(val.shape)}:{tuple(val.stride())}:{val.dtype}".encode())
    for name in sorted(constants):
        t = constants[name]
        h.update(f"{name}:{_meta(t) if isinstance(t, Tensor) else type(t).__name__}".encode())
    structure = Path(cache_dir()) / "fastquant-decode" / h.hexdigest()[:32]
    index = structure.with_suffix(".json")

    def values_path(runtime: set[str]) -> Path:
        v = hashlib.sha256()
        for name in sorted(set(constants) - runtime):
            t = constants[name]
            if isinstance(t, Tensor):
                v.update(name.encode() + t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return structure / f"{v.hexdigest()[:32]}.pt2"

    if index.is_file():
        path = values_path(set(json.loads(index.read_text())))
        if path.is_file():
            return torch._inductor.aoti_load_package(str(path)), path
    structure.mkdir(parents=True, exist_ok=True)
    tmp = structure / f"compiling-{os.getpid()}.pt2"
    torch._inductor.aoti_compile_and_package(
        exported, package_path=str(tmp), inductor_configs={"aot_inductor.package_constants_in_so": False}
    )
    library = torch._inductor.aoti_load_package(str(tmp))
    runtime = library.get_constant_fqns()
    path = values_path(set(runtime))
    # Written then renamed: a process that finds a file finds it whole.
    index_tmp = index.with_suffix(f".{os.getpid()}.tmp")
    index_tmp.write_text(json.dumps(sorted(runtime)))
    os.replace(index_tmp, index)
    os.replace(tmp, path)
    return library, path


class _AotiDecode:
    """Stands in for ``model.get_compiled_call``: generate asks it for the step once per call. Each time, the
    libraries' constants are checked against the model's current tensors (a weight replaced or moved since, e.g.
    by ``load_state_dict(assign=True)`` or ``model.to``): on any difference the libraries are dropped and rebuilt
    on the next step, so a step never reads a weight the model no longer has."""

    def __init__(self, model: nn.Module, merge_siblings: bool = True) -> None:
        self.step = _AotiDecodeStep(model, merge_siblings)

    # A copy (copy.deepcopy, pickle) of a compiled model gets no libraries: theirs read the original's tensors
    # through raw pointers. Its first decode step loads them again from the disk cache against its own tensors.
    def __deepcopy__(self, memo: dict[int, Any]) -> _AotiDecode:
        import copy

        return _AotiDecode(copy.deepcopy(self.step.model, memo), self.step.merge_siblings)

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.step.model, "merge_siblings": self.step.merge_siblings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.step = _AotiDecodeStep(state["model"], state.get("merge_siblings", True))

    def __call__(self, compile_config: Any = None) -> _AotiDecodeStep:
        step = self.step
        if step.constants:
            live = _live_tensors(step.model)
            stale = any(
                name in live and (live[name] is not t or live[name].data_ptr() != t.data_ptr())
                for name, t in step.constants.items()
            )
            if stale:
                step.libraries.clear()
                step.constants.clear()
                step.last = None
        return step
