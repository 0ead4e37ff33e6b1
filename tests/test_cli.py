"""The ``fastquant`` command and the measurements behind it, on tiny random models saved as folders."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fastquant
from fastquant import Int4Linear, Int8Linear, SparseLinear
from fastquant.algorithms.pruning import calibration_from_text
from fastquant.app import cli
from fastquant.app.evaluate import METHODS, MethodOptions, model_bytes, perplexity, sentences
from fastquant.app.models import read_text
from fastquant.serialization import read_manifest
from helpers import tiny_llama_config

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


def save_tiny_llama(folder, hidden: int, intermediate: int, kv_heads: int, vocab: int):
    """A random 2-layer Llama (tied embeddings) and a word-level tokenizer of ``vocab`` tokens, saved in ``folder``."""
    torch.manual_seed(0)
    config = tiny_llama_config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    _tokenizer(vocab).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), 128, 256, 2, 512)


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
            assert any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules()), name
            assert model_bytes(model) < before, name


def test_int8_activations_reach_the_int8_and_int4_methods_only(llama_dir):
    """MethodOptions(int8_activations=True): every int8/int4 method sets it on the layers it makes; the sparse
    methods refuse it (their layers have no such option)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_dir)
    options = MethodOptions(
        int8_activations=True,
        calibration=lambda: calibration_from_text(tokenizer, read_text(), n_sequences=4, seq_len=64),
        progress=False,
    )
    for name, method in METHODS.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
        if "sparse" in name:
            with pytest.raises(ValueError, match="--int8-activations applies to the int8 and int4 methods only"):
                method.apply(model, options)
            continue
        method.apply(model, options)
        layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
        assert layers and all(m.int8_activations for m in layers), name
        expected = 15 if name == "int8+lm_head" else 14
        assert sum(row.format.endswith(" x=int8") for row in fastquant.report(model).layers) == expected, name


def test_cli_compress_int8_with_int8_activations(llama_dir, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["compress", str(llama_dir), "--method", "int8", "--int8-activations", "-o", str(out)]) == 0
    specs = list(read_manifest(out)["layers"].values())
    assert len(specs) == 14 and all(s["type"] == "int8" and s["int8_activations"] is True for s in specs)
    model, _ = fastquant.from_pretrained(out)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 14 and all(m.int8_activations for m in layers)
    expected = fastquant.patch(_tiny_llama(llama_dir), fastquant.Int8(int8_activations=True))
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, expected(ids).logits)


def test_cli_eval_int8_with_int8_activations(llama_dir, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(llama_dir), "--method", "int8", "--int8-activations", "--tokens", "300"]
    assert cli.main([*args, "--window", "128", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == "int8" and result["int8_activations"] is True
    assert abs(result["perplexity_delta_pct"]) < 1.0


@pytest.mark.parametrize("method", ["sparse", "int8+sparse"])
def test_cli_refuses_int8_activations_for_sparse_methods(llama_dir, capsys, method):
    args = ["eval", "--model", str(llama_dir), "--method", method, "--pruning", "magnitude", "--int8-activations"]
    assert cli.main(args) == 2
    assert f"method {method!r}: --int8-activations applies to the int8 and int4 methods only" in (
        capsys.readouterr().out
    )


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


def _tiny_llama(llama_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()


def test_api_and_cli_prune_with_one_calibrated_default():
    import inspect

    from fastquant.choices import CALIBRATED_METHODS, CLI_METHODS, DEFAULT_PRUNING

    demo = cli.build_parser().parse_args(["demo"])
    defaults = {
        inspect.signature(fastquant.patch).parameters["pruning"].default,
        inspect.signature(fastquant.prune).parameters["pruning"].default,
        MethodOptions().pruning,
        demo.pruning,
    }
    assert defaults == {DEFAULT_PRUNING} and DEFAULT_PRUNING in CALIBRATED_METHODS
    assert tuple(METHODS) == CLI_METHODS  # the names --help lists without importing the registry


def test_calibrated_default_uses_the_embedded_text_and_says_so(llama_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_dir)
    model = _tiny_llama(llama_dir)
    model.name_or_path = ""  # no folder to find a tokenizer in
    with pytest.raises(ValueError, match="tokenizer="):
        fastquant.patch(model, "sparse", progress=False)
    with pytest.warns(UserWarning) as caught:
        fastquant.patch(model, "sparse", pruning="wanda", tokenizer=tokenizer, progress=False)
    said = [str(w.message) for w in caught if "embedded text" in str(w.message)]
    assert len(said) == 1 and "32 windows of 256 tokens" in said[0]
    assert all("50% pruned" in row.note for row in fastquant.report(model).layers if row.name != "lm_head")
    # A model loaded from a folder finds the tokenizer saved there.
    with pytest.warns(UserWarning, match="embedded text"):
        fastquant.prune(_tiny_llama(llama_dir), pruning="wanda", progress=False)


def test_magnitude_pruning_warns_on_a_language_model_above_30_percent(llama_dir, recwarn):
    fastquant.patch(_tiny_llama(llama_dir), "sparse", pruning="magnitude", sparsity=0.3, progress=False)
    assert not [w for w in recwarn if "magnitude" in str(w.message)]
    with pytest.warns(UserWarning, match=r"'magnitude' at 50% on a language model"):
        fastquant.patch(_tiny_llama(llama_dir), "sparse", pruning="magnitude", pattern="2:4", sparsity=None)
    with pytest.warns(UserWarning, match=r"'global-magnitude' at 40%"):
        fastquant.prune(_tiny_llama(llama_dir), pruning="global-magnitude", sparsity=0.4, progress=False)


def test_compress_folder_loads_in_one_call(llama_dir, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["compress", str(llama_dir), "--method", "int8", "-o", str(out)]) == 0
    model, tokenizer = fastquant.from_pretrained(out)
    into = fastquant.load(_tiny_llama(llama_dir), out)  # the folder, not the file inside it
    assert isinstance(model.model.layers[0].mlp.up_proj, Int8Linear) and tokenizer is not None
    ids = tokenizer("Full fathom five thy father lies", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, into(ids).logits)
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4

    (out / "tokenizer.json").unlink()
    (out / "tokenizer_config.json").unlink()
    assert fastquant.from_pretrained(out)[1] is None
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        fastquant.from_pretrained(out)
    with pytest.raises(FileNotFoundError, match=r"expected .*model\.fastquant\.safetensors"):
        fastquant.load(_tiny_llama(llama_dir), tmp_path)


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys\nfrom fastquant.app import cli\n"
        "try:\n    cli.main(['demo', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--all" in out and out.strip().endswith("[]")


def test_progress_bars_only_on_a_terminal_or_when_asked(llama_dir, capsys):
    from fastquant.progress import progress_bar

    assert progress_bar(total=1).disable  # pytest's stderr is not a terminal
    assert not progress_bar(total=1, progress=True).disable
    calibration = calibration_from_text(transformers.AutoTokenizer.from_pretrained(llama_dir), n_sequences=2)
    quiet, shown = _tiny_llama(llama_dir), _tiny_llama(llama_dir)
    capsys.readouterr()
    fastquant.patch(quiet, "int8", calibration=calibration)
    assert capsys.readouterr().err == ""
    fastquant.patch(shown, "int8", calibration=calibration, progress=True)
    err = capsys.readouterr().err
    assert "int8 GPTQ rounding" in err and "pruning" not in err


def test_load_note_flags_busy_and_unsteady_rounds():
    row = {"load_average_before": 1.9, "load_average_after": 2.1, "busy": False, "rounds_spread": 1.05}
    assert cli._load_note(row, threads=2) == "load 1.90 -> 2.10"
    assert cli._load_note({**row, "rounds_spread": 2.5}, threads=2).startswith("NOISY: load 1.90 -> 2.10, rounds")
    assert cli._load_note({**row, "busy": True}, threads=2).startswith("BUSY: load 1.90 -> 2.10 > 2 threads")


def test_demo_writes_each_row_as_it_finishes(llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "demo"
    seen: list[list[str]] = []
    row_line = cli._row_line

    def spy(row, threads):
        seen.append([r["method"] for r in json.loads((out / "results.json").read_text())["rows"]])
        return row_line(row, threads)

    monkeypatch.setattr(cli, "_row_line", spy)
    monkeypatch.setattr(fastquant.app.evaluate, "load_average", lambda: 99.0)  # a machine far busier than 1 thread
    args = ["demo", "--model", str(llama_dir), "-o", str(out), "--methods", "int8", "--ppl-tokens", "300"]
    args += ["--window", "128", "--prompt-tokens", "8", "--decode-tokens", "4", "--prefill-tokens", "32"]
    assert cli.main([*args, "--rounds", "2", "--threads", "1"]) == 0
    assert seen == [["float32"], ["float32", "int8"]]
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "fastquant " + " ".join([*args, "--rounds", "2", "--threads", "1"])
    float_row, int8 = results["rows"]
    assert len(int8["decode_rounds_tokens_per_s"]) == len(int8["float32_decode_rounds_tokens_per_s"]) == 2
    rounds = zip(int8["decode_rounds_tokens_per_s"], int8["float32_decode_rounds_tokens_per_s"], strict=True)
    ratios = [a / b for a, b in rounds]  # each round's ratio; the speedup is their median (of two: the mean)
    assert int8["decode_speedup"] == pytest.approx(sum(ratios) / 2)
    assert float_row["decode_speedup"] == 1.0 and int8["busy"] and int8["load_average_before"] == 99.0
    assert int8["rounds_spread"] >= max(ratios) / min(ratios)
    assert int8["details"] == "int8 per-channel, round to nearest" and (out / "results.png").is_file()


def test_command_output_has_no_progress_bars_off_a_terminal(llama_dir, tmp_path):
    import os
    import subprocess
    import sys

    # cli.main called in this process quietened tqdm through the environment; a user's shell has no such thing.
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    command = [sys.executable, "-m", "fastquant.cli", "compress", str(llama_dir), "-o", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    assert "it/s]" not in done.stderr and "it/s]" not in done.stdout  # neither ours nor transformers' bars
    shown = subprocess.run([*command, "--progress"], capture_output=True, text=True, check=True, env=env)
    assert "it/s]" in shown.stderr
