#!/usr/bin/env bash
# Issue 2's GPU benchmark in one device call: ceilings, ours, the transformers peer, one table.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
CONFIG=${CONFIG:-mistral-small-2501}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 benchmarks/bench_generate.py --engine ceilings --out "$OUT/ceilings.json" > "$OUT/ceilings.log" 2>&1 || tail -20 "$OUT/ceilings.log"
python3 benchmarks/bench_generate.py --engine ours --config "$CONFIG" --out "$OUT/ours_$CONFIG.json" > "$OUT/ours.log" 2>&1 || tail -30 "$OUT/ours.log"
python3 benchmarks/bench_generate.py --engine hf --config "$CONFIG" --out "$OUT/hf_$CONFIG.json" > "$OUT/hf.log" 2>&1 || tail -30 "$OUT/hf.log"
python3 benchmarks/bench_generate.py --table "$OUT/ceilings.json" "$OUT/ours_$CONFIG.json" "$OUT/hf_$CONFIG.json" | tee "$OUT/table_$CONFIG.md"
