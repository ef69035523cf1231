#!/usr/bin/env bash
# Decode step time at batch 1 and 32 (probe_step_flags.py), one process per variant and
# quantization. VARIANTS: ";"-separated entries "XLA_FLAGS|probe flags", e.g.
# "|--top-k-chunk 0;--xla_gpu_enable_cub_radix_sort=false|".
#   benchmarks/probes/run_step_flags_gpu.sh OUT_DIR [WHEEL_DIR]
set -uo pipefail
source "$(dirname "$0")/../common.sh"
bench_setup "$@"
trap bench_cleanup EXIT
IFS=';' read -ra variants <<< "${VARIANTS:-|;--xla_gpu_enable_command_buffer=|}"
for q in ${QUANTS:-bf16 fp8}; do
  for v in "${variants[@]}"; do
    flags=${v%%|*}; probe=${v#*|}
    quant=$([ $q = fp8 ] && echo "--quantization fp8")
    XLA_FLAGS="$flags" timeout ${RUN_S:-120} python3 benchmarks/probes/probe_step_flags.py $quant $probe \
      2>&1 | grep -E "RESULT|Error" | tee -a "$OUT/step_flags.log"
  done
done
