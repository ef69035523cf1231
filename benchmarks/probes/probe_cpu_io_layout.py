"""Issue 20: the default model's decode on the CPU with its 16-bit projections stored [in, out]
(x @ w: what the engine does on a CPU, projections.prefers_input_major) against the checkpoints'
[out, in] (x @ w.T): two worker processes, the idle one stopped (SIGSTOP), alternating rounds of
batch 1 and batch 8 (bench_cpu_default's prompts and counts).

    python benchmarks/probes/probe_cpu_io_layout.py --rounds 12
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def worker(variant: str) -> int:
    os.environ["MISTRAL_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"mj_{variant}_")  # no stored executables shared
    if variant == "base":  # the checkpoints' layout
        import mistral_jax.entrypoints.llm

        mistral_jax.model.kernels.prefers_input_major = lambda platform=None: False
    import bench_cpu_default as bench
    import numpy as np

    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(100, 49000, size=(b, bench.PROMPT_TOKENS)).tolist() for b in bench.BATCHES}
    run = bench.ours()
    for b in bench.BATCHES:
        run(prompts[b])
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(run(prompts[int(line)])), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--worker", choices=("base", "io"))
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    procs = {v: subprocess.Popen([sys.executable, __file__, "--worker", v], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for v in ("base", "io")}
    for v, p in procs.items():
        assert p.stdout.readline().strip() == "ready", v
    res = {v: {1: [], 8: []} for v in procs}
    for _ in range(args.rounds):
        for b in (1, 8):
            for v, p in procs.items():
                for other in procs.values():
                    os.kill(other.pid, signal.SIGCONT if other is p else signal.SIGSTOP)
                p.stdin.write(f"{b}\n")
                p.stdin.flush()
                res[v][b].append(round(json.loads(p.stdout.readline())[1], 1))
    for p in procs.values():
        os.kill(p.pid, signal.SIGCONT)
        p.stdin.close()
        p.wait()
    out = {v: {f"batch{b}": dict(median=statistics.median(r), rounds=r) for b, r in by.items()}
           for v, by in res.items()}
    out["io_over_base"] = {f"batch{b}": statistics.median(i / j for i, j in zip(res["io"][b], res["base"][b]))
                           for b in (1, 8)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
