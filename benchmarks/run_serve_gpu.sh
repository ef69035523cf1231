#!/usr/bin/env bash
# Issue 3's GPU runs, one device call per part (each fits the 10-minute limit):
#   PART=t  the gpu-marked tests (kernel against its reference, engine with the kernel against
#           the engine with the reference); the CPU-only test modules need mistral-common,
#           which the device lacks, so only the gpu modules are collected
#   PART=a  ceilings, bench_generate (paged engine) and its transformers peer
#   PART=b  bench_serve (continuous batching, prefix cache) and its transformers peer
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks
CONFIG=${CONFIG:-mistral-small-2501}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
if [ "${PART:-a}" = t ]; then
  timeout ${TESTS_S:-540} python3 -m pytest -v -m gpu -p no:cacheprovider \
    tests/test_ragged_paged_attention_triton.py tests/test_engine_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
elif [ "${PART:-a}" = a ]; then
  python3 benchmarks/bench_generate.py --engine ceilings --out "$OUT/ceilings.json" > "$OUT/ceilings.log" 2>&1 || tail -20 "$OUT/ceilings.log"
  timeout 200 python3 benchmarks/bench_generate.py --engine ours --config "$CONFIG" --out "$OUT/gen_ours.json" > "$OUT/gen_ours.log" 2>&1 || tail -30 "$OUT/gen_ours.log"
  timeout 120 python3 benchmarks/bench_generate.py --engine hf --config "$CONFIG" --out "$OUT/gen_hf.json" > "$OUT/gen_hf.log" 2>&1 || tail -30 "$OUT/gen_hf.log"
  python3 benchmarks/bench_generate.py --table "$OUT/ceilings.json" "$OUT/gen_ours.json" "$OUT/gen_hf.json" | tee "$OUT/table_generate.md"
else
  timeout ${OURS_S:-420} python3 benchmarks/bench_serve.py --engine ours --config "$CONFIG" --out "$OUT/serve_ours.json" > "$OUT/serve_ours.log" 2>&1 || tail -30 "$OUT/serve_ours.log"
  timeout 150 python3 benchmarks/bench_serve.py --engine hf --config "$CONFIG" --out "$OUT/serve_hf.json" > "$OUT/serve_hf.log" 2>&1 || tail -30 "$OUT/serve_hf.log"
  python3 benchmarks/bench_serve.py --table ${CEILINGS:-} "$OUT/serve_ours.json" "$OUT/serve_hf.json" | tee "$OUT/table_serve.md"
fi
