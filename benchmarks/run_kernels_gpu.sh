#!/usr/bin/env bash
# Kernels: bench_attention.py (the Triton ragged paged attention kernel against its reference)
# and bench_fp8_matmul.py (the FP8 GEMM table: every projection of MODELS at several row counts,
# our kernels against XLA's fp8 and bf16 dots; CUPTI=1 adds device time per kernel).
#   benchmarks/run_kernels_gpu.sh OUT_DIR [WHEEL_DIR]
# Env: PARTS ("attention fp8"), MODELS (2501), MS (row counts, bench_fp8_matmul's default), CUPTI, RUN_S.
set -uo pipefail
source "$(dirname "$0")/common.sh"
bench_setup "$@"
trap bench_cleanup EXIT
for part in ${PARTS:-attention fp8}; do case $part in
attention)
  timeout ${RUN_S:-300} python3 benchmarks/bench_attention.py --out "$OUT/attention.json" > "$OUT/attention.log" 2>&1 || tail -20 "$OUT/attention.log"
  grep -v -i warn "$OUT/attention.log" | tail -12 ;;
fp8)
  timeout ${RUN_S:-540} python3 benchmarks/bench_fp8_matmul.py --models ${MODELS:-2501} ${MS:+--ms $MS} ${CUPTI:+--cupti} \
    --out "$OUT/fp8_matmul.json" > "$OUT/fp8_matmul.log" 2>&1 || tail -20 "$OUT/fp8_matmul.log"
  tail -30 "$OUT/fp8_matmul.log" ;;
esac; done
