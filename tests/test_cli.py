"""The ``fastquant`` command and the measurements behind it, on tiny random models saved as folders."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fastquant
from fastquant import Int8Linear, SparseLinear, cli
from fastquant.evaluate import METHODS, MethodOptions, model_bytes, perplexity, sentences
from fastquant.models import read_text
from fastquant.pruning import calibration_from_text

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _tokenizer(vocab_size: int):
    """A small BPE tokenizer trained on the embedded play, so tiny models get real token ids offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "[PAD]", "[CLS]", "[SEP]"])
    tok.train_from_iterator(read_text().splitlines(), trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    _tokenizer(512).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=512
    )
    transformers.BertModel(config).save_pretrained(folder)
    _tokenizer(512).save_pretrained(folder)
    return folder


def test_compress_writes_a_loadable_checkpoint(llama_dir, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["compress", str(llama_dir), "--method", "int8+lm_head", "-o", str(out)]) == 0
    ckpt = out / "model.fastquant.safetensors"
    assert ckpt.is_file() and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()

    config = transformers.AutoConfig.from_pretrained(out)
    loaded = fastquant.load(transformers.AutoModelForCausalLM.from_config(config).eval(), ckpt)
    expected = fastquant.patch(
        transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval(),
        "int8",
        skip=(),
        quantize_tied=True,
    )
    assert isinstance(loaded.lm_head, Int8Linear)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)


def test_eval_causal_lm(llama_dir, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(llama_dir), "--method", "int8", "--tokens", "300", "--window", "128"]
    assert cli.main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "causal-lm" and result["tokens"] == 300
    # A random model predicts close to uniformly over its 512 tokens.
    assert 300 < result["perplexity_float"] < 900
    assert abs(result["perplexity_delta_pct"]) < 1.0
    assert result["compressed_bytes"] < result["float_bytes"]


def test_eval_encoder_cosine(bert_dir, tmp_path):
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--model", str(bert_dir), "--sentences", "40", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "encoder" and result["sentences"] == 40
    assert 0.99 < result["cosine_mean"] <= 1.0 + 1e-6
    assert result["cosine_min"] <= result["cosine_mean"]


def test_bad_arguments_give_exit_code_2(llama_dir, tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tmp_path / "nowhere")]) == 2
    assert "transformers folder" in capsys.readouterr().out
    assert cli.main(["eval", "--model", str(llama_dir), "--method", "int3"]) == 2
    assert "unknown method 'int3'" in capsys.readouterr().out


def test_every_method_in_the_registry_compresses(llama_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_dir)
    options = MethodOptions(
        calibration=lambda: calibration_from_text(tokenizer, read_text(), n_sequences=4, seq_len=64), progress=False
    )
    for name, method in METHODS.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
        before = model_bytes(model)
        method.apply(model, options)
        rows = [row for row in fastquant.report(model).layers if row.name != "lm_head"]
        if "sparse" in name:
            # every layer pruned by half; the tiny layers may keep their faster dense kernels
            assert rows and all("50% pruned" in row.note for row in rows), name
            for module in model.modules():
                if isinstance(module, (Int8Linear, SparseLinear)):
                    assert (module.dequantize() == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), name
        else:
            assert any(isinstance(m, Int8Linear) for m in model.modules()), name
            assert model_bytes(model) < before, name


def test_eval_sparse_method(llama_dir, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(llama_dir), "--method", "int8+sparse", "--pruning", "wanda", "--sparsity", "0.6"]
    assert (
        cli.main([*args, "--calibration-sequences", "4", "--tokens", "300", "--window", "128", "--json", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    assert result["method"] == "int8+sparse" and result["compressed_bytes"] < result["float_bytes"]
    assert math.isfinite(result["perplexity_compressed"]) and result["perplexity_compressed"] > 1


def test_perplexity_scores_each_token_once(llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = model(ids[None]).logits[0, :-1]
    full = math.exp(torch.nn.functional.cross_entropy(logits, ids[1:]).item())
    assert perplexity(model, ids, window=300, stride=150) == pytest.approx(full, rel=1e-5)
    # A short window sees less context, but on a random model context barely matters: same value, within 2%.
    assert perplexity(model, ids, window=64, stride=32) == pytest.approx(full, rel=0.02)


def test_sentences_are_dialogue():
    texts = sentences(read_text(), limit=50)
    assert len(texts) == 50
    assert all(len(t) >= 30 and not t.isupper() and not t.startswith("[") for t in texts)
