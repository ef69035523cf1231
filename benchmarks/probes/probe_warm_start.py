"""Where a warm start's warm-up goes: JAX's compile-path events summed over Engine.warmup().

    MISTRAL_JAX_CACHE_DIR=/tmp/c python benchmarks/probes/probe_warm_start.py --config tiny   # twice
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
from mistral_jax import LLM  # noqa: E402

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
for k in sorted(totals, key=totals.get, reverse=True):
    print(f"{totals[k]:8.2f} s  x{counts[k]:4d}  {k}")
if prof:
    import pstats
    pstats.Stats(prof).sort_stats("cumulative").print_stats(args.profile)
