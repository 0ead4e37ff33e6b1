"""Tiny llama models, tokenizers and GGUF files made in the tests (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastquant.app.models import read_text

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS = 128, 256, 4, 2, 2


def byte_level_tokenizer(vocab_size: int):
    """A GPT-2 style byte-level BPE tokenizer trained on the embedded play (the kind GGUF calls "gpt2")."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(read_text().splitlines(), trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def tiny_llama(vocab_size: int = 320, tie: bool = True, seed: int = 0, std: float = 0.2):
    """A random 2-layer llama (GQA: 4 heads, 2 KV heads) with every linear dimension a multiple of 32. Weights
    are N(0, std): larger than llama's init so that logits vary and perplexities differ between layouts."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)  # not all ones: a norm loaded in the wrong place must show
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """How llama.cpp's convert_hf_to_gguf.py stores Q and K rows (its rotary layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def write_llama_gguf(
    model,
    path: Path,
    linear_type: str = "Q8_0",
    types: dict[str, str] | None = None,
    embed_type: str = "Q8_0",
    arch: str = "llama",
    embedding_length: int | None = None,
) -> Path:
    """A GGUF file the way llama.cpp's converter writes one, with gguf's own quantizers: every linear weight
    as ``linear_type`` (``types`` overrides per GGUF tensor name), Q/K rows permuted, norms F32."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(embedding_length or config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    types = types or {}

    def add(name: str, weight: torch.Tensor, qtype: str) -> None:
        w = weight.detach().float().numpy()
        qt = gguf.GGMLQuantizationType[types.get(name, qtype)]
        if qt == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, w)
        elif qt == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qt), raw_dtype=qt)

    add("token_embd.weight", model.model.embed_tokens.weight, embed_type)
    for i, layer in enumerate(model.model.layers):
        add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight, "F32")
        add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight, "F32")
        for hf, module in [*layer.self_attn.named_children(), *layer.mlp.named_children()]:
            if hf not in GGUF_NAMES:
                continue
            w = module.weight.detach()
            if hf == "q_proj":
                w = torch.from_numpy(llama_cpp_permute(w.numpy(), config.num_attention_heads))
            elif hf == "k_proj":
                w = torch.from_numpy(llama_cpp_permute(w.numpy(), config.num_key_value_heads))
            add(f"blk.{i}.{GGUF_NAMES[hf]}.weight", w, linear_type)
    add("output_norm.weight", model.model.norm.weight, "F32")
    if not config.tie_word_embeddings:
        add("output.weight", model.lm_head.weight, linear_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
