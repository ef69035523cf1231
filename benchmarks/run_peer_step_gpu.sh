#!/usr/bin/env bash
# Issue 19: the decode step (probes/probe_step_flags.py) of this tree against a peer tree (PEER,
# e.g. the last commit, unpacked by `git archive HEAD mistral_jax pallas_kernels benchmarks configs`)
# in one call, alternating, one process each: QUANTS (bf16 fp8), BATCHES (1,32,64).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
for q in ${QUANTS:-bf16 fp8}; do
  quant=$([ $q = fp8 ] && echo "--quantization fp8")
  for tree in ${PEER:?} .; do
    (cd $tree && PYTHONPATH=.:benchmarks timeout ${RUN_S:-140} python3 benchmarks/probes/probe_step_flags.py $quant \
      --batches ${BATCHES:-1,32,64} 2>&1 | grep -E "RESULT|Error" | sed "s|^|$tree $q |" | tee -a "$OUT/peer_step.log")
  done
done
