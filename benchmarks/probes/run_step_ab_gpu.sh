#!/usr/bin/env bash
# The decode step (step_ab.py) of two source trees in one GPU call, alternating, one process each,
# ROUNDS rounds: QUANTS (bf16 fp8), BATCHES (1,32,64).
#   benchmarks/probes/run_step_ab_gpu.sh OUT_DIR OLD_TREE NEW_TREE
# A tree holds mistral_jax/, pallas_kernels/ and configs/ (git archive REV ... | tar -x -C DIR).
set -uo pipefail
OUT=$1; OLD=$2; NEW=$3
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PROBE=$(cd "$(dirname "$0")" && pwd)/step_ab.py
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
for round in $(seq 1 "${ROUNDS:-1}"); do
  for q in ${QUANTS:-bf16 fp8}; do
    quant=$([ "$q" = fp8 ] && echo "--quantization fp8")
    for label in old new; do
      tree=$([ $label = old ] && echo "$OLD" || echo "$NEW")
      (cd "$tree" && PYTHONPATH=$(pwd):${PYTHONPATH:-} timeout "${RUN_S:-200}" python3 "$PROBE" $quant --batches "${BATCHES:-1,32,64}" \
        --label "$label" 2>&1 | grep -E "RESULT|Error" | sed "s|^|$label $q r$round |" | tee -a "$OUT/step_ab.log")
    done
  done
done
