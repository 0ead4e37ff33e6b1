#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (no network needed): build fastquant with its CUDA kernels,
# print `python -m fastquant.info`, run the whole test suite (CUDA tests included), the GPU kernel benchmarks
# (int8_linear, then sparse_linear into gpu-<UTC stamp>-sparse.{json,md}, then csr16 vs bitmap16 into
# gpu-<UTC stamp>-csr.md) and the end-to-end decode benchmark.
# Results go to benchmarks/results/gpu-<UTC stamp>.{json,md}, logs next to them, and everything is copied to
# $OUT when it is set. Sized for 10 minutes on an H100 with 16 cores: each step has its own time limit, so a
# hang in one still leaves the others' results.
#
#   bash benchmarks/gpu_check.sh
#
# Needs torch (CUDA build), nvcc, cmake, ninja, pybind11, scikit-build-core, pytest(-benchmark) and
# transformers already installed: nothing is downloaded (--no-build-isolation --no-deps).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
BUDGET_S=${GPU_CHECK_BUDGET_S:-570}  # stay under a 600 s command limit
start=$(date +%s)
stamp=$(date -u +%Y%m%d-%H%M%S)
results=benchmarks/results
stem=$results/gpu-$stamp
mkdir -p "$results"
status=0

elapsed() { echo $(($(date +%s) - start)); }
left() { local l=$((BUDGET_S - $(elapsed))); [ "$l" -gt 30 ] && echo "$l" || echo 30; }
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $stem-NAME.log, keep going on failure
  local name=$1 limit=$2
  shift 2
  echo "=== [$(elapsed)s] $name (limit ${limit}s): $*"
  if [ "$name" = build ]; then  # the verbose build log is long: keep it in the file, show its end
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$stem-$name.log" 2>&1
    local rc=$?
    grep -E "fastquant: CUDA kernels|error|warning: .*csrc/cuda" "$stem-$name.log" | head -40
    tail -n 15 "$stem-$name.log"
  else
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$stem-$name.log"
    local rc=${PIPESTATUS[0]}
  fi
  echo "=== [$(elapsed)s] $name exited $rc"
  return "$rc"
}

# nvcc and the C++ compiler share the 16 cores; the two GEMV files, the dequantize file and the torch glue
# compile in parallel. Both sm_80 and sm_90 are built (what a wheel would ship); ~15 s per CUDA file.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export FASTQUANT_CUDA=ON
if [ -z "${CUDACXX:-}" ]; then
  CUDACXX=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  export CUDACXX
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

echo "fastquant $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)'), $(date -u)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$CUDACXX" --version | tail -n 2 || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available())"

if ! step build 300 "$PYTHON" -m pip install --no-build-isolation --no-deps -v .; then
  echo "BUILD FAILED: see $stem-build.log" >&2
  status=1
else
  step info 60 "$PYTHON" -m fastquant.info || status=1
  "$PYTHON" -c "import fastquant, sys; sys.exit(0 if fastquant._native.has_cuda_kernels() else 1)" ||
    { echo "the installed fastquant has no CUDA kernels" >&2; status=1; }
  # -rs lists every skip with its reason, so a silently skipped CUDA module shows.
  step tests 200 "$PYTHON" -m pytest -q -rs tests || status=1
  step bench $(($(left) > 150 ? 150 : $(left))) "$PYTHON" benchmarks/bench_gpu_int8.py --stem "$stem" --repeats 15 ||
    status=1
  # The sparse_linear benchmark (bitmap16); its tables go to $stem-sparse.{json,md} next to the int8 ones.
  step bench_sparse $(($(left) > 120 ? 120 : $(left))) "$PYTHON" benchmarks/bench_gpu_sparse.py --stem "$stem-sparse" \
    --repeats 10 || status=1
  # sparse_csr_linear (csr16) next to sparse_linear (bitmap16) on the same pruned weights: $stem-csr.md.
  step bench_csr $(($(left) > 60 ? 60 : $(left))) "$PYTHON" benchmarks/bench_gpu_csr.py --stem "$stem-csr" || status=1
  step e2e "$(left)" "$PYTHON" benchmarks/e2e_gpu_decode.py --stem "$stem" --new-tokens 100 --repeats 2 || status=1
fi

ls -l "$stem"* 2>/dev/null
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results"
  cp "$stem"* "$OUT/results/" 2>/dev/null || true
fi
[ -f "$stem.md" ] && cat "$stem.md"
[ -f "$stem-sparse.md" ] && cat "$stem-sparse.md"
echo "gpu_check: done in $(elapsed)s, status $status"
exit "$status"
