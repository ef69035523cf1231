# The drivers' shared set-up, sourced by every benchmarks/run_*.sh:
#   bench_setup OUT_DIR [WHEEL_DIR]
# makes OUT_DIR (absolute), installs WHEEL_DIR/*.whl (if given) into a scratch folder put on
# PYTHONPATH, puts the repository and benchmarks/ on PYTHONPATH, and writes OUT_DIR/env.txt
# (GPUs, JAX, Python, the commit). SCRATCH is a temporary folder for anything that should not
# come back with the results; bench_cleanup removes it (call it from the driver's EXIT trap).
bench_setup() {
  OUT=${1:?usage: $0 OUT_DIR [WHEEL_DIR]}
  WHL=${2:-}
  mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
  REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  SCRATCH=$(mktemp -d)
  if [ -n "$WHL" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SCRATCH/site" "$WHL"/*.whl || exit 1
    export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$REPO:$REPO/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  {
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import jax, sys; print('jax', jax.__version__, 'python', sys.version.split()[0], jax.devices())" 2>&1 | tail -1
    echo "commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  } > "$OUT/env.txt"
  cd "$REPO" || exit 1
}

bench_cleanup() {
  [ -n "${SCRATCH:-}" ] && rm -rf "$SCRATCH"
}
