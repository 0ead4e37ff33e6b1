"""GPU benchmark of fastquant.sparse_linear (bitmap16 weights) against its peers, on 7B/8B-class layer shapes.

For every weight shape (N x K), row count M and sparsity case it times, in the same run and on the same inputs:

* ``fastquant``: ``torch.ops.fastquant.sparse_linear`` on the bitmap16 weight (bf16 values; int8 values with
  per-channel scales for ``int8+50%``),
* ``bf16``: ``F.linear`` on the dense bf16 weight (cuBLAS), the layer before pruning,
* ``csr``: ``torch.sparse`` CSR matmul (cuSPARSE) of the same pruned weight,
* ``2:4``: ``torch.sparse.to_sparse_semi_structured`` (CUTLASS / cuSPARSELt) for the 2:4 case, where it runs,
* ``densify``: the same op forced onto densify + cuBLAS (``set_sparse_cuda_mma_max_m(0)`` and
  ``set_sparse_cuda_gemv_max_m(0)``) where the table picks the tensor-core path (M > 16), so that the
  tensor-core path, unpack + cuBLAS and bf16 F.linear are timed at the same M.

A peer that fails (unsupported dtype or shape) is reported as n/a with its error, never stops the run.
Timing as in bench_gpu_int8.py: CUDA events around batches of calls after warm-up, GPU pre-filled with a
sleep kernel, median of many batches, weight sets rotated so that every call streams its weight from HBM
(>= 160 MiB per shape, L2 is ~50 MB). Reported: time, ratio to bf16, format bytes per second and their
fraction of the device-to-device copy bandwidth measured in the same run.

Writes ``<stem>.json`` and ``<stem>.md`` (default stem ``benchmarks/results/gpu-sparse-<UTC date-time>``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from bench_gpu_int8 import (
    fmt,
    gpu_time_per_call,
    header_lines,
    kernel_bench_parser,
    kernel_bench_sizes,
    save_results,
    start_run,
    targets_summary,
)

from fastquant.kernels import extension, reference

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (N, K) = (out, in) features
ROW_COUNTS = [1, 4, 16, 17, 64, 128, 256, 512]  # 17..512: the tensor-core path and its M cap
CASES = ["50%", "70%", "90%", "2:4", "int8+50%"]
ROTATION_BYTES = 160 * 2**20  # bytes of weight sets rotated through per shape and format (> 3x the 50 MB L2)
MAX_SETS = 48
# Minimum speed-up over bf16 F.linear at M = 1 (decode, memory-bound: format bytes vs 2 bytes per weight).
TARGETS_M1 = {"50%": 1.5, "70%": 2.2, "90%": 4.0, "2:4": 1.7, "int8+50%": 2.8}


def make_mask(n: int, k: int, case: str, gen: torch.Generator) -> torch.Tensor:
    if case == "2:4":
        scores = torch.rand(n, k // 4, 4, generator=gen, device="cuda")
        top = scores.topk(2, dim=2).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(2, top, True).reshape(n, k)
    sparsity = float(case.removeprefix("int8+").removesuffix("%")) / 100
    return torch.rand(n, k, generator=gen, device="cuda") >= sparsity


def pack_case(weight: torch.Tensor, mask: torch.Tensor, case: str) -> dict:
    pruned = weight * mask
    if case.startswith("int8+"):
        qweight, scales = reference.int8_quantize(pruned, -1)
        values, masks, row_offsets = reference.sparse_pack(qweight, mask)
    else:
        scales = None
        values, masks, row_offsets = reference.sparse_pack(pruned, mask)
    nbytes = values.numel() * values.element_size() + masks.numel() * 2 + row_offsets.numel() * 8
    if scales is not None:
        nbytes += scales.numel() * 4
    return {"values": values, "masks": masks, "row_offsets": row_offsets, "scales": scales, "bytes": nbytes}


def try_time(name: str, make_calls, repeats: int, errors: dict) -> float | None:
    try:
        return gpu_time_per_call(make_calls(), repeats)
    except Exception as exc:  # a peer that does not run here must not lose the rest of the table
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        if errors.get(name) != message:
            print(f"  {name} failed: {message}", flush=True)
        errors[name] = message
        return None


def bench_shape(n: int, k: int, row_counts: list[int], cases: list[str], repeats: int, copy_bw: float, errors: dict):
    gen = torch.Generator(device="cuda").manual_seed(n * 31 + k)
    dense_sets = max(2, math.ceil(ROTATION_BYTES / (2 * n * k)))
    dense = [torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(dense_sets)]
    rows = []
    for case in cases:
        # Pruned weights of this case: as many sets as rotate >= ROTATION_BYTES of format (the dense bf16 sets
        # are reused as the source of the values, new masks per set).
        first = pack_case(dense[0], make_mask(n, k, case, gen), case)
        sets = min(MAX_SETS, max(2, math.ceil(ROTATION_BYTES / first["bytes"])))
        packed = [first] + [pack_case(dense[i % dense_sets], make_mask(n, k, case, gen), case) for i in range(1, sets)]
        csr = None
        semi = None
        try:
            csr = [reference.sparse_unpack(p["values"], p["masks"], p["row_offsets"], k) for p in packed[:2]]
            csr = [
                (w.float() * p["scales"][:, None]).bfloat16() if p["scales"] is not None else w
                for w, p in zip(csr, packed[:2], strict=True)
            ]
            if case == "2:4":
                semi = csr
            csr = [w.to_sparse_csr() for w in csr]
        except Exception as exc:
            errors["csr"] = f"{type(exc).__name__}: {exc}"[:200]
            csr = None
        if semi is not None:
            try:
                semi = [torch.sparse.to_sparse_semi_structured(w) for w in semi]
            except Exception as exc:
                errors["2:4"] = f"{type(exc).__name__}: {exc}"[:200]
                semi = None
        for m in row_counts:
            x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
            t_bf16 = gpu_time_per_call([lambda w=w, x=x: F.linear(x, w) for w in dense], repeats)
            calls = [
                lambda p=p, x=x: torch.ops.fastquant.sparse_linear(
                    x, p["values"], p["masks"], p["row_offsets"], p["scales"], None, k, -1
                )
                for p in packed
            ]
            t = gpu_time_per_call(calls, repeats)
            values_dtype = packed[0]["values"].dtype
            path = extension.sparse_linear_kernel_path(torch.device("cuda"), m, n, k, values_dtype, torch.bfloat16)
            t_densify = None
            native = extension.native
            if path == "cuda_sparse_mma" and hasattr(native, "set_sparse_cuda_mma_max_m"):
                mma_max, gemv_max = native.sparse_cuda_mma_max_m(), native.sparse_cuda_gemv_max_m()
                try:
                    native.set_sparse_cuda_mma_max_m(0)
                    native.set_sparse_cuda_gemv_max_m(0)
                    t_densify = gpu_time_per_call(calls, repeats)
                finally:
                    native.set_sparse_cuda_mma_max_m(mma_max)
                    native.set_sparse_cuda_gemv_max_m(gemv_max)
            t_csr = None
            if csr is not None:
                xt = x.t().contiguous()
                t_csr = try_time(
                    "csr", lambda xt=xt, ws=csr: [lambda w=w: torch.mm(w, xt) for w in ws], repeats, errors
                )
            t_semi = None
            if semi is not None:
                t_semi = try_time("2:4", lambda x=x, ws=semi: [lambda w=w: F.linear(x, w) for w in ws], repeats, errors)
            nbytes = packed[0]["bytes"]
            target = TARGETS_M1.get(case) if m == 1 else None
            r = {
                "n": n,
                "k": k,
                "m": m,
                "case": case,
                "path": path,
                "format_bytes": nbytes,
                "t_fastquant_us": t * 1e6,
                "t_bf16_us": t_bf16 * 1e6,
                "t_densify_cublas_us": None if t_densify is None else t_densify * 1e6,
                "t_csr_us": None if t_csr is None else t_csr * 1e6,
                "t_semi_structured_us": None if t_semi is None else t_semi * 1e6,
                "speedup_vs_bf16": t_bf16 / t,
                "format_gb_s": nbytes / t / 1e9,
                "fraction_of_copy_bw": nbytes / t / copy_bw,
                "floor_us": nbytes / copy_bw * 1e6,
                "target_speedup_vs_bf16": target,
                "target_met": None if target is None else t_bf16 / t >= target,
            }
            rows.append(r)
            print(
                f"{n:>5}x{k:<5} {case:<8} M={m:<4} {path:<28} fastquant {r['t_fastquant_us']:8.1f} us  "
                f"bf16 {r['t_bf16_us']:8.1f} us ({r['speedup_vs_bf16']:.2f}x)  "
                f"densify {fmt(r['t_densify_cublas_us'], '8.1f')}  csr {fmt(r['t_csr_us'], '8.1f')}  "
                f"2:4 {fmt(r['t_semi_structured_us'], '8.1f')}  {r['format_gb_s']:6.0f} GB/s "
                f"({r['fraction_of_copy_bw']:.0%} of copy)"
                + ("" if target is None else ("  target met" if r["target_met"] else "  TARGET MISSED")),
                flush=True,
            )
        del packed, csr, semi
        torch.cuda.empty_cache()
    del dense
    torch.cuda.empty_cache()
    return rows


def to_markdown(meta: dict, rows: list[dict], errors: dict) -> str:
    lines = header_lines("GPU sparse_linear (bitmap16) benchmark", meta) + [
        f"- timing: median of {meta['repeats']} batches of CUDA-event-timed calls, GPU pre-filled with a sleep "
        f"kernel, weight sets rotated through >= {ROTATION_BYTES >> 20} MiB per shape and case (L2 is ~50 MB)",
        "- fastquant: bf16 values (int8 codes + per-channel fp32 scales for int8+50%), bf16 x; format bytes = "
        "values + masks + row offsets (+ scales); floor = format bytes / copy bandwidth",
        "- peers: bf16 = F.linear on the dense bf16 weight (cuBLAS); csr = torch.mm(W.to_sparse_csr(), x.T) "
        "(cuSPARSE); 2:4 = F.linear(x, to_sparse_semi_structured(W)) for 2:4 masks",
        "- densify us: the same op forced onto densify + cuBLAS where the table picks cuda_sparse_mma (M > 16)",
        "",
        "| N x K | case | M | kernel | fastquant us | floor us | bf16 us | densify us | csr us | 2:4 us | vs bf16 "
        "| format GB/s | of copy BW | target (M=1) | met |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        target = "" if r["target_speedup_vs_bf16"] is None else f">= {r['target_speedup_vs_bf16']}x"
        met = "" if r["target_met"] is None else ("yes" if r["target_met"] else "**NO**")
        lines.append(
            f"| {r['n']}x{r['k']} | {r['case']} | {r['m']} | {r['path']} | {r['t_fastquant_us']:.1f} "
            f"| {r['floor_us']:.1f} | {r['t_bf16_us']:.1f} | {fmt(r['t_densify_cublas_us'], '.1f')} "
            f"| {fmt(r['t_csr_us'], '.1f')} "
            f"| {fmt(r['t_semi_structured_us'], '.1f')} | {r['speedup_vs_bf16']:.2f}x | {r['format_gb_s']:.0f} "
            f"| {r['fraction_of_copy_bw']:.0%} | {target} | {met} |"
        )
    lines += targets_summary(rows)
    if errors:
        lines += ["Peers that did not run:", ""] + [f"- {name}: {msg}" for name, msg in errors.items()] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = kernel_bench_parser(__doc__.splitlines()[0], "gpu-sparse", SHAPES, ROW_COUNTS)
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated cases: " + ", ".join(CASES).replace("%", "%%")
    )
    args = parser.parse_args()
    copy_bw, stem, meta = start_run("bench_gpu_sparse.py", args, "gpu-sparse")
    row_counts, shapes = kernel_bench_sizes(args)
    cases = args.cases.split(",")
    errors: dict[str, str] = {}
    rows = []
    for n, k in shapes:
        rows += bench_shape(n, k, row_counts, cases, args.repeats, copy_bw, errors)
        meta["peer_errors"] = errors
        save_results(stem, meta, rows, to_markdown(meta, rows, errors))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
