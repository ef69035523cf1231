"""The HTTP side's CPU per streamed chunk: the server's main thread (the event loop: parsing,
SSE formatting, writes) over a streamed workload, in CPU microseconds per chunk and per request
(a workload of one output token, e.g. 64x128x1, shows the per-request part), and the whole HTTP
process's (the engine runs in a child process, not counted). On the GPU the step hides the host's
work only while both fit in one core's GIL time.

    python benchmarks/probes/probe_http_chunk_cost.py --config tiny --workloads 64x128x128
"""

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_http import requests_of, run_http  # noqa: E402


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="tiny")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--quantization")
    p.add_argument("--workloads", default="64x128x128")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    from mistral_jax.loading.dummy import dummy_config

    vocab = dummy_config(args.config).vocab_size
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--load-format", "dummy", "--config", args.config, "--max-model-len", str(args.max_model_len), "--warmup",
             "--served-model-name", "bench", "--port", str(port), "--max-num-seqs", "64"]
    flags += ["--quantization", args.quantization] if args.quantization else []
    server = subprocess.Popen([sys.executable, "-m", "mistral_jax.serve", *flags], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        for w in args.workloads.split(","):
            reqs = requests_of(w, vocab)
            asyncio.run(run_http(url, reqs, "bench"))  # first use of each program's shapes
            for _ in range(args.repeats):
                main0, all0 = cpu_seconds(server.pid, server.pid), cpu_seconds(server.pid)
                r = asyncio.run(run_http(url, reqs, "bench"))
                main1, all1 = cpu_seconds(server.pid, server.pid), cpu_seconds(server.pid)
                print(f"{w}: {r['output_tokens_per_s']:8.1f} tok/s; "
                      f"event loop {1e6 * (main1 - main0) / r['tokens']:6.1f} "
                      f"us CPU per chunk ({1e6 * (main1 - main0) / r['requests']:7.1f} per request), HTTP process "
                      f"{1e6 * (all1 - all0) / r['tokens']:6.1f} per chunk; TTFT p50 {r['ttft_ms_p50']:.1f} ms",
                      flush=True)
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
