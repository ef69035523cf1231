#!/usr/bin/env bash
# Issue 19's per-step account (one H200, one device call): probe_mesh_trace.py on one GPU,
# bf16 and FP8, decode at batch 1 and 32 (random Mistral-Small-2501 weights): each GPU stream's
# busy time by kernel and by kind (weight matmuls, attention, other, idle), per decode step.
# QUANTS, BATCHES, STEPS, TOP (kernels listed per stream); KEEP_TRACE=1 keeps each trace in $OUT,
# DUMP_HLO=1 each run's optimized HLO.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
STEPS=${STEPS:-20}
for q in ${QUANTS:-bf16 fp8}; do for b in ${BATCHES:-1 32}; do
  flag=$([ $q = fp8 ] && echo "--quantization fp8")
  name=trace_${q}_b$b
  dump=$([ -n "${DUMP_HLO:-}" ] && echo "--xla_dump_to=/tmp/hlo_$name --xla_dump_hlo_as_text")
  XLA_FLAGS="${XLA_FLAGS:-} $dump" timeout ${RUN_S:-150} python3 benchmarks/probe_mesh_trace.py run --mesh tp=1 $flag --batch $b --steps $STEPS \
    --out /tmp/$name > "$OUT/$name.log" 2>&1 || tail -5 "$OUT/$name.log"
  python3 benchmarks/probe_mesh_trace.py summarize /tmp/$name --steps $STEPS --top ${TOP:-12} --host ${HOST_TOP:-0} >> "$OUT/$name.log" 2>&1
  [ -n "${DUMP_HLO:-}" ] && (cd /tmp/hlo_$name && tar czf "$OUT/$name.hlo.tgz" *after_optimizations.txt)
  [ -n "${KEEP_TRACE:-}" ] && tar czf "$OUT/$name.trace.tgz" -C /tmp $name
  echo "== $name"; grep -E "ms/step|per step" "$OUT/$name.log" | head -8
done; done
