#!/usr/bin/env bash
# Issue 4's GPU runs; PARTS picks what one device call does (each call must fit 10 minutes):
#   t  the gpu-marked FP8 kernel tests and the engine GPU tests (FP8 engine included)
#   s  a plan sweep on 2501's largest and smallest projections at decode-sized m
#   g  the GEMM table (both models, all projections, m = 1, 8, 64, 256, 4096)
#   G  grouped launches (q+k+v, w1+w3) against one launch per weight, decode m
#   e  end to end: random Mistral-Small-2501 weights, bf16 then fp8 (separate processes)
#   p  the layer-scan probe: per-layer slice vs whole stack + layer index into the kernel
#   M  the Mosaic GPU (wgmma) kernel: its GPU tests, then a Tiles sweep at prefill m against XLA
# CUPTI=1 adds each call's device time by kernel (launch gaps excluded) to parts s and g.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
for part in ${PARTS:-t s g}; do case $part in
t)
  timeout ${TESTS_S:-240} python3 -m pytest -v -m gpu -p no:cacheprovider tests/test_fp8_matmul.py tests/test_engine_gpu.py 2>&1 \
    | tee "$OUT/pytest_gpu_fp8.log" | tail -15 ;;
s)
  timeout ${SWEEP_S:-220} python3 benchmarks/bench_fp8_matmul.py --models 2501 --projs ${PROJS:-w1/w3,o} \
    --ms ${SWEEP_MS:-1,64,128,256} --sweep ${CUPTI:+--cupti} --out "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1; tail -12 "$OUT/sweep.log" ;;
g)
  timeout ${GEMM_S:-560} python3 benchmarks/bench_fp8_matmul.py --models ${MODELS:-2501,2409} ${GEMM_PROJS:+--projs $GEMM_PROJS} \
    ${GEMM_MS:+--ms $GEMM_MS} ${CUPTI:+--cupti} --out "$OUT/gemm_${MODELS:-all}.json" > "$OUT/gemm_${MODELS:-all}.log" 2>&1
  tail -30 "$OUT/gemm_${MODELS:-all}.log" ;;
G)
  timeout ${GROUP_S:-300} python3 benchmarks/bench_fp8_matmul.py --models ${MODELS:-2501,2409} --projs none --groups \
    --ms ${GROUP_MS:-1,8,64} --out "$OUT/gemm_groups.json" > "$OUT/gemm_groups.log" 2>&1; tail -14 "$OUT/gemm_groups.log" ;;
e)
  python3 benchmarks/bench_generate.py --engine ceilings --out "$OUT/ceilings.json" > "$OUT/ceilings.log" 2>&1 || tail -20 "$OUT/ceilings.log"
  # E2E_RUNS: bf16, fp8 (impl auto), fp8-triton (the kernel at every size: does it beat XLA's
  # fp8 dot in the model at prefill, where XLA must copy each layer's weight out of the stack?)
  for run in ${E2E_RUNS:-bf16 fp8}; do
    q=${run%%-*}; impl=auto; [ "$run" != "${run#*-}" ] && impl=${run#*-}
    timeout ${E2E_S:-240} python3 benchmarks/bench_generate.py --engine ours --quantization $q --fp8-impl $impl \
      --decode-batches 1,8,64 --out "$OUT/gen_$run.json" > "$OUT/gen_$run.log" 2>&1 || tail -30 "$OUT/gen_$run.log"
  done
  python3 benchmarks/bench_generate.py --table "$OUT/ceilings.json" "$OUT"/gen_*.json | tee "$OUT/table_fp8_e2e.md" ;;
M)
  timeout ${MTEST_S:-150} python3 -m pytest -v -m gpu -p no:cacheprovider tests/test_fp8_matmul.py -k MosaicGPU 2>&1 \
    | tee "$OUT/pytest_gpu_mgpu.log" | tail -15
  timeout ${MSWEEP_S:-360} python3 benchmarks/bench_fp8_matmul.py --models ${MODELS:-2501} --projs ${MPROJS:-w1/w3,w2,q} \
    --ms ${MSWEEP_MS:-4096,512} --mgpu-sweep --no-triton --out "$OUT/mgpu_sweep.json" > "$OUT/mgpu_sweep.log" 2>&1
  tail -40 "$OUT/mgpu_sweep.log" ;;
p)
  timeout ${PROBE_S:-120} python3 benchmarks/probe_scan_fp8.py --out "$OUT/probe_scan_fp8.json" 2>&1 \
    | grep -v "^    " | tee "$OUT/probe.log" ;;
esac; done
# The device tool returns at most 8 files: BUNDLE=1 packs everything into one archive.
if [ -n "${BUNDLE:-}" ]; then
  tar czf /tmp/fp8_results.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/fp8_results.tgz "$OUT/"
fi
