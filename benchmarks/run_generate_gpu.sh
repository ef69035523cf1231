#!/usr/bin/env bash
# Offline engine, latency: the device's ceilings (copy bandwidth, bf16 matmul), then
# bench_generate.py (prefill and steady decode at several batch sizes, random weights of CONFIG)
# for each of QUANTS, optionally the transformers peer (HF=1), and one table.
#   benchmarks/run_generate_gpu.sh OUT_DIR [WHEEL_DIR]
# Env: CONFIG (mistral-small-2501), QUANTS ("bf16 fp8"), DECODE_BATCHES (1,8,64), HF (unset), RUN_S.
set -uo pipefail
source "$(dirname "$0")/common.sh"
bench_setup "$@"
trap bench_cleanup EXIT
CONFIG=${CONFIG:-mistral-small-2501}
python3 benchmarks/bench_generate.py --engine ceilings --out "$OUT/ceilings.json" > "$OUT/ceilings.log" 2>&1 || tail -20 "$OUT/ceilings.log"
for q in ${QUANTS:-bf16 fp8}; do
  timeout ${RUN_S:-280} python3 benchmarks/bench_generate.py --engine ours --config "$CONFIG" --quantization $q \
    --decode-batches ${DECODE_BATCHES:-1,8,64} --out "$OUT/generate_$q.json" > "$OUT/generate_$q.log" 2>&1 || tail -30 "$OUT/generate_$q.log"
done
if [ -n "${HF:-}" ]; then
  timeout ${RUN_S:-280} python3 benchmarks/bench_generate.py --engine hf --config "$CONFIG" --out "$OUT/generate_hf.json" > "$OUT/generate_hf.log" 2>&1 || tail -30 "$OUT/generate_hf.log"
fi
python3 benchmarks/bench_generate.py --table "$OUT/ceilings.json" "$OUT"/generate_*.json | tee "$OUT/table_generate.md"
