#!/usr/bin/env bash
# CUDA compile check, no GPU needed: builds csrc/ (C++ + CUDA, sm_80 and sm_90) against a CUDA build of torch
# and checks that every op registers a CUDA kernel, plus the host-side harness of the kernels' logic
# (tests/test_cuda_compile.py). Runs in its own virtual environment, because the main one holds the CPU
# build of torch. Without nvcc it skips (one line saying why, exit 0) before creating anything, unless
# BITNET_REQUIRE_CUDA_COMPILE=1 (CI's CUDA job), which makes a missing nvcc a failure. Fails when any source
# does not compile or a test fails.
#
# Environment: BITNET_CUDA_VENV (default .venv-cuda in the repository, ignored by git), CUDA_HOME
# (default /usr/local/cuda), PYTHON (default python3), MAX_JOBS (default: all cores),
# BITNET_SKIP_CUDA_COMPILE=1 (skip even with nvcc).
# Cost: the venv holds the CUDA build of torch, about 5.5 GB of disk (first run only: about 1 min on a fast
# link); then about 2.5 min of compilation on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_CUDA_VERSION="2.14.1"
PYTHON=${PYTHON:-python3}
VENV=${BITNET_CUDA_VENV:-$PWD/.venv-cuda}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

if [ "${BITNET_SKIP_CUDA_COMPILE:-0}" = "1" ]; then
  echo "cuda_compile: skipped (BITNET_SKIP_CUDA_COMPILE=1)"
  exit 0
fi
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  if [ "${BITNET_REQUIRE_CUDA_COMPILE:-0}" = "1" ]; then
    echo "cuda_compile: FAILED: no nvcc at $CUDA_HOME/bin/nvcc (BITNET_REQUIRE_CUDA_COMPILE=1); install the CUDA toolkit or set CUDA_HOME" >&2
    exit 1
  fi
  echo "cuda_compile: skipped: no nvcc at $CUDA_HOME/bin/nvcc (install the CUDA toolkit or set CUDA_HOME to run the CUDA compile check; it needs a ~5.5 GB second venv)"
  exit 0
fi
echo "cuda_compile: nvcc found; using $VENV (the CUDA build of torch: about 5.5 GB of disk, created on the first run)"

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
