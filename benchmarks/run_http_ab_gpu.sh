#!/usr/bin/env bash
# The HTTP server of two source trees, measured in one call on one GPU: for each QUANTS entry, the
# server of each tree (random weights of CONFIG) on a loopback port, then bench_http.py's client
# (--url: the same client for both) on WORKLOADS, REPEATS measured runs each; trees alternate.
#   benchmarks/run_http_ab_gpu.sh OUT_DIR OLD_TREE NEW_TREE [WHEEL_DIR]
# A tree is a folder holding mistral_jax/ and pallas_kernels/ (e.g. `git archive REV mistral_jax
# pallas_kernels configs | tar -x -C DIR`). WHEEL_DIR: wheels to install first (device README).
set -uo pipefail
OUT=$1; OLD=$2; NEW=$3; WHL=${4:-}
mkdir -p "$OUT"
if [ -n "$WHL" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
python3 -c "import jax, sys; print('jax', jax.__version__, 'python', sys.version.split()[0])" >> "$OUT/gpu.txt"
CONFIG=${CONFIG:-mistral-small-2501}
WORKLOADS=${WORKLOADS:-16x128x128,64x128x128}
BENCH=$(pwd)/benchmarks/bench_http.py
run() {  # tree label quant
  local tree=$1 label=$2 q=$3 port=$((8100 + RANDOM % 800)) flag pid rc
  flag=$([ "$q" = fp8 ] && echo "--quantization fp8")
  (cd "$tree" && PYTHONPATH=$(pwd):${PYTHONPATH:-} setsid python3 -m mistral_jax.serve --load-format dummy \
     --config "$CONFIG" $flag --max-model-len 4096 --port $port --served-model-name bench \
     > "$OUT/server_${label}_$q.log" 2>&1) &
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    sleep 1
  done
  pid=$(pgrep -f "mistral_jax.serve .*--port $port" | head -1)
  timeout 200 python3 "$BENCH" --url "http://127.0.0.1:$port" --model-name bench --workloads "$WORKLOADS" \
    --client aiohttp --client-procs 4 --repeats "${REPEATS:-2}" --out "$OUT/http_${label}_$q.json" \
    > "$OUT/http_${label}_$q.log" 2>&1
  rc=$?
  [ -n "$pid" ] && kill -TERM "$pid"
  for _ in $(seq 1 40); do pgrep -f "mistral_jax.serve .*--port $port" > /dev/null || break; sleep 0.5; done
  pkill -9 -f "mistral_jax.serve .*--port $port"; pkill -9 -f "multiprocessing.spawn" 2>/dev/null
  echo "== $label $q (rc $rc)"; grep -E "^ *[0-9]+x" "$OUT/http_${label}_$q.log"
}
trap 'pkill -9 -f mistral_jax.serve; pkill -9 -f multiprocessing.spawn' EXIT
for q in ${QUANTS:-bf16 fp8}; do
  if [ "$q" = fp8 ]; then run "$NEW" new $q; run "$OLD" old $q; else run "$OLD" old $q; run "$NEW" new $q; fi
done
