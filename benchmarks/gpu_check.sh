#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (no network needed), sized for one device call of at most 540 s:
# the most important evidence first, each step bounded by `timeout`, every result written straight into $OUT
# as the step runs (a call cut short still returns what the finished steps found):
#
#   1. build fastquant for sm_90 only                          -> build.log
#   2. every torch.ops.fastquant op has its CUDA kernel          -> check.log
#   3. the CUDA kernel tests (reference, bad input, CUDA graphs) -> cuda-tests.xml (junit), check.log
#   4. int8_linear decode vs bf16 F.linear, copy bandwidth       -> int8.json, int8.md
#      int4_linear decode vs int8 and bf16 (two shapes)          -> check.log (files in benchmarks/results/)
#   5. sparse_linear at 50%, 90%, int8+50%                       -> sparse.json, sparse.md
#   6. while time remains: opcheck / torch.compile tests, csr16 vs bitmap16, end-to-end decode -> check.log
#
# summary.md gets one line per step as it ends, and is printed last (the end of the output is what a device
# call returns). At most 8 files: those above. Without $OUT they go to benchmarks/results/gpu-<UTC stamp>/.
#
#   bash benchmarks/gpu_check.sh
#
# Needs torch (CUDA build), nvcc, cmake, ninja, pybind11, scikit-build-core and pytest installed: nothing is
# downloaded (--no-build-isolation --no-deps --no-index). On a machine without a GPU it runs steps 1 and 2
# and stops before step 3, saying why. PYTHON picks the interpreter (default python3); CMAKE_ARGS passes
# extra CMake settings to the build (scikit-build-core reads it); GPU_CHECK_BUILD_S the build's time limit
# (default 240 s: a 2-core machine needs about 6 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
start=$(date +%s)
stamp=$(date -u +%Y%m%d-%H%M%S)
OUT=${OUT:-benchmarks/results/gpu-$stamp}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
log=$OUT/check.log
summary=$OUT/summary.md
status=0

elapsed() { echo $(($(date +%s) - start)); }
left() { echo $((BUDGET_S - $(elapsed))); }
note() { echo "- [$(elapsed) s] $*" | tee -a "$summary"; }
# step NAME LIMIT_S COMMAND...: run it under `timeout` (never past the budget; skipped when under 20 s are
# left), its output appended to check.log and shown, one line in summary.md; returns the command's status.
step() {
  local name=$1 limit=$2
  shift 2
  local remaining
  remaining=$(($(left) - 10))
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  if [ "$limit" -lt 20 ]; then
    note "$name: SKIPPED (no time left in the ${BUDGET_S} s budget)"
    return 1
  fi
  echo "=== [$(elapsed) s] $name (limit ${limit} s): $*" | tee -a "$log"
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  case $rc in
    0) note "$name: ok" ;;
    124 | 137) note "$name: TIMED OUT after ${limit} s" ;;
    *) note "$name: FAILED (exit $rc)" ;;
  esac
  return "$rc"
}
finish() {
  note "done in $(elapsed) s, status $status (files in $OUT)"
  for table in "$OUT/int8.md" "benchmarks/results/gpu-$stamp-int4.md" "$OUT/sparse.md"; do
    [ -f "$table" ] && grep -E "^\| " "$table" | head -n 40
  done
  echo
  cat "$summary"
  exit "$status"
}

echo "# gpu_check $stamp: fastquant $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)')" >"$summary"
{
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  nvcc --version 2>&1 | tail -n 1
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.is_available())"
} 2>&1 | tee -a "$log" | sed 's/^/- /' >>"$summary"

# 1. Build. sm_90 only: half the device code of the default sm_80 + sm_90, and the GPU lent is an H100/H200.
# nvcc takes ~1 GB per file; the 16 cores of the GPU machine build ~20 CUDA files in about 2-3 minutes.
export MAX_JOBS=${MAX_JOBS:-$(nproc)} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export FASTQUANT_CUDA=ON HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
build_limit=${GPU_CHECK_BUILD_S:-240}
echo "=== [$(elapsed) s] build (limit ${build_limit} s, log: $OUT/build.log)" | tee -a "$log"
# A build folder of its own, so that a CPU build in the same checkout never shares its CMake cache.
timeout --signal=INT --kill-after=10 "$build_limit" "$PYTHON" -m pip install --no-build-isolation --no-deps \
  --no-index -v -C build-dir=build/gpu-check -C cmake.define.FASTQUANT_CUDA_ARCHS=90 . >"$OUT/build.log" 2>&1
rc=$?
grep -E "fastquant: CUDA kernels|error|warning: .*csrc/cuda" "$OUT/build.log" | head -n 20 | tee -a "$log"
if [ "$rc" -ne 0 ]; then
  tail -n 30 "$OUT/build.log" | tee -a "$log"
  note "build: FAILED (exit $rc), see build.log"
  status=1
  finish
fi
note "build: ok"

# 2. Registration: the installed extension has its CUDA kernels and every op dispatches to one (read from the
# dispatcher's table: no GPU needed). Run outside the checkout, so that `import fastquant` is the installed
# package.
step registration 60 bash -c 'cd /tmp && "$0" -m fastquant.info --require-cuda' "$PYTHON" || { status=1; finish; }

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "no CUDA device visible to torch: stopping before the kernel tests (steps 3-6 need a GPU)"
  finish
fi

# 3. The CUDA kernel tests, before any CPU test. -rs names every skip, so a silently skipped module shows;
# --durations sizes the next call. A timeout sends SIGINT: pytest still writes the junit file.
cuda_tests=(tests/test_int8_linear_cuda.py tests/test_int4_linear_cuda.py tests/test_sparse_linear_cuda.py
  tests/test_decode_attention_cuda.py)
step cuda-tests 150 "$PYTHON" -m pytest -q -rs --durations=15 -p no:cacheprovider "${cuda_tests[@]}" \
  -k "not opcheck and not torch_compile" --junitxml="$OUT/cuda-tests.xml" || status=1

# 4. int8 decode speed vs bf16 F.linear on the three large layer shapes, copy bandwidth in the same run.
step int8-bench 70 "$PYTHON" benchmarks/bench_gpu_int8.py --stem "$OUT/int8" --rows 1,4,16,64 --group-sizes -1 \
  --shapes 4096x4096,4096x14336,14336x4096 --compiled-peer off --repeats 15 || status=1

# 4b. int4 decode against int8 and bf16 (its files stay in benchmarks/results/: 8 files come back from a device
# call, and $OUT has 8; the table goes to check.log and the end of the output).
step int4-bench 60 "$PYTHON" benchmarks/bench_gpu_int4.py --stem "benchmarks/results/gpu-$stamp-int4" \
  --shapes 4096x4096,11008x4096 --rows 1,16,64,256 --flavours 32s,128a --rounds 3 --repeats 9 || status=1

# 5. Sparse (bitmap16) against bf16 F.linear.
step sparse-bench 70 "$PYTHON" benchmarks/bench_gpu_sparse.py --stem "$OUT/sparse" --rows 1,16,64,256 \
  --cases "50%,90%,int8+50%" --repeats 10 || status=1

# 6. While time remains: the slower tests, csr16, end-to-end decode. Their files stay in benchmarks/results/
# (8 files come back from a device call); their tables are in check.log.
step compile-tests 90 "$PYTHON" -m pytest -q -rs -p no:cacheprovider "${cuda_tests[@]}" tests/test_cuda_dispatch.py \
  -k "opcheck or torch_compile or dispatch" || status=1
step csr-bench 60 "$PYTHON" benchmarks/bench_gpu_csr.py --stem "benchmarks/results/gpu-$stamp-csr" --repeats 5 ||
  status=1
step e2e-decode 120 "$PYTHON" benchmarks/e2e_gpu_decode.py --stem "benchmarks/results/gpu-$stamp-e2e" \
  --new-tokens 64 --repeats 2 || status=1
finish
