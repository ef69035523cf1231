#!/usr/bin/env bash
# Speculative decoding: bench_speculative.py gpu on CONFIG's shape, bf16 then FP8 (verify-step
# cost for k = 0..8 at batch 1, 8, 32; predicted and end-to-end speed-up).
#   benchmarks/run_speculative_gpu.sh OUT_DIR [WHEEL_DIR]
# WHEEL_DIR: mistral-common's wheels where the machine lacks them. Env: CPU_RESULTS (a
# `bench_speculative.py cpu` JSON, to predict at its acceptance), CONFIG, RUN_S.
set -uo pipefail
source "$(dirname "$0")/common.sh"
bench_setup "$@"
trap bench_cleanup EXIT
for q in bf16 fp8; do
  flag=$([ $q = fp8 ] && echo "--quantization fp8")
  timeout ${RUN_S:-280} python3 benchmarks/bench_speculative.py gpu --config ${CONFIG:-mistral-small-2501} $flag \
    ${CPU_RESULTS:+--cpu-results $CPU_RESULTS} --out "$OUT/speculative_$q.json" > "$OUT/speculative_$q.log" 2>&1 \
    || tail -20 "$OUT/speculative_$q.log"
  grep -v -i warn "$OUT/speculative_$q.log" | tail -45
done
