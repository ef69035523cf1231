#!/usr/bin/env bash
# Issue 19's per-step account (one H200, one device call): probe_mesh_trace.py on one GPU,
# bf16 and FP8, decode at batch 1 and 32 (random Mistral-Small-2501 weights): each GPU stream's
# busy time by kernel and by kind (weight matmuls, attention, other, idle), per decode step.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
STEPS=${STEPS:-20}
for q in bf16 fp8; do for b in ${BATCHES:-1 32}; do
  flag=$([ $q = fp8 ] && echo "--quantization fp8")
  name=trace_${q}_b$b
  timeout ${RUN_S:-150} python3 benchmarks/probe_mesh_trace.py run --mesh tp=1 $flag --batch $b --steps $STEPS \
    --out /tmp/$name > "$OUT/$name.log" 2>&1 || tail -5 "$OUT/$name.log"
  python3 benchmarks/probe_mesh_trace.py summarize /tmp/$name --steps $STEPS --top 12 >> "$OUT/$name.log" 2>&1
  echo "== $name"; grep -v -i warn "$OUT/$name.log" | tail -24
done; done
