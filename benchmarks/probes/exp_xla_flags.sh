#!/usr/bin/env bash
# Decode/prefill of the raw forward (smoke_model_gpu.py) under several XLA GPU flag sets, one
# process each; the output goes to stdout.
#   benchmarks/probes/exp_xla_flags.sh [WHEEL_DIR]
set -uo pipefail
source "$(dirname "$0")/../common.sh"
SCRATCH_OUT=$(mktemp -d)
bench_setup "$SCRATCH_OUT" "${1:-}"
trap 'bench_cleanup; rm -rf "$SCRATCH_OUT"' EXIT
export SKIP_CEIL=1 SHAPES=1x512x1024,1x1x1024,32x1x1024
for flags in "" "--xla_gpu_enable_triton_gemm=false" "--xla_gpu_autotune_level=0" "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true"; do
  echo "== XLA_FLAGS='$flags'"
  XLA_FLAGS="$flags" python3 benchmarks/probes/smoke_model_gpu.py 2>&1 | grep -E "^B=|Error|error" | head -8
done
