"""End-to-end CPU generation: fastquant (eager and compiled) against float and against llama.cpp, same run.

Models:

* ``smollm2``: SmolLM2-135M-Instruct from its shipped Q4_1 GGUF, de-quantized to float by transformers (the
  float "baseline" is therefore a 4-bit model's values: fine for speed, which is all this script measures).
  llama.cpp runs Q8_0 and Q4_0 files re-quantized from that same GGUF (``llama_model_quantize`` with
  ``allow_requantize``), so all contenders hold the same weights up to their own rounding.
* ``llama1b``: a Llama-shaped ~1.1B model built from a transformers config with random weights (hidden 2048,
  intermediate 8192, 16 layers, 32 heads, 8 kv heads, vocab 32000, untied lm_head): big enough layers for the
  sparse kernels to pay. Speed only; llama.cpp is not run on it (no GGUF of these weights).

Contenders (each a copy of the float model): ``fp32`` and ``bf16`` (transformers eager), ``bf16 compiled``,
fastquant ``int8`` (per-channel, lm_head quantized too: its tied embedding keeps the float weight) and ``int8
x=int8`` (the same with ``int8_activations``: x rounded to int8 per 32 columns, llama.cpp's arithmetic for Q8_0)
eager and compiled with :func:`fastquant.compile_for_decode` (``compiled``: ``backend="inductor"``; ``aoti``: the step
compiled ahead of time by AOTInductor), and ``int8+50%`` (magnitude-pruned, 50% unstructured,
int8 values; speed only) eager and compiled, ``int4`` (symmetric group 32, llama.cpp Q4_0's grid, lm_head
int8) eager and compiled, and ``int4 x=int8`` (the same with ``int8_activations`` on every layer, the int8
lm_head included: llama.cpp's own arithmetic for Q4_0 and its output matrix); llama.cpp ``Q8_0`` / ``Q4_0``
(llama-cpp-python, a benchmark-only extra built from source, ``n_threads`` = the torch thread count).

Decode: batch 1, greedy, ``--new-tokens`` new tokens after a short prompt (end-of-text stop disabled with
``eos_token_id=None``, as llama.cpp's loop runs, rather than ``min_new_tokens``, whose logits processor scans
the whole vocabulary at every step), tokens/s over the decode steps only
(the first token's time, which includes the prefill, is excluded). Prefill: one forward pass over
``--prefill-tokens`` token ids (llama.cpp: ``eval`` of the same count), under torch's default float32 matmul
precision ("highest": fastquant keeps fp32 x in fp32) and again under "medium" (fastquant's AVX-512 prefill
rounds fp32 x to bf16, as torch's own fp32 matmul may then do; bf16 models and llama.cpp are not affected).
Rounds are interleaved (the order
reverses every round) and medians reported with the load average before and after each round. Writes
``results/e2e-cpu-decode-<UTC date>.{md,json,png}``.

Run: ``python benchmarks/e2e_cpu_decode.py`` (SmolLM2 and llama1b, ~30 minutes on 2 cores, most of it
compiling and building the 1B model) or ``--models smollm2``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from run_info import matmul_precision

import fastquant
from fastquant.app.evaluate import cpu_model
from fastquant.app.models import load_model, random_llama_1b, smollm2_gguf
from fastquant.kernels import extension

RESULTS = Path(__file__).parent / "results"
# Row label suffix of each compile_for_decode backend.
COMPILED = {"inductor": "compiled", "aoti": "aoti"}
PROMPT = "To be, or not to be, that is the question:"


@dataclass
class Contender:
    name: str
    # decode(prompt ids (1, L), new tokens) -> (decode tokens/s, generated ids); prefill(ids (L,)) -> seconds
    decode: Callable[[torch.Tensor, int], tuple[float, list[int]]]
    prefill: Callable[[torch.Tensor], float]
    setup_s: float = 0.0
    notes: str = ""
    decode_tok_s: list[float] = field(default_factory=list)
    prefill_tok_s: list[float] = field(default_factory=list)
    prefill_medium_tok_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


class _StepClock:
    """A logits processor that stamps each generated token: the gaps after the first are pure decode steps."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def hf_contender(name: str, model, setup_s: float, notes: str = "") -> Contender:
    from transformers import LogitsProcessorList

    # As users call it: generate applies no_grad itself (inference_mode would hide per-call autograd costs).
    def decode(prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
        clock = _StepClock()
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            eos_token_id=None,  # no end-of-text stop, as llama.cpp's loop: exactly new_tokens steps
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([clock]),
        )
        steps = len(clock.stamps) - 1
        return steps / (clock.stamps[-1] - clock.stamps[0]), out[0, prompt.shape[1] :].tolist()

    @torch.no_grad()
    def prefill(ids: torch.Tensor) -> float:
        start = time.perf_counter()
        model(ids.reshape(1, -1), use_cache=False, logits_to_keep=1)
        return time.perf_counter() - start

    return Contender(name, decode, prefill, setup_s, notes)


def llama_cpp_contender(name: str, gguf: Path, threads: int, n_ctx: int) -> Contender:
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512, verbose=False)

    def decode(prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
        stamps, tokens = [], []
        for token in llm.generate(prompt[0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            tokens.append(int(token))
            if len(tokens) == new_tokens:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens

    def prefill(ids: torch.Tensor) -> float:
        llm.reset()
        begin = time.perf_counter()
        llm.eval(ids.tolist())
        return time.perf_counter() - begin

    return Contender(name, decode, prefill, time.perf_counter() - start, f"llama.cpp {gguf.name}")


def requantize(source: Path, ftype_name: str, folder: Path) -> Path:
    import llama_cpp

    out = folder / f"{source.stem}.{ftype_name}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.allow_requantize = True
    params.nthread = torch.get_num_threads()
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {ftype_name} failed with {rc}")
    return out


def int4_with_int8_head(model, int8_activations: bool = False):
    """int4 g32 symmetric layers (llama.cpp Q4_0's grid) and an int8 lm_head: llama.cpp's Q4_0 files also keep
    the output matrix at higher precision than the blocks. ``int8_activations``: every layer rounds x to int8
    per 32 columns, as llama.cpp's dot products do (its Q8_0 activations)."""
    fastquant.patch(model, fastquant.Int4(group_size=32, int8_activations=int8_activations), progress=False)
    return fastquant.patch(
        model,
        fastquant.Int8(int8_activations=int8_activations),
        skip=(),
        quantize_tied=True,
        filter_fn=lambda _, name: name == "lm_head",
        progress=False,
    )


def fastquant_variants(base, args, max_cache_len: int) -> list[Contender]:
    contenders = []
    for label, make in (
        ("int8", lambda m: fastquant.patch(m, "int8", skip=(), quantize_tied=True, progress=False)),
        (
            "int8 x=int8",
            lambda m: fastquant.patch(
                m, fastquant.Int8(int8_activations=True), skip=(), quantize_tied=True, progress=False
            ),
        ),
        (
            "int8+50%",
            lambda m: fastquant.patch(
                m, "int8+sparse", sparsity=0.5, pruning="magnitude", skip=(), quantize_tied=True, progress=False
            ),
        ),
        ("int4", int4_with_int8_head),
        ("int4 x=int8", lambda m: int4_with_int8_head(m, int8_activations=True)),
    ):
        if label not in args.variants:
            continue
        start = time.perf_counter()
        eager = make(copy.deepcopy(base))
        setup = time.perf_counter() - start
        contenders.append(hf_contender(f"fastquant {label}", eager, setup))
        for backend in args.backends:
            compiled = copy.deepcopy(eager)
            start = time.perf_counter()
            fastquant.compile_for_decode(compiled, max_cache_len=max_cache_len, backend=backend)
            contenders.append(
                hf_contender(
                    f"fastquant {label} {COMPILED[backend]}",
                    compiled,
                    time.perf_counter() - start,
                    f"compile_for_decode(backend={backend!r})",
                )
            )
    return contenders


def float_variants(base, max_cache_len: int) -> list[Contender]:
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    compiled = copy.deepcopy(bf16)
    start = time.perf_counter()
    fastquant.compile_for_decode(compiled, max_cache_len=max_cache_len, backend="inductor")
    return [
        hf_contender("fp32", base, 0.0),
        hf_contender("bf16", bf16, 0.0),
        hf_contender("bf16 compiled", compiled, time.perf_counter() - start, "compile_for_decode"),
    ]


def run_model(name: str, args) -> dict:
    max_cache_len = 64 + args.new_tokens  # prompt (< 64 tokens) + new tokens: one compile, a short cache
    if name == "smollm2":
        loaded = load_model("smollm2")
        base, tokenizer = loaded.model, loaded.tokenizer
        prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
        vocab = tokenizer.vocab_size
    else:
        base = random_llama_1b()
        vocab = base.config.vocab_size
        prompt = torch.randint(1, vocab, (1, 12), generator=torch.Generator().manual_seed(1))
    contenders = float_variants(base, max_cache_len) + fastquant_variants(base, args, max_cache_len)
    with tempfile.TemporaryDirectory() as tmp:
        if name == "smollm2" and not args.no_llama_cpp:
            source = smollm2_gguf()
            for ftype in ("Q8_0", "Q4_0"):
                gguf = requantize(source, ftype, Path(tmp))
                contenders.append(
                    llama_cpp_contender(f"llama.cpp {ftype}", gguf, args.threads, args.prefill_tokens + 8)
                )
        long_ids = torch.arange(args.prefill_tokens).remainder(vocab - 1).add(1)
        for c in contenders:  # warm-up: first-call allocations, llama.cpp's graph
            c.decode(prompt, 4)
            c.prefill(long_ids[:16])
        loads = []
        for round_index in range(args.rounds):
            order = contenders if round_index % 2 == 0 else list(reversed(contenders))
            before = os.getloadavg()[0]
            for c in order:
                tok_s, tokens = c.decode(prompt, args.new_tokens)
                c.decode_tok_s.append(tok_s)
                c.tokens = tokens
                c.prefill_tok_s.append(args.prefill_tokens / c.prefill(long_ids))
                with matmul_precision("medium"):
                    c.prefill_medium_tok_s.append(args.prefill_tokens / c.prefill(long_ids))
            loads.append((before, os.getloadavg()[0]))
            print(
                f"{name} round {round_index + 1} (load {before:.2f} -> {loads[-1][1]:.2f}): "
                + ", ".join(f"{c.name} {c.decode_tok_s[-1]:.1f}" for c in contenders),
                flush=True,
            )
    by_name = {c.name: c for c in contenders}

    def paired(c: Contender, ref: str, attr: str) -> float | None:
        if ref not in by_name:
            return None
        return statistics.median(a / b for a, b in zip(getattr(c, attr), getattr(by_name[ref], attr), strict=True))

    rows = []
    for c in contenders:
        eager_twin = by_name.get(c.name.removesuffix(" compiled").removesuffix(" aoti"))
        rows.append(
            {
                "contender": c.name,
                "decode_tok_s": statistics.median(c.decode_tok_s),
                "decode_tok_s_rounds": c.decode_tok_s,
                "prefill_tok_s": statistics.median(c.prefill_tok_s),
                "prefill_tok_s_rounds": c.prefill_tok_s,
                "decode_vs_bf16": paired(c, "bf16", "decode_tok_s"),
                "decode_vs_llama_cpp_q8_0": paired(c, "llama.cpp Q8_0", "decode_tok_s"),
                "decode_vs_llama_cpp_q4_0": paired(c, "llama.cpp Q4_0", "decode_tok_s"),
                "prefill_vs_bf16": paired(c, "bf16", "prefill_tok_s"),
                "prefill_vs_llama_cpp_q8_0": paired(c, "llama.cpp Q8_0", "prefill_tok_s"),
                "prefill_medium_tok_s": statistics.median(c.prefill_medium_tok_s),
                "prefill_medium_tok_s_rounds": c.prefill_medium_tok_s,
                "prefill_medium_vs_bf16": paired(c, "bf16", "prefill_medium_tok_s"),
                "same_tokens_as_eager": None
                if eager_twin is c or eager_twin is None
                else c.tokens == eager_twin.tokens,
                "setup_s": c.setup_s,
                "notes": c.notes,
            }
        )
    return {"model": name, "rows": rows, "load_average_per_round": loads}


def fmt(v: float | None, suffix: str = "x") -> str:
    return "—" if v is None else f"{v:.2f}{suffix}"


def write_results(results: list[dict], env: dict, stem: Path) -> None:
    lines = [
        f"# End-to-end CPU decode and prefill ({env['cpu']}, {env['threads']} threads, ISA {env['isa']})",
        "",
        f"torch {env['torch']}, fastquant {env['fastquant']}; batch 1, greedy, {env['new_tokens']} new tokens "
        f"(decode tokens/s over the steps after the first token), prefill of {env['prefill_tokens']} tokens "
        f"(one forward pass); {env['rounds']} interleaved rounds, medians; ratios are medians of per-round "
        "ratios. `compiled` = `fastquant.compile_for_decode` (static KV cache sized for the prompt plus the new "
        'tokens, decode step compiled with fullgraph=True, `backend="inductor"`); `aoti` = the same with '
        '`backend="aoti"` (the step compiled ahead of time by AOTInductor and called without guards or a '
        "Python wrapper; setup includes that compile, or its load from Inductor's cache); both prefill eagerly. "
        "`same tokens`: greedy "
        "output identical to the eager model's. int8 quantizes the lm_head too (a copy: the tied embedding "
        "keeps its float weight). int8+50% is magnitude-pruned (speed only; its text differs from int8's)."
        " int4 is symmetric group 32 (llama.cpp Q4_0's grid) with the lm_head in int8; `x=int8` rounds"
        " every quantized layer's input to int8 per 32 columns (int8_activations), as llama.cpp's kernels do.",
        "",
    ]
    for result in results:
        loads = ", ".join(f"{a:.2f}->{b:.2f}" for a, b in result["load_average_per_round"])
        lines += [
            f"## {result['model']}",
            "",
            f"Load average (1 min) before -> after each round: {loads}.",
            "",
            "| contender | decode tok/s | vs bf16 | vs llama.cpp Q8_0 | vs Q4_0 | prefill tok/s | vs bf16 "
            "| vs llama.cpp Q8_0 | prefill tok/s, medium | vs bf16 | same tokens | setup s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for r in result["rows"]:
            same = {None: "", True: "yes", False: "no"}[r["same_tokens_as_eager"]]
            lines.append(
                f"| {r['contender']} | {r['decode_tok_s']:.1f} | {fmt(r['decode_vs_bf16'])} | "
                f"{fmt(r['decode_vs_llama_cpp_q8_0'])} | {fmt(r.get('decode_vs_llama_cpp_q4_0'))} | "
                f"{r['prefill_tok_s']:.0f} | {fmt(r['prefill_vs_bf16'])} | "
                f"{fmt(r['prefill_vs_llama_cpp_q8_0'])} | {r['prefill_medium_tok_s']:.0f} | "
                f"{fmt(r['prefill_medium_vs_bf16'])} | {same} | {r['setup_s']:.0f} |"
            )
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": results}, indent=2))
    plot(results, stem.with_suffix(".png"))
    print("\n".join(lines))
    print(f"wrote {stem}.md / .json / .png")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 3.2 * len(results)), squeeze=False)
    for row_axes, result in zip(axes, results, strict=True):
        names = [r["contender"] for r in result["rows"]]
        for ax, key, title in (
            (row_axes[0], "decode_tok_s", "decode tokens/s (higher is better)"),
            (row_axes[1], "prefill_tok_s", "prefill tokens/s (higher is better)"),
        ):
            values = [r[key] for r in result["rows"]]
            colors = [
                "tab:orange" if n.startswith("llama.cpp") else "tab:blue" if "fastquant" in n else "tab:gray"
                for n in names
            ]
            ax.barh(names, values, color=colors)
            ax.invert_yaxis()
            ax.set_title(f"{result['model']}: {title}")
            for y, v in enumerate(values):
                ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,llama1b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp contenders")
    parser.add_argument(
        "--backends",
        default="inductor,aoti",
        type=lambda v: [b for b in v.split(",") if b],
        help="compile_for_decode backends of the fastquant contenders (comma-separated: inductor, aoti)",
    )
    parser.add_argument(
        "--variants",
        default="int8,int8 x=int8,int8+50%,int4,int4 x=int8",
        type=lambda v: v.split(","),
        help="fastquant variants (comma-separated: int8, int8 x=int8, int8+50%%, int4, int4 x=int8)",
    )
    parser.add_argument("--out", default=None, help="output stem (default results/e2e-cpu-decode-<UTC date>)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    env = {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "fastquant": fastquant.__version__,
        "threads": args.threads,
        "isa": extension.native.cpu_isa() if extension.native is not None else "reference",
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "prefill_tokens": args.prefill_tokens,
    }
    stem = Path(args.out) if args.out else RESULTS / f"e2e-cpu-decode-{dt.datetime.now(dt.timezone.utc).date()}"
    results = []
    for name in args.models.split(","):
        results.append(run_model(name, args))
        write_results(results, env, stem)  # after each model, so a later failure keeps the earlier rows


if __name__ == "__main__":
    main()
