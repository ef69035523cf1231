"""Issue 18's benchmark: the HTTP server against the in-process engine, on the same workload.

    python benchmarks/bench_http.py --config mistral-small-2501 [--quantization fp8] --out r.json
    python benchmarks/bench_http.py --url http://127.0.0.1:8000 --workloads 16x128x128   # a running server

Without --url it starts `python -m mistral_jax.serve --load-format dummy --config ...` on a free
loopback port (warm-up on), runs every workload over HTTP (streamed /v1/completions with token-id
prompts, ignore_eos, greedy), stops it, then runs the same requests through the engine in a
fresh process (LLM(load_format="dummy"), all requests added at once). A workload CxPxO is C
concurrent requests of P prompt tokens and O output tokens; each runs 1 + --repeats times, the
first a warm-up (each run has other prompts of the same shapes: a run's own would all be
prefix-cache hits), the measured run of median TTFT reported.
Reported per workload: output tokens/s, time to first token and inter-token latency (p50, p99).
HTTP may cost at most 5% of tokens/s and 10 ms of TTFT (issue 18).

--client aiohttp (vLLM's benchmark client library) or httpx; --client-procs N splits each
workload's requests over N client processes that start together (one Python client at 64
streams spends its own time on every chunk, and that time lands in its TTFT)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import harness
import numpy as np

WORKLOADS = ("1x128x128", "16x128x128", "64x128x128", "1x1024x256", "16x1024x256", "64x1024x256")


def requests_of(workload: str, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    c, p, o = map(int, workload.split("x"))
    rng = np.random.default_rng([seed, c, p, o])  # per workload too: no run's prompts prefix another's
    return [(rng.integers(1000, vocab, size=p).tolist(), o) for _ in range(c)]


def summarize(wall: float, starts, firsts, stamps) -> dict:
    tokens = sum(len(s) for s in stamps)
    ttft = [f - s for s, f in zip(starts, firsts)]
    itl = [b - a for s in stamps for a, b in zip(s, s[1:])]
    pct = lambda xs, q: float(np.percentile(xs, q) * 1e3) if xs else None  # noqa: E731
    return {"output_tokens_per_s": tokens / wall, "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99), "requests": len(stamps), "tokens": tokens,
            "ttft_ms": sorted(round(t * 1e3, 1) for t in ttft)}  # the whole ramp: a burst's p50 is one place on it


async def stream_one(http, url: str, model: str, ids: list[int], out: int) -> tuple[float, list[float]]:
    """One streamed request: (its start, the time of each token's chunk)."""
    body = {"model": model, "prompt": ids, "max_tokens": out, "temperature": 0, "stream": True, "ignore_eos": True}
    start, stamps = time.perf_counter(), []
    if _is_aiohttp(http):
        async with http.post(url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.content:
                if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                    stamps.append(time.perf_counter())
        return start, stamps
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
    return start, stamps


async def run_http(url: str, reqs, model: str, http=None) -> dict:
    """Stream every request at once. http: a client to reuse (its connections stay open between
    runs, as a client's pool keeps them); None: a new httpx one."""

    async def run(http):
        before = await server_histograms(http, url)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_one(http, url, model, ids, o) for ids, o in reqs))
        wall = time.perf_counter() - t0
        after = await server_histograms(http, url)
        out = summarize(wall, [r[0] for r in results], [r[1][0] for r in results], [r[1] for r in results])
        return out | server_means(before, after)  # the server's own view

    if http is not None:
        return await run(http)
    async with _client("httpx") as http:
        return await run(http)


def _is_aiohttp(http) -> bool:
    return type(http).__module__.startswith("aiohttp")


def _client(kind: str):
    if kind == "aiohttp":
        import aiohttp

        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                     connector=aiohttp.TCPConnector(limit=0))
    import httpx

    return httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=1024))


SERVER_HISTOGRAMS = {"server_ttft_ms_mean": "time_to_first_token_seconds",  # admitted -> first token
                     "server_queue_ms_mean": "request_queue_time_seconds"}  # arrived at the server -> admitted


async def server_histograms(http, url: str) -> dict[str, tuple[float, float]] | None:
    """{our key: (sum, count)} of the server's histograms, from /metrics."""
    if _is_aiohttp(http):
        async with http.get(url + "/metrics") as r:
            status, text = r.status, await r.text()
    else:
        r = await http.get(url + "/metrics")
        status, text = r.status_code, r.text
    if status != 200:
        return None
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        for key, metric in SERVER_HISTOGRAMS.items():
            for part in ("sum", "count"):
                if name.endswith(f"{metric}_{part}"):
                    values.setdefault(key, {})[part] = float(value)
    return {k: (v["sum"], v["count"]) for k, v in values.items() if len(v) == 2}


def server_means(before, after) -> dict[str, float]:
    """The mean of each server histogram over the requests between two scrapes, in ms."""
    out = {}
    for key in (before or {}).keys() & (after or {}).keys():
        (s0, n0), (s1, n1) = before[key], after[key]
        if n1 > n0:
            out[key] = 1e3 * (s1 - s0) / (n1 - n0)
    return out


def run_engine(engine, reqs) -> dict:
    from mistral_jax.sample.sampling import SamplingParams

    t0 = time.perf_counter()
    for i, (ids, out) in enumerate(reqs):
        engine.add_request(ids, SamplingParams(temperature=0, max_tokens=out, ignore_eos=True), index=i)
    stamps = [[] for _ in reqs]
    for ev in engine.run():
        stamps[ev.index].append(time.perf_counter())
    wall = time.perf_counter() - t0
    return summarize(wall, [t0] * len(reqs), [s[0] for s in stamps], stamps)


def engine_flags(args) -> list[str]:
    flags = ["--load-format", "dummy", "--config", args.config, "--max-model-len", str(args.max_model_len),
             "--warmup" if args.warmup else "--no-warmup"]
    return flags + (["--quantization", args.quantization] if args.quantization else []) + (
        ["--dtype", args.dtype] if args.dtype else [])


def in_process(args) -> dict:
    from mistral_jax import LLM

    llm = LLM(load_format="dummy", config=args.config, max_model_len=args.max_model_len, quantization=args.quantization,
              dtype=args.dtype or "auto", warmup=args.warmup, progress=False)
    out = {}
    for w in args.workloads.split(","):
        run_engine(llm.engine, requests_of(w, llm.config.vocab_size, seed=0))
        out[w] = median_run([run_engine(llm.engine, requests_of(w, llm.config.vocab_size, seed=r))
                             for r in range(1, args.repeats + 1)])
    return out


def median_run(runs: list[dict]) -> dict:
    """The run of median TTFT p50, with every run's figures under "repeats" when there are several."""
    best = dict(sorted(runs, key=lambda r: r["ttft_ms_p50"])[len(runs) // 2])
    if len(runs) > 1:
        best["repeats"] = [{k: r[k] for k in REPEAT_KEYS if k in r} for r in runs]
    return best


REPEAT_KEYS = ("output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "server_queue_ms_mean", "server_ttft_ms_mean")


def over_http(args, url: str, vocab: int) -> dict:
    """Each workload twice on the same clients; the second counts (its connections already open)."""
    if args.client_procs > 1:
        return _over_http_procs(args, url, vocab)

    async def all_workloads():
        out = {}
        async with _client(args.client) as http:
            for w in args.workloads.split(","):
                await run_http(url, requests_of(w, vocab, seed=0), args.model_name, http)
                out[w] = median_run([await run_http(url, requests_of(w, vocab, seed=r), args.model_name, http)
                                     for r in range(1, args.repeats + 1)])
        return out

    return asyncio.run(all_workloads())


# ---- several client processes --------------------------------------------------------------
# Each worker keeps one client (and its connections) for the whole benchmark; a workload's
# requests are dealt round-robin, and every worker starts its share at the same moment
# (time.perf_counter is the system's monotonic clock, shared by processes).

_worker: dict = {}


def _worker_init(url: str, model: str, kind: str) -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    _worker.update(url=url, model=model, loop=loop, http=loop.run_until_complete(_enter(kind)))


async def _enter(kind):
    return await _client(kind).__aenter__()


def _worker_run(reqs, t_start: float):
    async def go():
        await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
        w = _worker
        return await asyncio.gather(*(stream_one(w["http"], w["url"], w["model"], ids, o) for ids, o in reqs))

    return _worker["loop"].run_until_complete(go())


async def _server_histograms_now(url: str):
    async with _client("httpx") as http:
        return await server_histograms(http, url)


def _over_http_procs(args, url: str, vocab: int) -> dict:
    import multiprocessing as mp

    n = args.client_procs
    with mp.get_context("spawn").Pool(n, _worker_init, (url, args.model_name, args.client)) as pool:
        out = {}
        for w in args.workloads.split(","):
            runs = []
            for seed in range(args.repeats + 1):  # seed 0: the warm-up run
                reqs = requests_of(w, vocab, seed)
                before = asyncio.run(_server_histograms_now(url))
                t0 = time.perf_counter() + 0.2
                parts = pool.starmap(_worker_run, [(reqs[i::n], t0) for i in range(n)])
                after = asyncio.run(_server_histograms_now(url))
                pairs = [pair for part in parts for pair in part]
                wall = max(s[-1] for _, s in pairs) - t0
                run = summarize(wall, [p[0] for p in pairs], [p[1][0] for p in pairs], [p[1] for p in pairs])
                run.update(server_means(before, after), client_procs=n)
                runs += [run] if seed else []
            out[w] = median_run(runs)
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mistral-small-2501")
    p.add_argument("--quantization", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--url", help="a running server (then no in-process peer)")
    p.add_argument("--model-name", default="bench")
    p.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp")
    p.add_argument("--client-procs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="measured runs per workload (new prompts each); "
                   "the one of median TTFT is reported, all under 'repeats'")
    p.add_argument("--api-server-count", type=int, default=None, help="the server's HTTP processes (default: its own)")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out")
    args = p.parse_args()
    if args.in_process:
        print("RESULT " + json.dumps(in_process(args)), flush=True)
        return
    from mistral_jax.loading.dummy import dummy_config

    vocab = dummy_config(args.config).vocab_size
    result = {"config": args.config, "quantization": args.quantization, "date": time.strftime("%Y-%m-%d"),
              "client": args.client, "client_procs": args.client_procs, "api_server_count": args.api_server_count}
    if args.url:
        result["http"] = over_http(args, args.url, vocab)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = tempfile.TemporaryFile("w+")  # a file, not an unread pipe that could fill and block the server
        server = subprocess.Popen([sys.executable, "-m", "mistral_jax.serve", *engine_flags(args), "--port", str(port),
                                   "--served-model-name", args.model_name,
                                   *(["--api-server-count", str(args.api_server_count)]
                                     if args.api_server_count else [])],
                                  stderr=log, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            import httpx

            while True:
                if server.poll() is not None:
                    log.seek(0)
                    sys.exit(f"the server exited: {log.read()[-3000:]}")
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            result["http"] = over_http(args, url, vocab)
        finally:
            server.terminate()
            server.wait(120)
            log.seek(0)
            result["server_log_tail"] = log.read()[-2000:]  # its start-up and warm-up report
            print(*(ln for ln in result["server_log_tail"].splitlines() if ln.startswith("[serving")), flush=True)
            log.close()
        peer = subprocess.run([sys.executable, __file__, "--in-process", *sys.argv[1:]], capture_output=True, text=True)
        line = next((ln for ln in peer.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"the in-process run failed:\n{peer.stderr[-3000:]}")
        result["in_process"] = json.loads(line[7:])
    for w, h in result["http"].items():
        e = result.get("in_process", {}).get(w)
        peer = (f"  in-process {e['output_tokens_per_s']:9.1f} tok/s, TTFT p50 {e['ttft_ms_p50']:7.1f} ms"
                f"  (HTTP {h['output_tokens_per_s'] / e['output_tokens_per_s']:.1%} of its tok/s)") if e else ""
        server = (f" (server: queue {h.get('server_queue_ms_mean', 0):.1f} + TTFT {h['server_ttft_ms_mean']:.1f} mean)"
                  if "server_ttft_ms_mean" in h else "")
        print(f"{w:>12}: HTTP {h['output_tokens_per_s']:9.1f} tok/s, TTFT p50 {h['ttft_ms_p50']:7.1f} ms{server}, "
              f"ITL p50 {h['itl_ms_p50'] or 0:6.1f} ms{peer}", flush=True)
        for name, runs in (("HTTP", h.get("repeats")), ("in-process", (e or {}).get("repeats"))):
            if runs:
                print(f"{'':>14}{name} runs: " + ", ".join(
                    f"{r['output_tokens_per_s']:.0f} tok/s TTFT {r['ttft_ms_p50']:.1f}" for r in runs), flush=True)
    if args.out:  # jax_info=False: this client process must not take the GPU from the server
        harness.write_result(args.out, "http", result, jax_info=False)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
