#!/usr/bin/env bash
# GPU check of the CUDA kernels, for a machine with an NVIDIA GPU (sm_80+), in well under 10 minutes:
#   1. records the GPU (nvidia-smi) and the torch build;
#   2. JIT-builds the extension with the CUDA sources for this GPU's architecture and loads it;
#   3. runs tests/test_ops_cuda.py (bit-exactness against the reference, awkward shapes, opcheck,
#      CUDA graphs, torch.compile, the BitLinear training path);
#   4. runs benchmarks/bench_linear.py --device cuda (same-run ratios against cuBLAS bf16 F.linear).
# Every step's log goes to OUTDIR; a failed step does not stop the later ones, but the script exits
# non-zero if any step failed (the summary names them).
#
# Usage: bash benchmarks/gpu_check.sh OUTDIR        (PYTHON selects the interpreter, default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export BITNET_TORCH_WITH_CUDA=1
export BITNET_TORCH_BUILD_DIR=${BITNET_TORCH_BUILD_DIR:-/tmp/bitnet_torch_gpu_check_build}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  # Only this GPU's architecture: the fastest build.
  TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi

failed=()
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, remember failures, print the duration
  local name=$1
  shift
  local start=$SECONDS
  echo "== $name: $*"
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"
  else
    echo "   FAILED ($((SECONDS - start)) s); last lines of $OUT/$name.log:"
    tail -n 30 "$OUT/$name.log" | sed 's/^/   | /'
    failed+=("$name")
  fi
}

nvidia-smi | tee "$OUT/nvidia_smi.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv | tee -a "$OUT/nvidia_smi.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" | tee "$OUT/torch.txt"
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" | tee -a "$OUT/torch.txt"

step build "$PYTHON" -c "
import bitnet_torch
from bitnet_torch import ops, _build
assert ops.extension_loaded(), ops.extension_error()
print('loaded', _build.loaded_library_path())
print(bitnet_torch.backend_info())
"
step test_ops_cuda "$PYTHON" -m pytest tests/test_ops_cuda.py -q --maxfail=20 --durations=15 -p no:cacheprovider
if [ -f benchmarks/bench_linear.py ]; then
  step bench_cuda "$PYTHON" benchmarks/bench_linear.py --device cuda --json "$OUT/bench_cuda.json"
else
  echo "benchmarks/bench_linear.py is missing: no benchmark numbers" | tee "$OUT/bench_cuda.log"
  failed+=("bench_cuda(missing)")
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED steps: ${failed[*]} (logs in $OUT)"
  exit 1
fi
echo "gpu_check: all steps passed (logs in $OUT)"
