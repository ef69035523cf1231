#!/usr/bin/env bash
# Issue 5's GPU benchmark (nvidia-h200-x2 or -x4): random Mistral-Small-2501 weights (bf16),
# decode at batch 1 and 64 and prefill, on meshes tp = 1, 2, 4 (up to the GPUs present), then
# one process per GPU joined by jax.distributed (tp over all GPUs). PARTS picks the runs of one
# device call (each must fit 10 minutes): "ceil 1 2" "4" "mp". Each call's $OUT comes back on
# its own: build the table where the JSON files land:
#   python benchmarks/bench_generate.py --table gen_*.json --scaling
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
N=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt"
ARGS="--engine ours --config ${CONFIG:-mistral-small-2501} --decode-batches 1,64"
for part in ${PARTS:-ceil 1 2}; do case $part in
ceil)
  python3 benchmarks/bench_generate.py --engine ceilings --out "$OUT/ceilings.json" > "$OUT/ceilings.log" 2>&1 ;;
1|2|4)
  if [ "$part" -gt "$N" ]; then echo "tp=$part: only $N GPUs"; continue; fi
  timeout ${RUN_S:-280} python3 benchmarks/bench_generate.py $ARGS --mesh tp=$part --out "$OUT/gen_tp$part.json" \
    > "$OUT/gen_tp$part.log" 2>&1 || tail -20 "$OUT/gen_tp$part.log" ;;
mp)  # one process per GPU, each seeing only its own
  PORT=$((20000 + RANDOM % 20000))
  for i in $(seq 0 $((N - 1))); do
    CUDA_VISIBLE_DEVICES=$i JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
      timeout ${RUN_S:-280} python3 benchmarks/bench_generate.py $ARGS --mesh tp=$N --out "$OUT/gen_mp$N.json" \
      > "$OUT/gen_mp_rank$i.log" 2>&1 &
  done
  wait; tail -5 "$OUT/gen_mp_rank0.log" ;;
esac; done
