#!/usr/bin/env bash
# Offline engine, throughput: bench_serve.py (continuous batching at several concurrencies, the
# prefix cache's gain on a shared system prompt; random weights of CONFIG) and, with HF=1, its
# transformers peer; one table.
#   benchmarks/run_serve_gpu.sh OUT_DIR [WHEEL_DIR]
# Env: CONFIG (mistral-small-2501), RUN_S, HF (unset).
set -uo pipefail
source "$(dirname "$0")/common.sh"
bench_setup "$@"
trap bench_cleanup EXIT
CONFIG=${CONFIG:-mistral-small-2501}
timeout ${RUN_S:-420} python3 benchmarks/bench_serve.py --engine ours --config "$CONFIG" --out "$OUT/serve_ours.json" > "$OUT/serve_ours.log" 2>&1 || tail -30 "$OUT/serve_ours.log"
if [ -n "${HF:-}" ]; then
  timeout 150 python3 benchmarks/bench_serve.py --engine hf --config "$CONFIG" --out "$OUT/serve_hf.json" > "$OUT/serve_hf.log" 2>&1 || tail -30 "$OUT/serve_hf.log"
fi
python3 benchmarks/bench_serve.py --table "$OUT"/serve_*.json | tee "$OUT/table_serve.md"
