"""Probe: where a decode step's time goes on a mesh. Traces a few engine steps (random weights of
a named config) with the JAX profiler, then sums each GPU stream's kernels from the trace, read
back by jax.profiler.ProfileData (no TensorFlow needed).

    python benchmarks/probe_mesh_trace.py run --mesh tp=2 --out trace_dir      # on the GPUs
    python benchmarks/probe_mesh_trace.py summarize trace_dir                  # anywhere

A compute stream whose busy time is far below its span is waiting: on two H200s at tp=2 the
compute stream was busy 59 of the 164 ms traced (a prefill and 5 decode steps), the rest spent
between all-reduces (results/2026-11-24_h200x2_multigpu/).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import time


def run(args):
    import jax

    import bench_generate as bg
    from mistral_jax.sampling import SamplingParams

    engine, _, _ = bg.random_engine(args.config, "bfloat16", None, "auto", args.mesh, max_num_seqs=1,
                                    max_num_batched_tokens=512, enable_prefix_caching=False)
    prompt = list(range(10, 74))

    def steps(n):  # ms between the request's events (one per decode step)
        engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), index=0)
        t = [time.perf_counter() for _ in engine.run()]
        return [round((b - a) * 1e3, 2) for a, b in zip(t, t[1:])]

    print("warm ms/step:", steps(12)[-4:], flush=True)  # compiles, then steady steps
    with jax.profiler.trace(args.out):
        print("traced ms/step:", steps(args.steps + 1), flush=True)


def summarize(args):
    from jax.profiler import ProfileData

    for path in glob.glob(os.path.join(args.trace, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            print(plane.name)
            for line in plane.lines:
                events = list(line.events)
                if not events:
                    continue
                busy, count = collections.Counter(), collections.Counter()
                for e in events:
                    busy[e.name[:60]] += e.duration_ns
                    count[e.name[:60]] += 1
                span = events[-1].start_ns + events[-1].duration_ns - events[0].start_ns
                print(f"  {line.name}: {len(events)} events, span {span / 1e6:.1f} ms, "
                      f"busy {sum(busy.values()) / 1e6:.1f} ms")
                for name, ns in busy.most_common(args.top):
                    print(f"    {ns / 1e6:8.2f} ms {count[name]:5d}x  {name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--config", default="mistral-small-2501")
    r.add_argument("--mesh", default="tp=2")
    r.add_argument("--steps", type=int, default=5)
    r.add_argument("--out", default="trace")
    s = sub.add_parser("summarize")
    s.add_argument("trace")
    s.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    run(args) if args.cmd == "run" else summarize(args)


if __name__ == "__main__":
    main()
