#!/usr/bin/env bash
# Issue 23's GPU runs (one H200), one device call per part (each fits the 10-minute limit):
#   PART=w  bench_warmup.py on Mistral-Small-2501, bf16 then FP8: cold and warm compilation
#           cache, TTFT of the first, prefix-hit and steady-state requests
#   PART=p  probes/probe_warm_start.py, FP8, cold then warm: where a warm start's seconds go
#   PART=d  decode cost of the fixed program set (always-on top-20 logprobs and penalties, a
#           sequence axis of at least 8 rows): bench_generate.py at batch 1 and 64, this tree
#           against OLD (a copy of the tree before issue 23, default .old/), bf16 and FP8,
#           alternating in one call; NEW (default .) is the tree under test
# Needs the server's and mistral-common's wheels in .whl (device README), installed by the caller.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
if [ "${PART:-w}" = w ]; then
  for q in ${QUANTS:-bf16 fp8}; do
    flag=$([ $q = fp8 ] && echo "--quantization fp8")
    PYTHONPATH=.:$PYTHONPATH timeout ${RUN_S:-280} python3 benchmarks/bench_warmup.py --config mistral-small-2501 $flag \
      --out "$OUT/warmup_$q.json" > "$OUT/warmup_$q.log" 2>&1 || tail -20 "$OUT/warmup_$q.log"
    tail -2 "$OUT/warmup_$q.log"; grep -c -i -E "could not load|Failed to deserialize" "$OUT/warmup_$q.log"
  done
elif [ "${PART}" = p ]; then
  for run in cold warm; do
    MISTRAL_JAX_CACHE_DIR=/tmp/probe_cache PYTHONPATH=${NEW:-.}:$PYTHONPATH timeout ${RUN_S:-200} python3 \
      ${NEW:-.}/benchmarks/probes/probe_warm_start.py --config mistral-small-2501 --quantization fp8 --max-model-len 8192 --profile ${PROFILE:-0} \
      2>&1 | grep -v -i warn | tee "$OUT/probe_warm_start_$run.log" | head -${HEAD:-12}
  done
else
  OLD=${OLD:-.old}
  for q in bf16 fp8; do for tree in old new; do
    root=$([ $tree = old ] && echo "$OLD" || echo "${NEW:-.}")
    (cd "$root" && PYTHONPATH=.:benchmarks:$PYTHONPATH timeout ${RUN_S:-130} python3 benchmarks/bench_generate.py \
      --engine ours --config mistral-small-2501 --quantization $q --decode-batches 1,64 --prefill-lens 512 \
      --out "$OUT/gen_${q}_$tree.json" > "$OUT/gen_${q}_$tree.log" 2>&1) || tail -20 "$OUT/gen_${q}_$tree.log"
    grep -i "decode" "$OUT/gen_${q}_$tree.log" | tail -3
  done; done
fi
