#!/usr/bin/env bash
# The HTTP server of two source trees, measured in one call on one GPU: for each QUANTS entry, the
# server of each tree (random weights of CONFIG) on a loopback port, then bench_http.py's client
# (--url: the same client for both) on WORKLOADS, REPEATS measured runs each; trees alternate.
#   benchmarks/run_http_ab_gpu.sh OUT_DIR OLD_TREE NEW_TREE [WHEEL_DIR]
# A tree is a folder holding mistral_jax/ and pallas_kernels/ (e.g. `git archive REV mistral_jax
# pallas_kernels configs | tar -x -C DIR`). WHEEL_DIR: wheels to install first, where the machine
# lacks the server's packages (fastapi, uvicorn, ..., mistral-common, aiohttp).
# Env: QUANTS ("bf16 fp8"), CONFIG (mistral-small-2501), MAX_MODEL_LEN (4096), WORKLOADS
# (16x128x128,64x128x128), REPEATS (2).
set -uo pipefail
[ $# -ge 3 ] || { echo "usage: $0 OUT_DIR OLD_TREE NEW_TREE [WHEEL_DIR]" >&2; exit 2; }
OLD=$(cd "$2" && pwd) || exit 2
NEW=$(cd "$3" && pwd) || exit 2
WHL=${4:+$(cd "$4" && pwd)}
source "$(dirname "$0")/common.sh"
bench_setup "$1" "$WHL"
CONFIG=${CONFIG:-mistral-small-2501}
WORKLOADS=${WORKLOADS:-16x128x128,64x128x128}
BENCH=$REPO/benchmarks/bench_http.py
SERVER=  # the running server's pid: the leader of its own session and process group (setsid)
stop_server() {  # SIGTERM to the server (it drains and stops its engine), then the group killed
  [ -n "$SERVER" ] || return 0
  kill -TERM "$SERVER" 2>/dev/null
  for _ in $(seq 1 40); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.5; done
  kill -9 -- "-$SERVER" 2>/dev/null
  SERVER=
}
trap 'stop_server; bench_cleanup' EXIT
run() {  # tree label quant
  local tree=$1 label=$2 q=$3 port=$((8100 + RANDOM % 800)) flag rc
  flag=$([ "$q" = fp8 ] && echo "--quantization fp8")
  (cd "$tree" && PYTHONPATH=$tree:${PYTHONPATH:-} exec setsid python3 -m mistral_jax.serve --load-format dummy \
     --config "$CONFIG" $flag --max-model-len ${MAX_MODEL_LEN:-4096} --port $port --served-model-name bench \
     > "$OUT/server_${label}_$q.log" 2>&1) &
  SERVER=$!
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    kill -0 "$SERVER" 2>/dev/null || break
    sleep 1
  done
  timeout 200 python3 "$BENCH" --url "http://127.0.0.1:$port" --model-name bench --workloads "$WORKLOADS" \
    --client aiohttp --client-procs 4 --repeats "${REPEATS:-2}" --out "$OUT/http_${label}_$q.json" \
    > "$OUT/http_${label}_$q.log" 2>&1
  rc=$?
  stop_server
  echo "== $label $q (rc $rc)"; grep -E "^ *[0-9]+x" "$OUT/http_${label}_$q.log"
}
for q in ${QUANTS:-bf16 fp8}; do
  if [ "$q" = fp8 ]; then run "$NEW" new $q; run "$OLD" old $q; else run "$OLD" old $q; run "$NEW" new $q; fi
done
