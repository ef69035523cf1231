"""Probe: where a decode step's time goes on a mesh. Traces a few engine steps (random weights of
a named config) with the JAX profiler, then sums each GPU stream's kernels from the trace, read
back by jax.profiler.ProfileData (no TensorFlow needed).

    python benchmarks/probes/probe_mesh_trace.py run --mesh tp=2 --out trace_dir      # on the GPUs
    python benchmarks/probes/probe_mesh_trace.py run --mesh tp=1 --quantization fp8 --batch 32 --out d
    python benchmarks/probes/probe_mesh_trace.py summarize trace_dir --steps 5        # anywhere

`summarize` also splits each stream's busy time into kernel kinds (the weight-streaming matmuls,
attention, collectives, everything else) and divides by the traced decode steps: issue 19's
per-step account (a prefill is traced first when the request is admitted inside the trace, so
run with --steps large enough to make it small, or read the per-kernel lines).

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
    import bench_generate as bg
    import jax

    from mistral_jax.sample.sampling import SamplingParams

    engine, _, _ = bg.random_engine(args.config, "bfloat16", args.quantization, "auto", args.mesh,
                                    max_num_seqs=max(8, args.batch), max_num_batched_tokens=max(512, 64 * args.batch),
                                    enable_prefix_caching=False)
    prompt = list(range(10, 74))
    for i in range(args.batch):  # enough tokens for the warm steps and the traced ones
        engine.add_request(prompt, SamplingParams(max_tokens=args.steps + 64, temperature=0.0, ignore_eos=True),
                           index=i)

    def steps(n):  # ms per engine step (launch one, read the one before)
        t = time.perf_counter()
        for _ in range(n):
            engine.step()
        return round((time.perf_counter() - t) / n * 1e3, 2)

    print("warm ms/step:", steps(24), flush=True)  # prefill, compiles, then steady decode steps
    with jax.profiler.trace(args.out):
        print("traced ms/step:", steps(args.steps), flush=True)


KINDS = (  # (kind, substrings of kernel names), first match wins
    ("matmul (weights)", ("gemm", "cutlass", "nvjet", "fp8_matmul", "wgmma", "matmul", "dot")),
    ("attention", ("attention", "ragged", "paged")),
    ("collective", ("nccl", "all_reduce", "allreduce", "all-reduce", "all_gather")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def summarize(args):
    from jax.profiler import ProfileData

    for path in glob.glob(os.path.join(args.trace, "**", "*.xplane.pb"), recursive=True):
        planes = list(ProfileData.from_file(path).planes)
        host_events = [(e, line.name) for p in planes if p.name.startswith("/host:CPU")
                       for line in p.lines for e in line.events]
        for plane in planes:
            if plane.name.startswith("/host:CPU") and args.host:
                _summarize_host(plane, args.host)
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
                kinds = collections.Counter()
                for name, ns in busy.items():
                    kinds[kind_of(name)] += ns
                gap = span - sum(busy.values())
                per = f" = {{:.3f}} ms per step ({args.steps} steps)" if args.steps else ""
                for kind, ns in list(kinds.most_common()) + [("idle between kernels", gap)]:
                    print(f"    {kind:22s} {ns / 1e6:8.2f} ms" + (per.format(ns / 1e6 / args.steps) if per else ""))
                # Where the idle time sits: the gaps summed by the kernels on either side of them.
                events.sort(key=lambda e: e.start_ns)
                gaps, gap_count = collections.Counter(), collections.Counter()
                for a, b in zip(events, events[1:]):
                    idle = b.start_ns - (a.start_ns + a.duration_ns)
                    if idle > 0:
                        pair = f"{a.name[:40]} -> {b.name[:40]}"
                        gaps[pair] += idle
                        gap_count[pair] += 1
                for pair, ns in gaps.most_common(args.gaps):
                    print(f"    gap {ns / 1e6:8.3f} ms {gap_count[pair]:5d}x  {pair}")
                if args.host and len(events) > 100:  # the compute stream: what the host did in its longest gaps
                    _host_in_gaps(events, host_events, args.host)


def _summarize_host(plane, top: int) -> None:
    """The host's threads that did most: each one's busiest event names (total time, count), so
    a device gap can be matched to what the host was doing (launching, waiting, Python)."""
    lines = []
    for line in plane.lines:
        events = list(line.events)
        if events:
            lines.append((sum(e.duration_ns for e in events), line.name, events))
    print(plane.name)
    for busy, name, events in sorted(lines, key=lambda x: -x[0])[:4]:
        total, count = collections.Counter(), collections.Counter()
        for e in events:
            if not e.name.startswith("$"):  # Python frames: the gaps' listing shows those
                total[e.name[:70]] += e.duration_ns
                count[e.name[:70]] += 1
        print(f"  thread {name}: {len(events)} events, {busy / 1e6:.1f} ms (nested events counted in each; "
              f"Python frames left out)")
        for ev, ns in total.most_common(top):
            print(f"    {ns / 1e6:8.2f} ms {count[ev]:5d}x  {ev}")


def _host_in_gaps(events, host_events, top: int) -> None:
    """The 3 longest idle gaps of a device stream, each with the host's longest events that
    overlap it (the clocks of the host and device planes are one)."""
    gaps = sorted(((b.start_ns - (a.start_ns + a.duration_ns), a, b) for a, b in zip(events, events[1:])),
                  key=lambda g: -g[0])[:3]
    for idle, a, b in gaps:
        lo, hi = a.start_ns + a.duration_ns, b.start_ns
        print(f"    longest gap {idle / 1e3:.0f} us, {a.name[:30]} -> {b.name[:30]}; host events over it:")
        over = [(min(e.start_ns + e.duration_ns, hi) - max(e.start_ns, lo), e, t) for e, t in host_events
                if e.start_ns < hi and e.start_ns + e.duration_ns > lo]
        for ns, e, t in sorted(over, key=lambda o: -o[0])[:top]:
            print(f"      {ns / 1e3:7.0f} us of {e.duration_ns / 1e3:7.0f} us (from {(e.start_ns - lo) / 1e3:+.0f})"
                  f"  [{t[:20]}] {e.name[:70]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--config", default="mistral-small-2501")
    r.add_argument("--mesh", default="tp=2")
    r.add_argument("--steps", type=int, default=5)
    r.add_argument("--quantization", default=None, choices=(None, "fp8"))
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--out", default="trace")
    s = sub.add_parser("summarize")
    s.add_argument("trace")
    s.add_argument("--top", type=int, default=8)
    s.add_argument("--gaps", type=int, default=12, help="idle gaps listed, by the kernels around them")
    s.add_argument("--steps", type=int, default=0, help="decode steps traced: print kinds per step")
    s.add_argument("--host", type=int, default=0, help="list this many event names of the host's busiest threads")
    args = ap.parse_args()
    run(args) if args.cmd == "run" else summarize(args)


if __name__ == "__main__":
    main()
