#!/usr/bin/env bash
# CUDA compile check, no GPU needed: builds csrc/ (C++ + CUDA, sm_80 and sm_90) against a CUDA build of torch
# and checks that every op registers a CUDA kernel, plus the host-side harness of the kernels' logic
# (tests/test_cuda_compile.py). Runs in its own virtual environment, because the main one holds the CPU
# build of torch. Fails when nvcc is missing, when any source does not compile, or when a test fails.
#
# Environment: BITNET_CUDA_VENV (default .venv-cuda in the repository, ignored by git), CUDA_HOME
# (default /usr/local/cuda), PYTHON (default python3), MAX_JOBS (default: all cores).
# Time on 2 cores: about 1 min for the venv (first run only) + about 2.5 min of compilation.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_CUDA_VERSION="2.14.1"
PYTHON=${PYTHON:-python3}
VENV=${BITNET_CUDA_VENV:-$PWD/.venv-cuda}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_compile: no nvcc at $CUDA_HOME/bin/nvcc; install the CUDA toolkit or set CUDA_HOME" >&2
  exit 1
fi

pip_install() {  # quiet pip; drops the local index's "Location ... is ignored" noise, keeps errors and the status
  "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_CUDA_VERSION') and torch.version.cuda else 1)" 2>/dev/null; then
  pip_install "torch==$TORCH_CUDA_VERSION"
fi
pip_install ninja pytest numpy hypothesis

# The test imports only the package's torch-only modules (by path) and runs the build and the library load
# in subprocesses, so this venv needs none of the package's other dependencies.
export BITNET_TORCH_NO_EXT=1
export BITNET_REQUIRE_CUDA_COMPILE=1   # a skipped compile test is a failure here
export TORCH_CUDA_ARCH_LIST="8.0;9.0"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

start=$(date +%s)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_cuda_compile.py
echo "cuda_compile: passed in $(( $(date +%s) - start )) s (torch $TORCH_CUDA_VERSION, archs $TORCH_CUDA_ARCH_LIST)"
