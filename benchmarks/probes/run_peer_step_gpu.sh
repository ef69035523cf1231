#!/usr/bin/env bash
# The decode step (probe_step_flags.py) of this tree against peer trees in one call, alternating,
# one process each: QUANTS (bf16 fp8), BATCHES (1,32,64).
#   benchmarks/probes/run_peer_step_gpu.sh OUT_DIR PEER_TREE... [-- WHEEL_DIR]
# A peer tree: e.g. `git archive REV mistral_jax pallas_kernels benchmarks configs | tar -x -C DIR`.
set -uo pipefail
OUT_ARG=${1:?usage: $0 OUT_DIR PEER_TREE... [-- WHEEL_DIR]}; shift
PEERS=(); WHEELS=
while [ $# -gt 0 ]; do
  if [ "$1" = -- ]; then WHEELS=${2:-}; break; fi
  PEERS+=("$(cd "$1" && pwd)"); shift
done
source "$(dirname "$0")/../common.sh"
bench_setup "$OUT_ARG" "$WHEELS"
trap bench_cleanup EXIT
for q in ${QUANTS:-bf16 fp8}; do
  quant=$([ $q = fp8 ] && echo "--quantization fp8")
  for tree in "${PEERS[@]}" "$REPO"; do
    (cd "$tree" && PYTHONPATH=$tree:$tree/benchmarks:${PYTHONPATH:-} timeout ${RUN_S:-140} python3 benchmarks/probes/probe_step_flags.py \
      $quant --batches ${BATCHES:-1,32,64} 2>&1 | grep -E "RESULT|Error" | sed "s|^|$(basename "$tree") $q |" | tee -a "$OUT/peer_step.log")
  done
done
