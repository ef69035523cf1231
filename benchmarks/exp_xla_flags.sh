#!/usr/bin/env bash
# Decode/prefill of the raw forward under several XLA GPU flag sets (one process each).
export SKIP_CEIL=1 SHAPES=1x512x1024,1x1x1024,32x1x1024 PYTHONUNBUFFERED=1
for flags in "" "--xla_gpu_enable_triton_gemm=false" "--xla_gpu_autotune_level=0" "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true"; do
  echo "== XLA_FLAGS='$flags'"
  XLA_FLAGS="$flags" python3 benchmarks/smoke_model_gpu.py 2>&1 | grep -E "^B=|Error|error" | head -8
done
