#!/usr/bin/env bash
# Issue 21's GPU run (one H200, one device call): bench_speculative.py gpu on Mistral-Small-2501's
# shape, bf16 then FP8 (verify-step cost for k = 0..8 at batch 1, 8, 32; predicted and end-to-end
# speed-up). CPU_RESULTS: a `bench_speculative.py cpu` JSON, to predict at its acceptance.
# Needs mistral-common's wheels in .whl (device README), installed by the caller.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
for q in bf16 fp8; do
  flag=$([ $q = fp8 ] && echo "--quantization fp8")
  timeout ${RUN_S:-280} python3 benchmarks/bench_speculative.py gpu --config mistral-small-2501 $flag \
    ${CPU_RESULTS:+--cpu-results $CPU_RESULTS} --out "$OUT/spec_$q.json" > "$OUT/spec_$q.log" 2>&1 \
    || tail -20 "$OUT/spec_$q.log"
  grep -v -i warn "$OUT/spec_$q.log" | tail -45
done
