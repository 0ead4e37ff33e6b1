"""fastquant.save / fastquant.load (and fastquant.from_pretrained): compressed checkpoints as safetensors, never pickle.

File layout: one ``.safetensors`` file. The manifest is a JSON string stored in the safetensors header
metadata under the key ``"fastquant"`` (so one file carries weights and manifest and cannot drift apart):

    {"format": "fastquant", "format_version": 1, "fastquant_version": "...", "method": "int8",
     "model_class": "LlamaForCausalLM",
     "layers": {"model.layers.0.self_attn.q_proj": {"type": "int8", "in_features": 576,
                "out_features": 576, "bias": false, "group_size": null, "dtype": "float32",
                "int8_activations": false}, ...},
     "tensors": {"<state-dict name>": {"sha256": "...", "dtype": "int8", "shape": [576, 576]}, ...},
     "aliases": {"lm_head.weight": "model.embed_tokens.weight"}}

``fastquant compress`` writes it as :data:`CHECKPOINT_FILE` in its output folder, next to the model's
config and tokenizer; :func:`load` accepts that folder or the file itself.

Tensors that share storage (tied embeddings) are written once; ``aliases`` maps the other names to it.
Loading reads the header with the safetensors parser (no code execution), checks the version, the
architecture (every state-dict name and shape) and every tensor's sha256 before touching the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from fastquant.modules import Int4Linear, Int8Linear, SparseLinear, check_int4_padding, is_quantizable_linear

FORMAT_NAME = "fastquant"
FORMAT_VERSION = 1
# Encrypted checkpoints (fastquant.protect) are version 2, so that readers without decryption refuse them.
READ_FORMAT_VERSION = 2
METADATA_KEY = "fastquant"
CHECKPOINT_FILE = "model.fastquant.safetensors"
# dtype names a manifest may use, looked up in this table (never with getattr on torch).
_MANIFEST_DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16", "int8")}


class FastquantFormatError(ValueError):
    """A checkpoint that cannot be loaded: truncated, corrupted, tampered, too new, or for another model."""


def _sha256(tensor: torch.Tensor) -> str:
    # Hash the raw little-endian bytes as written, so any flipped byte in the file changes the digest.
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layer_params(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per compressed layer: what it takes to rebuild it in an uncompressed model of the same architecture."""
    layers: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, Int8Linear):
            layers[name] = {"type": "int8", **_common_params(module), "int8_activations": module.int8_activations}
        elif isinstance(module, Int4Linear):
            layers[name] = {
                "type": "int4",
                **_common_params(module),
                "symmetric": module.symmetric,
                "int8_activations": module.int8_activations,
            }
        elif isinstance(module, SparseLinear):
            layers[name] = {
                "type": "sparse",
                **_common_params(module),
                "values_dtype": _dtype_name(module.values.dtype),
                "n_values": module.values.numel(),
                "pattern": module.pattern,
                "layout": module.layout,
            }
    return layers


def _common_params(module: nn.Module) -> dict[str, Any]:
    """The entries every compressed layer has."""
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
        "group_size": module.group_size,
        "dtype": _dtype_name(module.dtype),
    }


def save(model: nn.Module, path: str | os.PathLike, *, method: str | None = None) -> dict[str, Any]:
    """Write a patched (or plain) model's weights to ``path`` (safetensors with the manifest in its header).

    Returns the manifest. ``method`` is recorded for people reading the file; loading relies on the
    per-layer entries only.
    """
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.dtype,
        )
        if key in seen:  # tied weight: same storage and view, store it once
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    layers = layer_params(model)
    if method is None:
        types = sorted({spec["type"] for spec in layers.values()})
        method = "+".join(types) if types else "float"
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fastquant_version": _fastquant_version(),
        "method": method,
        "model_class": type(model).__name__,
        "layers": layers,
        "tensors": {
            n: {"sha256": _sha256(t), "dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for n, t in tensors.items()
        },
        "aliases": aliases,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(manifest, sort_keys=True)})
    # safetensors creates the file private (0600); a checkpoint is shared like any other output file.
    path.chmod(0o666 & ~_umask())
    return manifest


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def checkpoint_path(path: str | os.PathLike) -> Path:
    """The checkpoint file for ``path``: the file itself, or :data:`CHECKPOINT_FILE` in a folder (what
    ``fastquant compress -o FOLDER`` writes). Raises FileNotFoundError naming the file expected."""
    path = Path(path)
    if path.is_dir():
        file = path / CHECKPOINT_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"no fastquant checkpoint in the folder {path}: expected {file} (written by "
                "`fastquant compress -o FOLDER` or fastquant.save)"
            )
        return file
    if not path.is_file():
        raise FileNotFoundError(
            f"no fastquant checkpoint at {path}: no such file (give the .safetensors file fastquant.save wrote, "
            f"or the folder `fastquant compress` wrote, which holds {CHECKPOINT_FILE})"
        )
    return path


def _fastquant_version() -> str:
    import fastquant

    return fastquant.__version__


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a fastquant checkpoint (a file, or a folder holding :data:`CHECKPOINT_FILE`), validated
    for format and version (tensors not read)."""
    path = checkpoint_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise FastquantFormatError(f"{path}: not a readable safetensors file (truncated or corrupted?): {exc}") from exc
    if METADATA_KEY not in metadata:
        raise FastquantFormatError(f"{path}: safetensors file without a fastquant manifest")
    try:
        manifest = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise FastquantFormatError(f"{path}: the fastquant manifest is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise FastquantFormatError(f"{path}: the manifest does not describe a fastquant checkpoint")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise FastquantFormatError(f"{path}: manifest has no integer format_version")
    if version > READ_FORMAT_VERSION:
        raise FastquantFormatError(
            f"{path}: written with checkpoint format version {version} (fastquant "
            f"{manifest.get('fastquant_version', '?')}); this fastquant reads up to version "
            f"{READ_FORMAT_VERSION}: upgrade fastquant"
        )
    for key in ("layers", "tensors", "aliases"):
        if not isinstance(manifest.get(key), dict):
            raise FastquantFormatError(f"{path}: manifest entry {key!r} is missing or not a mapping")
    return manifest


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _build_layer(name: str, spec: Any, path: Path, device: str) -> nn.Module:
    if not isinstance(spec, dict) or spec.get("type") not in ("int8", "int4", "sparse"):
        kind = spec.get("type") if isinstance(spec, dict) else spec
        raise FastquantFormatError(f"{path}: layer {name!r} has unknown type {kind!r}")
    try:
        dtype = _MANIFEST_DTYPES[spec["dtype"]]
        shape = (int(spec["in_features"]), int(spec["out_features"]))
        # Absent in files written before the option: x used as it is.
        int8_activations = spec.get("int8_activations", False)
        if spec["type"] == "int8":
            return Int8Linear(
                *shape,
                bool(spec["bias"]),
                spec["group_size"],
                device=device,
                dtype=dtype,
                int8_activations=int8_activations,
            )
        if spec["type"] == "int4":
            if not isinstance(spec["symmetric"], bool):
                raise ValueError(f"symmetric must be true or false, got {spec['symmetric']!r}")
            if not isinstance(spec["group_size"], int):
                raise ValueError(f"group_size must be an integer, got {spec['group_size']!r}")
            return Int4Linear(
                *shape,
                bool(spec["bias"]),
                spec["group_size"],
                spec["symmetric"],
                device=device,
                dtype=dtype,
                int8_activations=int8_activations,
            )
        return SparseLinear(
            *shape,
            int(spec["n_values"]),
            bool(spec["bias"]),
            _MANIFEST_DTYPES[spec["values_dtype"]],
            spec["group_size"],
            str(spec["pattern"]),
            device=device,
            dtype=dtype,
        )
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise FastquantFormatError(f"{path}: invalid manifest entry for layer {name!r}: {exc}") from exc


def _check_layer_sizes(manifest: dict[str, Any], path: Path) -> None:
    """Every layer's tensors, built on the meta device (no memory), must match the stored tensors' shapes.

    The stored shapes were checked against the file's bytes, so a manifest claiming a huge layer is refused
    here instead of allocating it."""
    tensors, aliases = manifest["tensors"], manifest["aliases"]
    for name, spec in manifest["layers"].items():
        layer = _build_layer(name, spec, path, "meta")
        for key, want in layer.state_dict().items():
            full = f"{name}.{key}"
            entry = tensors.get(aliases.get(full, full))
            if entry is None:
                raise FastquantFormatError(f"{path}: layer {name!r} needs tensor {full!r}, which is not stored")
            if entry["shape"] != list(want.shape) or entry["dtype"] != _dtype_name(want.dtype):
                raise FastquantFormatError(
                    f"{path}: invalid manifest entry for layer {name!r}: it implies {full!r} of "
                    f"{_dtype_name(want.dtype)}{list(want.shape)}, "
                    f"the file stores {entry['dtype']}{entry['shape']} (file edited?)"
                )


def _patch_to_match(model: nn.Module, layers: dict[str, dict[str, Any]], path: Path) -> None:
    for name, spec in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise FastquantFormatError(f"{path}: architecture mismatch: the model has no layer {name!r}") from exc
        if isinstance(module, (Int8Linear, Int4Linear, SparseLinear)):
            continue  # already patched (e.g. loading into a model patched the same way)
        if not is_quantizable_linear(module):
            raise FastquantFormatError(
                f"{path}: architecture mismatch: {name!r} is a {type(module).__name__}, "
                "the checkpoint has a linear layer"
            )
        _set_submodule(model, name, _build_layer(name, spec, path, "cpu"))


def _check_aliases(model: nn.Module, aliases: dict[str, str], path: Path) -> None:
    """An alias is only a tie the model itself has: an edited alias would otherwise load one tensor in two places."""
    state = model.state_dict(keep_vars=True)
    for name, src in aliases.items():
        a, b = state[name], state[src]
        if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() or a.storage_offset() != b.storage_offset():
            raise FastquantFormatError(
                f"{path}: manifest alias {name!r} -> {src!r} is not a tie in the model (file edited?)"
            )


def load(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    verify: bool = True,
    trusted_keys: Iterable[Any] | None = None,
    decryption_key: bytes | None = None,
) -> nn.Module:
    """Load a checkpoint written by :func:`save` into ``model`` (a float model of the same architecture).

    ``path``: the checkpoint file, or the folder ``fastquant compress`` wrote (see :func:`checkpoint_path`);
    :func:`fastquant.from_pretrained` also rebuilds the model from that folder.

    The model is patched to match the checkpoint's per-layer manifest, then every weight is copied in.
    Raises :class:`FastquantFormatError` (a ValueError) naming the problem when the file is truncated,
    corrupted, edited, newer than this fastquant, or for a different architecture. Returns the model.

    Protected checkpoints (see :mod:`fastquant.protect`): with ``trusted_keys`` (Ed25519 public keys, raw bytes
    or PEM files) the manifest must carry a valid signature by one of them, and hashes are always verified; an
    encrypted checkpoint is decrypted with ``decryption_key`` or the key in ``$FASTQUANT_KEY`` /
    ``$FASTQUANT_KEY_FILE``. Signature, key and sizes are checked before anything is allocated, and every tensor
    is read and verified before the model is touched.
    """
    from fastquant import protect
    from fastquant.kernels import ops

    path = checkpoint_path(path)
    manifest = read_manifest(path)
    try:
        verified = protect.check_before_loading(
            path, manifest, trusted_keys=trusted_keys, decryption_key=decryption_key
        )
    except protect.ProtectionError as exc:
        raise FastquantFormatError(str(exc)) from exc
    verify = verify or trusted_keys is not None
    expected_class = manifest.get("model_class")
    if expected_class and expected_class != type(model).__name__:
        raise FastquantFormatError(
            f"{path}: architecture mismatch: checkpoint is for {expected_class}, got {type(model).__name__}"
        )
    stored = set(manifest["tensors"])
    aliases = manifest["aliases"]
    if any(not isinstance(src, str) or src not in stored for src in aliases.values()):
        raise FastquantFormatError(f"{path}: manifest aliases point to tensors that are not stored")
    _check_layer_sizes(manifest, path)

    loaded: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in stored:
                tensor = f.get_tensor(name)
                entry = manifest["tensors"][name]
                if verify and _sha256(tensor) != entry.get("sha256"):
                    raise FastquantFormatError(f"{path}: tensor {name!r} fails its sha256 check (corrupted or edited)")
                loaded[name] = verified.decrypt(name, tensor, entry)
    except SafetensorError as exc:
        raise FastquantFormatError(f"{path}: cannot read tensors (truncated or corrupted?): {exc}") from exc
    except protect.ProtectionError as exc:
        raise FastquantFormatError(str(exc)) from exc

    _patch_to_match(model, manifest["layers"], path)
    target = model.state_dict()
    file_names = stored | set(aliases)
    missing = sorted(set(target) - file_names)
    unexpected = sorted(file_names - set(target))
    if missing or unexpected:
        raise FastquantFormatError(
            f"{path}: architecture mismatch: {len(missing)} model tensors not in the checkpoint "
            f"{missing[:5]}, {len(unexpected)} checkpoint tensors not in the model {unexpected[:5]}"
        )
    _check_aliases(model, aliases, path)
    for name, src in aliases.items():
        loaded[name] = loaded[src]
    for name, tensor in loaded.items():
        want = target[name]
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
            raise FastquantFormatError(
                f"{path}: architecture mismatch at {name!r}: checkpoint {_dtype_name(tensor.dtype)}"
                f"{list(tensor.shape)}, model {_dtype_name(want.dtype)}{list(want.shape)}"
            )
    for name, spec in manifest["layers"].items():
        if spec["type"] == "int4":
            # Codes past K are padding that every kernel skips; nonzero ones mean the bytes are not what was saved.
            try:
                check_int4_padding(loaded[f"{name}.qweight"], int(spec["in_features"]))
            except ValueError as exc:
                raise FastquantFormatError(f"{path}: layer {name!r}: {exc}") from exc
        if isinstance(model.get_submodule(name), SparseLinear):
            # Both layouts read values through row_offsets: masks and offsets must agree before any kernel runs.
            try:
                ops.check_sparse_linear_contents(
                    loaded[f"{name}.values"],
                    loaded[f"{name}.masks"],
                    loaded[f"{name}.row_offsets"],
                    int(manifest["layers"][name]["in_features"]),
                )
            except RuntimeError as exc:
                raise FastquantFormatError(f"{path}: layer {name!r}: {exc}") from exc
    with torch.no_grad():
        model.load_state_dict(loaded, strict=True)
    for name, spec in manifest["layers"].items():
        module = model.get_submodule(name)
        if isinstance(module, SparseLinear):
            try:
                module.set_layout(spec.get("layout", "bitmap16"))
            except ValueError as exc:
                raise FastquantFormatError(f"{path}: invalid manifest entry for layer {name!r}: {exc}") from exc
        elif isinstance(module, (Int8Linear, Int4Linear)):
            # A layer patched before loading computes as the checkpoint says (a bool: _build_layer checked it).
            module.int8_activations = spec.get("int8_activations", False)
    model._fastquant_notes = {name: "loaded from checkpoint" for name in manifest["layers"]}
    model._fastquant_errors = {}  # the float weights are not in the checkpoint
    model._fastquant_checkpoint = {"path": str(path), "signer": verified.signer, "encrypted": verified.encrypted}
    return model


def from_pretrained(folder: str | os.PathLike, **load_options: Any) -> tuple[nn.Module, object | None]:
    """Rebuild the model that ``fastquant compress -o FOLDER`` wrote, in one call: the architecture from its
    config.json, the compressed layers and weights from its checkpoint (:func:`fastquant.load`), and its
    tokenizer where the folder has one. Returns ``(model, tokenizer or None)``, the model in eval mode.
    ``load_options`` go to :func:`fastquant.load` (``trusted_keys``, ``decryption_key`` for protected ones)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    checkpoint = checkpoint_path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder}: expected {folder / 'config.json'} (the model config `fastquant compress` writes next to "
            f"{checkpoint.name}); without it, build the model yourself and call fastquant.load(model, {folder})"
        )
    config = AutoConfig.from_pretrained(folder)
    loader = AutoModelForCausalLM if model_kind(config) == "causal-lm" else AutoModel
    # The float tensors (embeddings, norms) are stored in the activation dtype of the compressed layers.
    layer_dtypes = {spec.get("dtype") for spec in read_manifest(checkpoint)["layers"].values()}
    dtype = _MANIFEST_DTYPES.get(layer_dtypes.pop(), torch.float32) if len(layer_dtypes) == 1 else torch.float32
    model = loader.from_config(config, dtype=dtype)
    load(model, checkpoint, **load_options)
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer(folder) else None
    return model.eval(), tokenizer


def model_kind(config) -> str:
    """ "causal-lm" or "encoder": which transformers auto class builds a model of this config."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or config.model_type in (
        "llama",
        "gpt2",
        "mistral",
        "qwen2",
    ):
        return "causal-lm"
    return "encoder"


def has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
