"""The OpenAI-compatible server, as its users use it: `python -m mistral_jax.serve` started as a
subprocess on a free loopback port, talked to with the official `openai` client and raw HTTP
(httpx), under concurrent load with disconnects and with hostile bodies."""

import asyncio
import json
import os
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import psutil
import pytest

from mistral_jax import LLM, SamplingParams

from helpers.server import MODEL, SETTINGS, Server, children, free_port, wait_gone

pytestmark = pytest.mark.slow  # the module starts server subprocesses


@pytest.fixture(scope="module")
def server(tiny_checkpoints):
    """Two HTTP processes in front of the engine (--api-server-count): every test of this server
    reaches one or the other, as the kernel spreads its connections."""
    s = Server(tiny_checkpoints[0], "--api-server-count", "2")
    try:
        yield s
    finally:
        code = s.stop()
    assert code == 0


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(model=str(tiny_checkpoints[0]), dtype="float32", max_model_len=256, progress=False)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def prompt_ids(seed, n=None):
    rng = np.random.default_rng(seed)
    return rng.integers(5, 32768, size=n or int(rng.integers(5, 40))).tolist()


def test_models_health_tokenize(server, client, llm):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert ids == llm.tokenizer.encode("Hello world", add_bos=True)
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == llm.tokenizer.decode(ids)


def test_completion_greedy_equals_llm(client, llm):
    for seed in range(3):
        ids = prompt_ids(seed)
        got = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
        want = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        assert got.choices[0].text == want[0].outputs[0].text
        assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 8
    text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    want = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=5))[0].outputs[0]
    assert text.choices[0].text == want.text and text.choices[0].finish_reason == want.finish_reason


def test_chat_stream_equals_non_stream(client, llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    kw = dict(model=MODEL, messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 12 == whole.usage.completion_tokens
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].text
    assert whole.choices[0].message.content == want


def test_async_client_n_and_logprobs(server):
    asyncio.run(_async_client_n_and_logprobs(server))


async def _async_client_n_and_logprobs(server):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    out = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3,
                                               max_tokens=6, temperature=1.0, seed=5, logprobs=True, top_logprobs=2,
                                               extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    for c in out.choices:
        assert len(c.logprobs.content) == 6 and all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
        assert all(t.logprob <= 0 for t in c.logprobs.content)
    assert out.usage.completion_tokens == 18
    assert out.usage.prompt_tokens_details.cached_tokens >= 0


def test_echo_scores_the_prompt(client, llm):
    # What evaluation harnesses send: echo, logprobs=1, max_tokens=0.
    ids = prompt_ids(11, 30)
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = got.choices[0].logprobs
    want = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=1))[0].prompt_logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    np.testing.assert_allclose(lp.token_logprobs[1:], [want[i][ids[i]] for i in range(1, len(ids))], atol=1e-4)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b'\xff\xfe{"prompt": 1}', 400, None),  # invalid UTF-8
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    (b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ({"prompt": "hi", "max_tokens": 10**30}, 400, None),
    ({"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    ({"prompt": "hi", "n": 10**6}, 400, "n"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1] * 300}, 400, None),  # past the context of 256
    ({"prompt": [1] * 200, "max_tokens": 100}, 400, None),
    ({"prompt": [10**9]}, 400, None),
    ({"prompt": "x" * (1 << 20)}, 400, None),  # a 1 MB string: past the context
    ({"prompt": {"a": {"b": {"c": [[[[1]]]]}}}}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
])
def test_hostile_completion_bodies_are_4xx(server, body, status, param):
    r = (httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
         if isinstance(body, bytes) else httpx.post(server.url + "/v1/completions", json=body))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and (param is None or err["param"] == param), err
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("body, match", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user", "content": "hi"}],
      "tool_choice": {"type": "function", "function": {"name": "nope"}},
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]},
     "nope"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x" * 2000}]}, "context"),
])
def test_hostile_chat_bodies_are_4xx(server, body, match):
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert match in json.dumps(r.json()["error"]), r.json()


def test_body_over_the_limit_is_413(server):
    r = httpx.post(server.url + "/v1/completions", content=b"[" + b"1," * (5 << 20) + b"1]",
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]


def test_concurrent_streams_with_disconnects(server, llm):
    asyncio.run(_concurrent_streams_with_disconnects(server, llm))


async def _concurrent_streams_with_disconnects(server, llm):
    """200 streaming clients (40 at a time), one in five hanging up after its second chunk: every
    other one gets the text it gets alone (greedy), and every page comes back."""
    start_free, queued = server.metric("num_free_pages"), server.metric("request_queue_time_seconds_count")
    prompts = [prompt_ids(100 + i) for i in range(200)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.outputs[0].text for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    gate = asyncio.Semaphore(40)

    async def one(i, http):
        async with gate:
            body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 16, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            text, chunks = "", 0
            async with http.stream("POST", server.url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunks += 1
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if i % 5 == 0 and chunks == 2:
                        return None  # hang up mid-stream
            return text

    async with httpx.AsyncClient(timeout=120) as http:
        got = await asyncio.gather(*(one(i, http) for i in range(200)))
    for i, text in enumerate(got):
        if i % 5:
            assert text == want[i], i
    deadline = time.time() + 20
    while server.metric("num_free_pages") != start_free and time.time() < deadline:
        await asyncio.sleep(0.2)
    assert server.metric("num_free_pages") == start_free
    assert server.metric("num_requests_running") == 0
    assert server.metric("request_queue_time_seconds_count") - queued == 200  # each admitted once, timed
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.fixture(scope="module")
def guarded(tiny_checkpoints):
    """A second server: an API key, and n-gram speculative decoding; SIGTERM ends it with 0,
    and its engine process with it."""
    s = Server(tiny_checkpoints[0], "--no-warmup",
               "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}',
               "--api-server-count", "1", api_key="s3cret")
    engines = children(s.proc.pid, comm="mj-engine")
    assert len(engines) == 1, engines  # the engine runs in its own process
    # The HTTP process's own warm-up request (its first request's cold paths) is not in /metrics.
    assert s.metric("prompt_tokens_total") == 0 and s.metric("time_to_first_token_seconds_count") == 0
    try:
        yield s
    finally:
        assert s.stop() == 0
        assert wait_gone(engines[0], 5)


def test_engine_process_start_failure_and_orphan(tiny_checkpoints):
    # Settings the engine refuses: the server exits 2 with the engine's message (naming the fix).
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "mistral_jax.serve", "--model", str(tiny_checkpoints[0]),
                        "--port", str(port), *SETTINGS, "--max-model-len", "1000000"], capture_output=True, text=True,
                       timeout=180, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and "max_model_len=1000000 must be in" in r.stderr, r.stderr[-2000:]
    # The first HTTP process killed outright: the engine process notices the closed pipe and exits,
    # and the second HTTP process, whose engine is gone, exits too.
    s = Server(tiny_checkpoints[0], "--api-server-count", "2", "--no-warmup")  # its processes, not its programs
    deadline = time.time() + 60
    while not children(s.proc.pid, comm="mj-http-1") and time.time() < deadline:
        time.sleep(0.2)  # the second HTTP process may still be starting when the first answers
    spawned = children(s.proc.pid, comm="mj-engine") + children(s.proc.pid, comm="mj-http-1")
    helpers = children(s.proc.pid)
    s.proc.kill()
    s.proc.wait(10)
    s.log.close()
    assert len(spawned) == 2 and all(wait_gone(pid, 30) for pid in helpers), helpers


def test_http_processes_share_the_port_and_sum_their_metrics(server):
    main = psutil.Process(server.proc.pid)

    def connections(p, status):
        return [c for c in p.net_connections("tcp") if c.status == status and c.laddr.port == server.port]

    fronts = [p for p in [main, *main.children()] if connections(p, "LISTEN")]
    assert len(fronts) == 2  # the first HTTP process and one more, each with its own socket
    before = server.metric("request_success_total", 'finished_reason="length"')
    sessions = [httpx.Client(timeout=60) for _ in range(16)]  # 16 connections, kept open
    try:
        for http in sessions:
            r = http.post(server.url + "/v1/completions",
                          json={"model": MODEL, "prompt": prompt_ids(7), "max_tokens": 2, "temperature": 0,
                                "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        # The kernel spread the connections over both (all 16 on one: a chance of 2 in 65,536).
        assert all(connections(p, "ESTABLISHED") for p in fronts)
    finally:
        for http in sessions:
            http.close()
    # Whichever process answers a scrape (each one a new connection), it counts both processes' requests.
    assert [server.metric("request_success_total", 'finished_reason="length"') - before for _ in range(6)] == [16] * 6


def test_api_key(guarded):
    s = guarded
    assert httpx.get(s.url + "/v1/models").status_code == 401
    assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
    assert [m.id for m in ok.models.list().data] == [MODEL]
    assert httpx.get(s.url + "/health").status_code == 200  # a liveness probe needs no key
    # Every endpoint that does work needs the key (tokenizing too: a large body costs CPU), and
    # /metrics (unless --public-metrics).
    for method, path, body in [("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1]}),
                               ("GET", "/metrics", None), ("POST", "/v1/completions", {"prompt": "hi"})]:
        assert httpx.request(method, s.url + path, json=body).status_code == 401, path
        assert httpx.request(method, s.url + path, json=body, headers=s.headers).status_code == 200, path


def test_speculative_server_streams_plain_decodings_text(guarded, llm):
    """Several tokens per step reach the client as the plain engine's text, streamed or not."""
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
    phrase = prompt_ids(11, 9)
    ids = phrase * 3 + prompt_ids(12, 5) + phrase[:4]
    want = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    kw = dict(model=MODEL, prompt=ids, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    assert client.completions.create(**kw).choices[0].text == want[0].outputs[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want[0].outputs[0].text
    assert guarded.metric("spec_decode_num_accepted_tokens_total") > 0


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.parametrize("call_id", ["abcDEF123", "call_8f2a9c1e4b7d", "6f1c2e0a-7b4d-4c1e-9f2a-0b1c2d3e4f5a"])
def test_tool_results_accept_any_echoed_id(client, call_id):
    # The follow-up turn of a tool call, with the id the client's framework minted (Mistral's
    # templates accept only 9 letters/digits: other ids are mapped, never refused).
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
                {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


# Bounded strings and no extra keys: a random-weights model under a grammar still ends in time.
CALL_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"],
        "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}},
]


def check_calls(calls, names):
    import jsonschema

    assert calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in CALL_TOOLS}
    for c in calls:
        assert c.type == "function" and c.function.name in names and len(c.id) == 9 and c.id.isalnum()
        jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])


@pytest.mark.parametrize("tool_choice, names", [
    ("required", {"get_weather", "add"}),
    ({"type": "function", "function": {"name": "add"}}, {"add"}),
])
def test_tool_choice_required_and_named_are_enforced(client, tool_choice, names):
    # The tiny random model would never write a tool call by itself: the grammar makes it.
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    for seed in range(2):
        out = client.chat.completions.create(model=MODEL, messages=messages, tools=CALL_TOOLS, tool_choice=tool_choice,
                                             max_tokens=60, temperature=1.0, seed=seed, parallel_tool_calls=False)
        assert out.choices[0].finish_reason == "tool_calls"
        check_calls(out.choices[0].message.tool_calls, names)
    # Streamed: each call arrives as deltas (id and name, then arguments) that add up to it.
    calls: dict[int, dict] = {}
    finish = None
    for ch in client.chat.completions.create(model=MODEL, messages=messages, tools=CALL_TOOLS, tool_choice=tool_choice,
                                             max_tokens=60, temperature=1.0, seed=7, stream=True,
                                             parallel_tool_calls=False):
        delta = ch.choices[0].delta
        for tc in delta.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            c["id"] = c["id"] or tc.id
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    check_calls([openai.types.chat.ChatCompletionMessageToolCall(
        id=c["id"], type="function", function={"name": c["name"], "arguments": c["arguments"]})
        for c in calls.values()], names)


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "city": {"enum": ["Zürich", "東京", "Paris"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}


def test_response_format_json_schema_and_json_object(client):
    import jsonschema

    messages = [{"role": "user", "content": "A person, as JSON."}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=100, temperature=1.0, seed=3, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=100, temperature=1.0, seed=4, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads("".join(ch.choices[0].delta.content or "" for ch in stream)), PERSON)
    obj = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=200, temperature=0,
                                         response_format={"type": "json_object"},
                                         extra_body={"structured_outputs": None})
    assert obj.choices[0].finish_reason in ("stop", "length")
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_vllm_structured_output_fields(server):
    url = server.url
    r = httpx.post(url + "/v1/completions", json={"prompt": "Answer:", "max_tokens": 20, "temperature": 1.0, "seed": 1,
                                                  "structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}}).json()
    assert re.fullmatch("[a-c]{3}-[0-9]{2}", r["choices"][0]["text"]), r
    r = httpx.post(url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "Pick"}], "max_tokens": 20,
                         "guided_choice": ["naïve", "日本", "plain"]}).json()
    assert r["choices"][0]["message"]["content"] in ("naïve", "日本", "plain")
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 100, "temperature": 1.0, "seed": 2,
                                                  "guided_json": PERSON}).json()
    import jsonschema

    jsonschema.validate(json.loads(r["choices"][0]["text"]), PERSON)
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 20,
                                                  "guided_grammar": 'start: "yes" | "no"'}).json()
    assert r["choices"][0]["text"] in ("yes", "no")


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"structured_outputs": {"regexp": "a+"}}, "structured_outputs"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_grammar": "start: (("}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
])
def test_bad_constraints_are_400s_naming_the_field(server, extra, param):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert httpx.get(server.url + "/health").status_code == 200


def test_dummy_weights_of_a_named_shape():
    # --load-format dummy --config NAME: random weights of a shipped config, the tokenizer that
    # mistral-common bundles for its vocabulary (the tiny config has the v3 vocabulary).
    llm = LLM(load_format="dummy", config="tiny", dtype="float32", max_model_len=64, progress=False)
    assert llm.config.n_layers == 2 and llm.tokenizer.encode("Hi", add_bos=True)[0] == 1
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 3
    with pytest.raises(ValueError, match="config="):
        LLM(load_format="dummy", progress=False)
    with pytest.raises(FileNotFoundError, match="mistral-small-2501"):
        LLM(load_format="dummy", config="no-such-model", progress=False)


def test_non_streamed_request_aborted_when_the_client_hangs_up(server):
    # A long non-streamed request whose client times out: its pages come back, the server goes on.
    # (16 x 210 tokens: ~210 steps of the tiny model, well past the client's 0.25 s; 8 x 210
    # once finished inside a 1 s timeout on this CPU.)
    start_free = server.metric("num_free_pages")
    logged = len(server.output())
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", timeout=0.25,
                   json={"prompt": prompt_ids(7, 40), "max_tokens": 210, "ignore_eos": True, "n": 16})
    deadline = time.time() + 30
    while server.metric("num_free_pages") != start_free and time.time() < deadline:
        time.sleep(0.2)
    assert server.metric("num_free_pages") == start_free and server.metric("num_requests_running") == 0
    # The log says so in one line, not with a traceback (a CancelledError nobody retrieved).
    log = server.output()[logged:]
    assert log.count("the client disconnected before its response") == 1 and "16 generation(s)" in log, log
    assert "Traceback" not in log and "CancelledError" not in log, log


def test_stream_closed_before_its_first_token_is_aborted(server):
    # A streaming client that hangs up right after the response headers: its request is aborted
    # (the server notices the hang-up itself, with no chunk written to fail), its pages come back.
    start_free = server.metric("num_free_pages")
    aborts = server.metric("request_success_total", 'finished_reason="abort"')
    body = {"prompt": prompt_ids(9, 40), "max_tokens": 200, "ignore_eos": True, "stream": True, "n": 4}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
    deadline = time.time() + 30
    while server.metric("num_requests_running") != 0 and time.time() < deadline:
        time.sleep(0.1)
    assert server.metric("request_success_total", 'finished_reason="abort"') - aborts == 4
    while server.metric("num_free_pages") != start_free and time.time() < deadline:
        time.sleep(0.2)
    assert server.metric("num_free_pages") == start_free and server.metric("num_requests_running") == 0


def test_cached_tokens_count_a_prompt_once_over_n_choices(client):
    ids = prompt_ids(41, 40)  # two full pages of 16: the second request finds both in the prefix cache
    for _ in range(2):
        out = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, n=3, temperature=1.0, seed=1)
    assert out.usage.prompt_tokens == 40
    assert out.usage.prompt_tokens_details.cached_tokens == 32


def test_logit_bias_bans_the_greedy_first_token_and_bad_biases_are_400s(server, client, llm):
    """logit_bias reaches the sampler from both endpoints: -100 on the token a greedy completion
    started with bans it (the reply is the LLM's under the same bias), +100 forces a token in a
    chat reply; an id past the vocabulary and a bias of 101 are 400s naming logit_bias."""
    ids = prompt_ids(43, 20)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": ids}], greedy)[0].outputs[0].token_ids[0]
    want = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                                    logit_bias={first: -100}))[0]
    assert want.outputs[0].token_ids[0] != first
    kw = dict(model=MODEL, prompt=ids, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].text
    banned = client.completions.create(logit_bias={str(first): -100}, **kw).choices[0].text
    assert banned == want.outputs[0].text != plain
    forced = llm.tokenizer.encode("Hello", add_bos=False)[-1]
    messages = [{"role": "user", "content": "Say something."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                           logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == llm.tokenizer.decode([forced] * 4)
    vocab = llm.config.vocab_size
    for path, body in (("completions", {"prompt": ids, "logit_bias": {str(vocab): -100}}),
                       ("chat/completions", {"messages": messages, "logit_bias": {str(vocab): -100}}),
                       ("completions", {"prompt": ids, "logit_bias": {str(first): 101}}),
                       ("chat/completions", {"messages": messages, "logit_bias": {"5": -101}})):
        r = httpx.post(f"{server.url}/v1/{path}", json={"model": MODEL, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", (path, body, r.text)
