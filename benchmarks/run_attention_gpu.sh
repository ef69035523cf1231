#!/bin/bash
# One device call: GPU tests of the Triton ragged paged attention kernel, then the benchmark.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | tee $OUT/gpu.txt
timeout ${TEST_S:-480} python -m pytest -q -x -m gpu tests/test_ragged_paged_attention_triton.py 2>&1 | tail -40 | tee $OUT/pytest_gpu.log
python benchmarks/bench_attention.py --out $OUT/bench_attention.json "$@" 2>&1 | grep -v Warning | tee $OUT/bench.log
for ps in ${PAGE_SIZES:-}; do
  python benchmarks/bench_attention.py --out $OUT/bench_attention_ps$ps.json --page-size $ps --cases pagesize --no-ref 2>&1 | grep -v Warning | tail -8 | tee -a $OUT/bench.log
done
