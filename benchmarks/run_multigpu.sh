#!/usr/bin/env bash
# Several GPUs (nvidia-h200-x2 or -x4): bench_generate.py with random weights of CONFIG (bf16),
# decode at batch 1 and 64 and prefill, on meshes tp = 1, 2, 4 (up to the GPUs present), then one
# process per GPU joined by jax.distributed (tp over all GPUs). PARTS picks the runs of one call
# (each must fit 10 minutes): "ceil 1 2", "4", "mp". Then, where the JSON files land:
#   python benchmarks/bench_generate.py --table OUT_DIR/generate_*.json --scaling
#   benchmarks/run_multigpu.sh OUT_DIR [WHEEL_DIR]
set -uo pipefail
source "$(dirname "$0")/common.sh"
bench_setup "$@"
trap bench_cleanup EXIT
N=$(nvidia-smi -L | wc -l)
ARGS="--engine ours --config ${CONFIG:-mistral-small-2501} --decode-batches 1,64"
for part in ${PARTS:-ceil 1 2}; do case $part in
ceil)
  python3 benchmarks/bench_generate.py --engine ceilings --out "$OUT/ceilings.json" > "$OUT/ceilings.log" 2>&1 ;;
1|2|4)
  if [ "$part" -gt "$N" ]; then echo "tp=$part: only $N GPUs"; continue; fi
  timeout ${RUN_S:-280} python3 benchmarks/bench_generate.py $ARGS --mesh tp=$part --out "$OUT/generate_tp$part.json" \
    > "$OUT/generate_tp$part.log" 2>&1 || tail -20 "$OUT/generate_tp$part.log" ;;
mp)  # one process per GPU, each seeing only its own
  PORT=$((20000 + RANDOM % 20000))
  for i in $(seq 0 $((N - 1))); do
    CUDA_VISIBLE_DEVICES=$i JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
      timeout ${RUN_S:-280} python3 benchmarks/bench_generate.py $ARGS --mesh tp=$N --out "$OUT/generate_mp$N.json" \
      > "$OUT/generate_mp_rank$i.log" 2>&1 &
  done
  wait; tail -5 "$OUT/generate_mp_rank0.log" ;;
esac; done
