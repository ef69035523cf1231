#!/usr/bin/env bash
# HTTP serving: bench_http.py (the server over loopback against the in-process engine, same
# workloads, same call; random weights of CONFIG) for each of QUANTS.
#   benchmarks/run_http_gpu.sh OUT_DIR [WHEEL_DIR]
# WHEEL_DIR: the server's, mistral-common's and aiohttp's wheels where the machine lacks them.
# Env: QUANTS ("bf16 fp8"), WORKLOADS, CLIENT (bench_http's client flags; default aiohttp in 4
# processes), API_SERVERS (the server's HTTP processes; default the server's choice), REPEATS
# (measured runs per workload; the one of median TTFT is reported), STEP_LOG=1 (keep the
# engine's per-step log), TAG (names the outputs), RUN_S.
set -uo pipefail
source "$(dirname "$0")/common.sh"
bench_setup "$@"
WORKLOADS=${WORKLOADS:-1x128x128,16x128x128,64x128x128,16x1024x256,64x1024x256}
CLIENT=${CLIENT:---client aiohttp --client-procs 4}
TAG=${TAG:-}
# Which processes hold GPU memory while the benchmark runs (the HTTP processes must hold none).
(while sleep 15; do nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader; echo; done) \
  >> "$OUT/gpu_apps$TAG.txt" 2>&1 &
watcher=$!
trap 'kill $watcher 2>/dev/null; bench_cleanup' EXIT
for q in ${QUANTS:-bf16 fp8}; do
  flag=$([ $q = fp8 ] && echo "--quantization fp8")
  [ -n "${STEP_LOG:-}" ] && export MISTRAL_JAX_STEP_LOG=$OUT/steps_$q$TAG.jsonl
  timeout ${RUN_S:-280} python3 benchmarks/bench_http.py --config ${CONFIG:-mistral-small-2501} $flag --workloads "$WORKLOADS" \
    $CLIENT ${API_SERVERS:+--api-server-count $API_SERVERS} --repeats ${REPEATS:-1} --out "$OUT/http_$q$TAG.json" \
    > "$OUT/http_$q$TAG.log" 2>&1 || tail -20 "$OUT/http_$q$TAG.log"
  echo "== $q $CLIENT"; grep -E "^ *[0-9]+x|HTTP process| runs: " "$OUT/http_$q$TAG.log"
done
