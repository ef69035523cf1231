#!/usr/bin/env bash
# The decode step's per-step account on one GPU: probe_mesh_trace.py, bf16 and FP8, decode at
# batch 1 and 32 (random Mistral-Small-2501 weights): each GPU stream's busy time by kernel and by
# kind (weight matmuls, attention, other, idle), per decode step.
#   benchmarks/probes/run_decode_trace_gpu.sh OUT_DIR [WHEEL_DIR]
# Env: QUANTS, BATCHES, STEPS, TOP (kernels listed per stream), HOST_TOP (host threads' events);
# KEEP_TRACE=1 keeps each trace in OUT_DIR, DUMP_HLO=1 each run's optimized HLO.
set -uo pipefail
source "$(dirname "$0")/../common.sh"
bench_setup "$@"
trap bench_cleanup EXIT
STEPS=${STEPS:-20}
for q in ${QUANTS:-bf16 fp8}; do for b in ${BATCHES:-1 32}; do
  flag=$([ $q = fp8 ] && echo "--quantization fp8")
  name=trace_${q}_b$b
  dump=$([ -n "${DUMP_HLO:-}" ] && echo "--xla_dump_to=$SCRATCH/hlo_$name --xla_dump_hlo_as_text")
  XLA_FLAGS="${XLA_FLAGS:-} $dump" timeout ${RUN_S:-150} python3 benchmarks/probes/probe_mesh_trace.py run --mesh tp=1 $flag \
    --batch $b --steps $STEPS --out "$SCRATCH/$name" > "$OUT/$name.log" 2>&1 || tail -5 "$OUT/$name.log"
  python3 benchmarks/probes/probe_mesh_trace.py summarize "$SCRATCH/$name" --steps $STEPS --top ${TOP:-12} \
    --host ${HOST_TOP:-0} >> "$OUT/$name.log" 2>&1
  [ -n "${DUMP_HLO:-}" ] && (cd "$SCRATCH/hlo_$name" && tar czf "$OUT/$name.hlo.tgz" *after_optimizations.txt)
  [ -n "${KEEP_TRACE:-}" ] && tar czf "$OUT/$name.trace.tgz" -C "$SCRATCH" $name
  echo "== $name"; grep -E "ms/step|per step" "$OUT/$name.log" | head -8
done; done
