#!/usr/bin/env bash
# The host's share of a synchronous step (probe_step_host.py) and speculative decoding end to end
# (bench_speculative.py gpu --skip-steps), bf16 and FP8, random Mistral-Small-2501 weights.
#   benchmarks/probes/run_host_e2e_gpu.sh OUT_DIR [WHEEL_DIR]
set -uo pipefail
source "$(dirname "$0")/../common.sh"
bench_setup "$@"
trap bench_cleanup EXIT
for q in bf16 fp8; do
  flag=$([ $q = fp8 ] && echo "--quantization fp8")
  timeout 120 python3 benchmarks/probes/probe_step_host.py --config mistral-small-2501 $flag 2>&1 | grep -v -i warn \
    | tee "$OUT/host_$q.log" | tail -12
  timeout 170 python3 benchmarks/bench_speculative.py gpu --skip-steps --config mistral-small-2501 $flag \
    --out "$OUT/e2e_$q.json" 2>&1 | grep -v -i warn | tee "$OUT/e2e_$q.log" | tail -6
done
