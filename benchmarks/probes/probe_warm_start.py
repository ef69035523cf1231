"""Where a warm start's warm-up goes: JAX's compile-path events summed over Engine.warmup().

    export MISTRAL_JAX_CACHE_DIR=$(mktemp -d)
    python benchmarks/probes/probe_warm_start.py --config tiny   # twice: cold, then warm
"""
import argparse
import collections
import time

import jax

totals = collections.defaultdict(float)
counts = collections.Counter()


def listen(event, duration, **kw):
    totals[event] += duration
    counts[event] += 1


jax.monitoring.register_event_duration_secs_listener(listen)

p = argparse.ArgumentParser()
p.add_argument("--config", default="tiny")
p.add_argument("--quantization")
p.add_argument("--max-model-len", type=int, default=512)
p.add_argument("--min-compile-secs", type=float)
p.add_argument("--profile", type=int, default=0, help="print the N largest cumulative entries of a cProfile")
args = p.parse_args()
if args.min_compile_secs is not None:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", args.min_compile_secs)
import mistral_jax.engine.programs as programs  # noqa: E402
from mistral_jax import LLM  # noqa: E402

# The engine's programs: seconds spent getting them (loading a stored executable, or lowering and
# compiling), apart from running them (which, for a loaded program, includes XLA instantiating its
# custom calls: Mosaic GPU kernels compile then, in-process, and are not cached across processes).
get_seconds = [0.0]
_get = programs.Program._get


def timed_get(self, args):
    t = time.perf_counter()
    try:
        return _get(self, args)
    finally:
        get_seconds[0] += time.perf_counter() - t


programs.Program._get = timed_get

prof = None
if args.profile:
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
t = time.perf_counter()
llm = LLM(load_format="dummy", config=args.config, quantization=args.quantization, max_model_len=args.max_model_len,
          warmup=True, progress=False)
if prof:
    prof.disable()
print(f"start {time.perf_counter() - t:.1f} s, warm-up {llm.warmup_seconds:.1f} s, {llm.warmup_programs} programs")
progs = [p for p in vars(llm.engine).values() if isinstance(p, programs.Program)]
print(f"programs loaded {sum(p.loaded for p in progs)}, compiled {sum(p.compiled for p in progs)}; "
      f"getting them {get_seconds[0]:.2f} s, running them once {llm.warmup_seconds - get_seconds[0]:.2f} s")
for k in sorted(totals, key=totals.get, reverse=True):
    print(f"{totals[k]:8.2f} s  x{counts[k]:4d}  {k}")
if prof:
    import pstats
    pstats.Stats(prof).sort_stats("cumulative").print_stats(args.profile)
