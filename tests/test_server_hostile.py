"""The server against what one client can send, and against its own processes dying: each case
that once took `python -m mistral_jax.serve` down for good, then the same greedy answer and every
KV page back. Loopback only; every loop bounded in count and time."""

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import psutil
import pytest

from helpers.server import MODEL, SETTINGS, Server, children, free_port, wait_gone

pytestmark = pytest.mark.slow  # server subprocesses under load

KEY = "hostile-key"
# Room for 150 streams at once (top-20 logprobs for all of them make a step's batch ~0.5 MB).
HOSTILE = ["--max-num-seqs", "160", "--num-pages", "800", "--api-server-count", "2"]


def ids(seed, n=None):
    rng = np.random.default_rng(seed)
    return rng.integers(5, 32768, size=n or int(rng.integers(5, 40))).tolist()


GREEDY = {"model": MODEL, "prompt": ids(1, 12), "max_tokens": 12, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_checkpoints):
    s = Server(tiny_checkpoints[0], *HOSTILE, api_key=KEY)
    s.http = httpx.Client(base_url=s.url, headers=s.headers, timeout=120)
    s.want = s.http.post("/v1/completions", json=GREEDY).json()["choices"][0]["text"]
    s.free_pages = s.metric("num_free_pages")
    s.programs = s.metric("compiled_programs")
    try:
        yield s
    finally:
        s.http.close()
        assert s.stop() == 0


def still_serves(s) -> None:
    """After a case: the same greedy text as before it, and every page back."""
    r = s.http.post("/v1/completions", json=GREEDY)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == s.want, r.text
    deadline = time.time() + 20
    while s.metric("num_free_pages") != s.free_pages and time.time() < deadline:
        time.sleep(0.2)
    assert s.metric("num_free_pages") == s.free_pages
    assert s.metric("compiled_programs") == s.programs  # nothing a case sent made the engine compile
    assert httpx.get(s.url + "/health").status_code == 200


def test_the_server_warms_up_by_default(server):
    """Every program compiled before the port opened (a CPU too): the count the warm-up printed is
    the count the engine holds, and no case below adds one (still_serves checks it)."""
    (printed,) = re.findall(r"\[warm-up: (\d+) programs", server.output())
    assert int(printed) == server.programs > 0


def test_echo_with_20_logprobs(server):
    """An evaluation harness's request (echo, max_tokens 0, logprobs 20) on a 250-token prompt: its
    engine message is ~180 KB, past the 64 KiB pipe that once cut it halfway."""
    prompt = ids(2, 250)
    r = server.http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True,
                                                  "logprobs": 20})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == 250 and lp["token_logprobs"][0] is None
    assert all(len(top) >= 20 for top in lp["top_logprobs"][1:])
    assert len(r.content) > 64 << 10
    still_serves(server)


def test_150_streams_with_top_logprobs_20(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

        async def one(i):
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Count to {i}"}], max_tokens=8, stream=True,
                logprobs=True, top_logprobs=20, extra_body={"ignore_eos": True})
            tokens = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].logprobs:
                    tokens += chunk.choices[0].logprobs.content
            return tokens

        try:
            return await asyncio.gather(*(one(i) for i in range(150)))
        finally:
            await client.close()

    got = asyncio.run(main())
    assert all(len(t) == 8 and all(len(e.top_logprobs) == 20 for e in t) for t in got)
    still_serves(server)


HUGE = 10**30
EXTREMES = [  # (field values, the field a 400 must name, or None: 200 expected)
    ({"top_k": 2**31, "temperature": 1.0}, None),
    ({"top_k": 2**63, "temperature": 1.0}, None),
    ({"top_k": HUGE, "temperature": 1.0}, None),  # past the vocabulary: top-k off
    ({"top_k": -2}, "top_k"),
    ({"seed": -1, "temperature": 1.0}, None),
    ({"seed": 2**64 - 1, "temperature": 1.0}, None),
    ({"seed": HUGE}, "seed"),
    ({"n": 0}, "n"),
    ({"n": 10**9}, "n"),
    ({"max_tokens": 2**63}, "max_tokens"),
    ({"max_tokens": HUGE}, "max_tokens"),
    ({"temperature": 1e308}, "temperature"),
    ({"temperature": 1e-300}, None),
    ({"top_p": 1e-300, "temperature": 1.0}, None),
    ({"min_p": 1.0, "temperature": 1.0}, None),
    ({"presence_penalty": 2.0, "frequency_penalty": -2.0, "repetition_penalty": 100.0}, None),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logprobs": 20}, None),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"stop_token_ids": [2**31]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [HUGE]}, "stop_token_ids"),
    ({"stop": ["x" * 100] * 5}, None),
    ({"stop": [""]}, "stop"),
    ({"prompt": [2**31]}, None),  # a 400 naming the token ids (the field is the prompt)
    ({"prompt": [-1]}, None),
    ({"prompt": [HUGE]}, "prompt"),
]


@pytest.mark.parametrize("fields, param", EXTREMES, ids=[json.dumps(f)[:60] for f, _ in EXTREMES])
def test_every_field_at_its_extremes(server, fields, param):
    body = dict({"model": MODEL, "prompt": ids(3, 8), "max_tokens": 4}, **fields)
    r = server.http.post("/v1/completions", json=body)
    if param is not None or "prompt" in fields:
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        if param is not None:
            assert error["param"] == param or param in error["message"], error
    else:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    still_serves(server)


def test_detokenize_extremes(server):
    for tokens in ([2**31], [-1], [2**63], [HUGE]):
        r = server.http.post("/detokenize", json={"tokens": tokens})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens", r.text
    still_serves(server)


def test_lone_surrogates_are_400s_naming_the_field(server):
    raw = [("/v1/completions", '{"prompt": "hi \\ud800", "max_tokens": 2}', "prompt"),
           ("/v1/completions", '{"prompt": ["ok", "hi \\udfff"], "max_tokens": 2}', "prompt"),
           ("/v1/completions", '{"prompt": "hi", "stop": ["\\ud800"], "max_tokens": 2}', "stop"),
           ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages"),
           ("/tokenize", '{"prompt": "\\ud800"}', "prompt")]
    for path, body, param in raw:
        r = server.http.post(path, content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", (path, r.text)
        assert r.json()["error"]["param"] == param and "surrogate" in r.json()["error"]["message"]
    # A surrogate pair is text (U+1F600) and passes.
    r = server.http.post("/tokenize", content=b'{"prompt": "\\ud83d\\ude00"}',
                         headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["count"] > 0
    still_serves(server)


def server_rss(s) -> int:
    main = psutil.Process(s.proc.pid)
    return sum(p.memory_info().rss for p in [main, *main.children(recursive=True)])


def chunked_upload(port: int, path: str, headers: dict, total: int, chunk: int = 1 << 20) -> tuple[str, float, int]:
    """POST `total` bytes of chunked body; stop sending as soon as the server answers. Returns
    (status line, seconds from the first byte to the answer, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            "Transfer-Encoding: chunked", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    answer, sent, start = b"", 0, time.time()
    piece = b'{"prompt": "' + b"a" * (chunk - 12)
    sock.setblocking(False)
    try:
        while sent < total and time.time() - start < 60:
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            except ConnectionError:
                break
            if answer:
                break
            data = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            try:
                sock.setblocking(True)
                sock.settimeout(5)
                sock.sendall(data)
                sent += len(piece)
            except (TimeoutError, ConnectionError):
                break
            finally:
                sock.setblocking(False)
        elapsed = time.time() - start
        sock.settimeout(10)
        sock.setblocking(True)
        while b"\r\n" not in answer:
            more = sock.recv(65536)
            if not more:
                break
            answer += more
        elapsed = min(elapsed, time.time() - start)
    finally:
        sock.close()
    return answer.split(b"\r\n", 1)[0].decode(), elapsed, sent


@pytest.mark.parametrize("path, with_key, status", [
    ("/v1/completions", True, "413"),
    ("/tokenize", True, "413"),
    ("/tokenize", False, "401"),  # no key: refused on its headers, before any byte of the body
])
def test_chunked_body_past_the_limit(server, path, with_key, status):
    """200 MB sent chunked (no Content-Length): refused once the bytes read pass 8 MB, within a
    second, and no process of the server grows by the body's size."""
    before = server_rss(server)
    line, seconds, sent = chunked_upload(server.port, path, server.headers if with_key else {}, 200 << 20)
    assert status in line, line
    assert sent < 64 << 20 and seconds < 10, (sent, seconds)
    assert server_rss(server) - before < 100 << 20
    still_serves(server)


def test_a_huge_request_does_not_stall_other_streams(server):
    """Ten streams decode while one client sends 7.5 MB to tokenize (and another a 7.5 MB chat):
    the streams' chunks keep coming (the text is tokenized in a worker process, not on the event
    loop, where it once froze every stream for 9-11 s)."""
    text = " ".join(np.random.default_rng(0).choice(["the", "cat", "café", "東京", "1234", "sat"], 1_250_000))
    text = text[:7_500_000]
    gaps, done = [], threading.Event()

    def stream(i):
        body = dict(GREEDY, prompt=ids(10 + i, 8), max_tokens=200, stream=True)
        last = None
        with httpx.Client(headers=server.headers, timeout=120) as http:
            with http.stream("POST", server.url + "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    now = time.time()
                    if line.startswith("data: ") and last is not None and not done.is_set():
                        gaps.append(now - last)
                    last = now

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    with httpx.Client(headers=server.headers, timeout=120) as http:
        t0 = time.time()
        tok = http.post(server.url + "/tokenize", json={"prompt": text})
        chat = http.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]})
        big_seconds = time.time() - t0
    done.set()
    for t in threads:
        t.join(120)
    assert tok.status_code == 200 and tok.json()["count"] > 1_000_000
    assert chat.status_code == 400 and "past the model's context" in chat.json()["error"]["message"]
    assert gaps and max(gaps) < 1.5, (max(gaps), big_seconds)
    still_serves(server)


def test_a_second_server_on_the_port_fails_fast(server, tiny_checkpoints):
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "mistral_jax.serve", "--model", str(tiny_checkpoints[0]),
                        "--port", str(server.port), *SETTINGS, "--api-server-count", "2"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and "already served by another mistral_jax server" in r.stderr, r.stderr[-2000:]
    assert time.time() - t0 < 60
    still_serves(server)


def test_a_second_server_while_the_first_loads(tiny_checkpoints):
    """The first server holds its port from its first second, before its model loads."""
    port = free_port()
    cmd = [sys.executable, "-m", "mistral_jax.serve", "--model", str(tiny_checkpoints[0]), "--port", str(port),
           *SETTINGS, "--served-model-name", MODEL]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 60
        while not children(first.pid, comm="mj-engine") and time.time() < deadline:
            time.sleep(0.2)  # the engine process is loading
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert second.returncode == 2 and f"port {port} is already served" in second.stderr, second.stderr[-2000:]
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=GREEDY, timeout=60)
        assert r.status_code == 200
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0


def read_sse(r: httpx.Response) -> list[dict]:
    events = []
    for line in r.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def test_engine_killed_ends_streams_with_an_error_and_the_server_exits_1(tiny_checkpoints):
    # the deaths, not the programs, count here
    s = Server(tiny_checkpoints[0], "--api-server-count", "2", "--no-warmup")
    try:
        engine, processes = s.engine_pid(), children(s.proc.pid)
        os.kill(engine, signal.SIGSTOP)  # streams in flight when it dies
        results = {}

        def stream(i):
            body = dict(GREEDY, prompt=ids(20 + i, 8), max_tokens=100, stream=True, n=2)
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
                results[i] = (r.status_code, read_sse(r))

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        t0 = time.time()
        os.kill(engine, signal.SIGKILL)
        for t in threads:
            t.join(30)
        code = s.proc.wait(15)
        exited_after = time.time() - t0
        assert code == 1 and exited_after < 10, (code, exited_after)
        assert "the engine process exited (killed by signal 9)" in s.output()
        for status, events in results.values():
            assert status == 200
            finishes = [c["finish_reason"] for e in events for c in e.get("choices", []) if c["finish_reason"]]
            assert sorted(finishes) == ["error", "error"], events
            assert events[-1]["error"]["type"] == "server_error" and "engine" in events[-1]["error"]["message"]
        assert all(wait_gone(pid, 10) for pid in processes)  # the other HTTP process and the tokenizer too
    finally:
        s.stop()


def test_openai_client_sees_the_error_event(tiny_checkpoints):
    """The same death, through the openai client: its stream raises an APIError naming the engine."""
    s = Server(tiny_checkpoints[0], "--api-server-count", "1", "--no-warmup")
    try:
        engine = s.engine_pid()
        os.kill(engine, signal.SIGSTOP)
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=50, stream=True)
        threading.Timer(1.0, os.kill, (engine, signal.SIGKILL)).start()
        with pytest.raises(openai.APIError, match="engine"):
            for _ in stream:
                pass
        assert s.proc.wait(15) == 1
    finally:
        s.stop()


def test_sigterm_with_a_wedged_engine_ends_in_time(tiny_checkpoints):
    """An engine that never answers again (stopped): SIGTERM still ends the server within the
    graceful timeout plus 5 s, and the engine process with it."""
    s = Server(tiny_checkpoints[0], "--api-server-count", "2", "--timeout-graceful-shutdown", "2", "--no-warmup")
    engine = s.engine_pid()
    processes = children(s.proc.pid)
    try:
        os.kill(engine, signal.SIGSTOP)
        hung = threading.Thread(target=lambda: httpx.post(s.url + "/v1/completions", json=GREEDY, timeout=30))
        hung.daemon = True
        hung.start()
        time.sleep(1.0)
        t0 = time.time()
        s.proc.send_signal(signal.SIGTERM)
        code = s.proc.wait(30)
        assert time.time() - t0 < 2 + 5 + 2, time.time() - t0
        assert code == 0
        assert all(wait_gone(pid, 5) for pid in processes)
    finally:
        try:
            os.kill(engine, signal.SIGKILL)  # if the server left it behind
        except ProcessLookupError:
            pass
        s.stop()


def test_a_broken_checkpoint_is_a_clear_start_failure(tiny_checkpoints, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoints[0], broken)
    weights = broken / "consolidated.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = subprocess.run([sys.executable, "-m", "mistral_jax.serve", "--model", str(broken), "--port", str(free_port()),
                        *SETTINGS], capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "consolidated.safetensors" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
