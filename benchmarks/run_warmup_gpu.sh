#!/usr/bin/env bash
# Start-up: bench_warmup.py on CONFIG (random weights), bf16 then FP8: a cold and a warm
# compilation cache (each its own process), TTFT of the first, prefix-hit and steady requests.
#   benchmarks/run_warmup_gpu.sh OUT_DIR [WHEEL_DIR]
# WHEEL_DIR: the server's and mistral-common's wheels where the machine lacks them.
# Env: QUANTS ("bf16 fp8"), CONFIG, RUN_S.
set -uo pipefail
source "$(dirname "$0")/common.sh"
bench_setup "$@"
trap bench_cleanup EXIT
for q in ${QUANTS:-bf16 fp8}; do
  flag=$([ $q = fp8 ] && echo "--quantization fp8")
  timeout ${RUN_S:-280} python3 benchmarks/bench_warmup.py --config ${CONFIG:-mistral-small-2501} $flag \
    --out "$OUT/warmup_$q.json" > "$OUT/warmup_$q.log" 2>&1 || tail -20 "$OUT/warmup_$q.log"
  tail -2 "$OUT/warmup_$q.log"; grep -c -i -E "could not load|Failed to deserialize" "$OUT/warmup_$q.log"
done
