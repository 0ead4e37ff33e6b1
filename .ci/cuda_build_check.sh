#!/usr/bin/env bash
# The CUDA build, proven without a GPU: in a virtual environment of its own, install a CUDA build of torch,
# build fastquant with FASTQUANT_CUDA=ON for sm_90 (the per-file nvcc step of .ci/run covers sm_80), import
# it, check that every torch.ops.fastquant op has a CUDA kernel registered and that `python -m fastquant.info`
# reports the CUDA build, and run the kernel-choice tests against this build's run-time caps. Compiling each
# .cu file alone never links, so only this step sees a symbol defined twice or a torch header that needs a
# newer C++ standard.
#
#   bash .ci/cuda_build_check.sh        # ~5.5 minutes on 2 cores: 1.3 install, 3.3 build, 0.7 clean-up
#
# Needs nvcc and network access to the package index (torch is about 5.5 GB installed). The environment is
# made under a temporary folder and removed at the end; FASTQUANT_CUDA_VENV=DIR keeps it in DIR instead.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_CUDA_BUILD=torch==2.14.1  # a CUDA 13.0 build of torch on the machines CI runs on
start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/fastquant-cuda-check.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
venv=${FASTQUANT_CUDA_VENV:-$work/venv}

echo "== CUDA build check: $TORCH_CUDA_BUILD in $venv"
[ -x "$venv/bin/python" ] || python -m venv "$venv"
py=$venv/bin/python
# fastquant's own dependencies too (the build below takes --no-deps), and pytest for the kernel-choice tests.
"$py" -m pip install -q "$TORCH_CUDA_BUILD" scikit-build-core pybind11 cmake ninja pytest numpy safetensors tqdm rich
"$py" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch in $venv is not a CUDA build')"
echo "== [$(($(date +%s) - start))s] torch $("$py" -c 'import torch; print(torch.__version__)') installed"

# What this machine's cut-down CUDA toolkit needs (a user's full toolkit needs none of it):
# - the nvcc on PATH is a wrapper script, so CMake cannot find the toolkit from its location: point CUDA_PATH
#   and CUDACXX at the real toolkit (nvcc's own TOP, as --dryrun prints it);
# - the toolkit has no nvrtc library and no cuBLAS headers, which torch's CMake config and ATen's CUDA headers
#   ask for: take both from the nvidia/cu13 wheel that torch installs (-idirafter: only headers the toolkit
#   lacks come from there, so the two copies of the runtime headers never mix).
toolkit=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=\(.*\)\/bin\/\.\.$/\1/p' | head -n 1)
[ -n "$toolkit" ] && [ -x "$toolkit/bin/nvcc" ] || { echo "cannot locate the CUDA toolkit behind nvcc" >&2; exit 1; }
cu13=$("$py" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
export CUDA_PATH=$toolkit CUDACXX=$toolkit/bin/nvcc
# Two parallel jobs: nvcc needs up to ~1 GB per CUDA file, and CI machines have 2 cores.
export MAX_JOBS=2 CMAKE_BUILD_PARALLEL_LEVEL=2 FASTQUANT_CUDA=ON

echo "== [$(($(date +%s) - start))s] building fastquant (CUDA, sm_90) with $toolkit/bin/nvcc"
# A build folder of its own: the CPU build of the README's test command must not reuse this CMake cache.
"$py" -m pip install -q --no-build-isolation --no-deps \
  -C build-dir="$work/build" \
  -C cmake.define.FASTQUANT_CUDA_ARCHS=90 \
  -C cmake.define.CUDA_nvrtc_LIBRARY="$cu13/lib/libnvrtc.so.13" \
  -C cmake.define.CMAKE_CXX_FLAGS="-idirafter $cu13/include" \
  .
echo "== [$(($(date +%s) - start))s] built"

# Every op has its CUDA kernel registered and fastquant.info reports the CUDA build for sm_90. Outside the
# checkout, so that `import fastquant` is the installed package with its compiled extension.
info=$(cd "$work" && "$py" -m fastquant.info --require-cuda) || { echo "$info"; exit 1; }
echo "$info" | grep -E "^(fastquant|native extension|CUDA kernels|CUDA build check)"
echo "$info" | grep -q "^CUDA kernels: built (CUDA .*, archs sm_90)$" ||
  { echo "fastquant.info does not report the CUDA build (sm_90)" >&2; exit 1; }

# The kernel-choice tests, now with the CUDA build's run-time caps (no GPU: the tests of tests/*_cuda.py skip).
"$py" -m pytest -q -p no:cacheprovider --rootdir "$PWD" tests/test_cuda_dispatch.py
echo "== [$(($(date +%s) - start))s] CUDA build check passed"
