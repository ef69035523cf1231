"""The HTTP routes (OpenAI's API, vLLM's extras) over the async bridge.

Bad input is a 4xx with OpenAI's error object naming the field and the fix; only a fault of
ours is a 500. Streams are server-sent events (`data: {...}`, then `data: [DONE]`); a client
that goes away has its request aborted."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import string
import time
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mistral_jax.engine.outputs import StepEvent
from mistral_jax.sample.sampling import SamplingParams
from mistral_jax.sample.structured import Matcher
from mistral_jax.entrypoints.server.bridge import EngineClient, EngineStopped, RequestFailed, RequestStream
from mistral_jax.entrypoints.server.constraints import ConstraintError, request_constraint
from mistral_jax.entrypoints.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, error_body
from mistral_jax.entrypoints.server.tokenizing import INLINE_BODY_BYTES, Tokenizing

MAX_BODY_BYTES = 8 << 20


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type_


def create_app(bridge: EngineClient, tokenizer, served_model_name: str | None = None, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, public_metrics: bool = False) -> FastAPI:
    """The server's app in front of a running engine process (bridge) and its tokenizer.
    api_key: every endpoint but /health needs it (/metrics too, unless public_metrics)."""
    from mistral_jax.entrypoints.server import metrics as metrics_module

    info = bridge.info
    model_name = served_model_name or info.model_path
    vocab_size = info.limits.vocab_size
    metrics = metrics_module.Metrics(bridge)
    bridge.observers.append(metrics)
    tokenizing = Tokenizing(tokenizer, info.tokenizer_source, info.tokenizer_mode)
    defaults = dict(info.default_sampling)  # the model's generation_config, for fields a request leaves unset

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()
        bridge.attach(loop)
        tokenizing.start()
        for hook in app.state.on_startup:  # the server's own (serve.py: it watches its other HTTP processes)
            hook(loop)
        await _warm_up(app, bridge, metrics, model_name, api_key)
        yield
        tokenizing.close()
        await loop.run_in_executor(None, bridge.shutdown)

    app = FastAPI(title="mistral_jax", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.bridge, app.state.metrics, app.state.on_startup = bridge, metrics, []
    created = int(time.time())

    # ---- errors -------------------------------------------------------------------------

    def error(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        return JSONResponse(error_body(message, type_, param, status), status_code=status)

    @app.exception_handler(BadRequest)
    async def _bad(_, e: BadRequest):
        return error(e.status, e.message, e.param, e.type)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None  # the request's field (a union's branch or index follows it)
        if first.get("type") == "json_invalid":
            return error(400, "the body is not valid JSON: send a JSON object (Content-Type: application/json)")
        got = first.get("input")
        got = repr(got)[:80] if not isinstance(got, dict) else "an object"
        return error(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')} (got {got})", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(e.status_code, str(e.detail), type_=type_)

    @app.exception_handler(EngineStopped)
    async def _stopped(_, e: EngineStopped):
        return error(503, str(e), type_="server_error")

    @app.exception_handler(RequestFailed)
    async def _failed(_, e: RequestFailed):
        return error(e.status, str(e), type_="server_error" if e.status >= 500 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _ours(_, e: Exception):  # a fault of ours: still OpenAI's JSON error object (the traceback goes to the log)
        return error(500, f"internal error: {type(e).__name__}: {e}", type_="server_error")

    # A plain ASGI wrapper, not @app.middleware("http"): Starlette's BaseHTTPMiddleware carries
    # every streamed chunk through an extra memory stream and task (a CPU profile at 64 streams
    # put ~40 us per chunk there); this one only reads the request's headers.
    app.add_middleware(_Guard, max_body_bytes=max_body_bytes, api_key=api_key, public_metrics=public_metrics,
                       reject=lambda status, message, type_: error(status, message, type_=type_),
                       fault=lambda: bridge.fault)

    def admit(ids: list[int], params: SamplingParams, where: str) -> SamplingParams:
        """The engine's own check of a request (context, cache size, vocabulary) as a 400."""
        try:
            return bridge.check(ids, params, where)
        except ValueError as e:
            raise BadRequest(str(e)) from e

    async def constrained(jobs, req, tools):
        """jobs (index, ids, params), each with the request's output constraint. Its grammar is
        compiled here once, off the event loop (a complex one takes up to a second), so an
        invalid one is a 400 before any work; the engine process compiles its own copy."""
        try:
            spec, field = request_constraint(req, tokenizer, tools)
        except ConstraintError as e:
            raise BadRequest(str(e), e.param) from None
        if spec is None:
            return jobs
        try:
            await asyncio.to_thread(Matcher, spec, tokenizer, vocab_size)
        except ValueError as e:
            raise BadRequest(f"{field}: {e}", field) from None
        return [(index, ids, dataclasses.replace(params, structured_outputs=spec)) for index, ids, params in jobs]

    def in_context(ids, where: str) -> list[int]:
        """Prompt ids as a list; one past the context is refused from its length alone (a worker's
        array of millions of ids never becomes a list in the event loop)."""
        if len(ids) >= info.max_model_len:
            raise BadRequest(f"{where} has {len(ids)} tokens, past the model's context of {info.max_model_len}: "
                             f"shorten it to at most {info.max_model_len - 1} tokens")
        return ids.tolist() if isinstance(ids, np.ndarray) else ids

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise BadRequest(f"model {name!r} is not served here; this server serves {model_name!r}", "model", 404,
                             "not_found_error")

    # ---- plain routes -----------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if bridge.fault is not None:
            return error(503, bridge.fault, type_="server_error")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mistral_jax", "max_model_len": info.max_model_len}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics_module.CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest, request: Request):
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise BadRequest("give exactly one of 'prompt' (text) or 'messages' (a chat)", "prompt")
        _check_text(req.prompt, "prompt")
        messages = _chat_messages(req.messages) if req.messages is not None else None
        if _big(request):  # the whole body made off the loop: a long text's ids are millions of numbers
            body = await _templated(tokenizing.tokenize_body(req.prompt, messages, req.add_special_tokens,
                                                             info.max_model_len))
            return Response(body, media_type="application/json")
        ids = (tokenizer.encode(req.prompt, add_bos=req.add_special_tokens) if req.prompt is not None
               else await _templated(tokenizing.encode_chat(messages, None, big=False)))
        return {"tokens": ids, "count": len(ids), "max_model_len": info.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < vocab_size]
        if bad:
            raise BadRequest(f"token ids outside [0, {vocab_size}): {bad[:5]}", "tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    # ---- completions --------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if req.suffix is not None:
            raise BadRequest("suffix is not supported (no fill-in-the-middle here): remove it", "suffix")
        _check_text(req.prompt, "prompt")
        _check_text(req.stop, "stop")
        prompts = [(text, in_context(ids, f"prompt {i}"))
                   for i, (text, ids) in enumerate(await _completion_prompts(tokenizing, req.prompt, _big(request)))]
        score_only = req.max_tokens == 0
        if score_only and not req.echo:
            raise BadRequest("max_tokens=0 generates nothing: use it with echo=true (prompt logprobs), "
                             "or ask for at least 1 token", "max_tokens")
        max_tokens = req.max_tokens if "max_tokens" in req.model_fields_set or not defaults.get("max_tokens") \
            else defaults["max_tokens"]
        params = _sampling(req, max_tokens=1 if score_only else max_tokens, logprobs=req.logprobs, defaults=defaults,
                           prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None)
        jobs = await constrained([(i * req.n + c, ids, admit(ids, _seeded(params, c), f"prompt {i}"))
                                  for i, (_, ids) in enumerate(prompts) for c in range(req.n)], req, None)
        rid, now = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        texts = {i * req.n + c: text for i, (text, _) in enumerate(prompts) for c in range(req.n)}

        def choice_logprobs(event_lps, token_ids, echo_lps):
            if req.logprobs is None:
                return None
            toks, lps, tops = [], [], []
            for tid, d in echo_lps + list(zip(token_ids, event_lps)):
                toks.append(tokenizer.decode([tid], skip_special_tokens=False))
                lps.append(None if d is None else d.get(tid))
                tops.append(None if d is None else
                            {tokenizer.decode([t], skip_special_tokens=False): v for t, v in d.items()})
            return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": _offsets(toks)}

        streams = _submit(bridge, jobs, request)
        if not req.stream:
            results = await _unless_disconnected(request, streams)
            choices, usage = [], _Usage()
            for (index, ids, _), r in zip(jobs, results):
                echo_lps = list(zip(ids, r.prompt_logprobs or [None] * len(ids))) if req.echo else []
                gen_ids, gen_lps, text = ([], [], "") if score_only else (r.token_ids, r.logprobs, r.text)
                prefix = (texts[index] if texts[index] is not None else tokenizer.decode(ids)) if req.echo else ""
                choices.append({"index": index, "text": prefix + text, "finish_reason": "length" if score_only
                                else r.finish_reason,
                                "logprobs": choice_logprobs(gen_lps, gen_ids, echo_lps)})
                usage.add(ids, gen_ids, r.cached, first_of_prompt=index % req.n == 0)
            return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": choices, "usage": usage.body()}

        def text_chunk(index, text, finish=None, logprobs=None):
            return _chunk({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                           "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

        async def sse() -> AsyncIterator[str]:
            usage, finished = _Usage(), set()
            try:
                async for index, event in _merged(streams):
                    ids = jobs[index][1]
                    finished.update([index] if event.finished else [])
                    if score_only:
                        if event.finished:
                            usage.add(ids, [], event.num_cached_tokens or 0, first_of_prompt=index % req.n == 0)
                            yield text_chunk(index, tokenizer.decode(ids) if req.echo else "", "length")
                        continue
                    lps = choice_logprobs([event.logprobs], [event.token_id], []) if req.logprobs is not None else None
                    yield text_chunk(index, event.text, event.finish_reason if event.finished else None, lps)
                    usage.count(index, ids, event, req.n)
            except (EngineStopped, RequestFailed) as e:
                for line in _failed_stream_end(e, [text_chunk(i, "", "error") for i, _, _ in jobs if i not in finished]):
                    yield line
                return
            for line in _stream_end({"id": rid, "object": "text_completion", "created": now, "model": model_name},
                                    usage, req.stream_options):
                yield line

        return _EventStream(sse(), streams)

    # ---- chat ---------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        tools = _tools(req)
        _check_text(req.stop, "stop")
        _check_text(req.tools, "tools")
        ids = in_context(await _templated(tokenizing.encode_chat(_chat_messages(req.messages), tools, _big(request))),
                         "the conversation")
        top = req.top_logprobs if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise BadRequest("top_logprobs needs logprobs=true", "top_logprobs")
        params = _sampling(req, max_tokens=req.max_completion_tokens or req.max_tokens, defaults=defaults,
                           logprobs=(top or 0) if req.logprobs else None)
        jobs = await constrained([(c, ids, admit(ids, _seeded(params, c), "the conversation")) for c in range(req.n)],
                                 req, tools)
        rid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

        def lp_entry(tid, d):
            token = tokenizer.decode([tid], skip_special_tokens=False)
            return {"token": token, "logprob": d.get(tid), "bytes": list(token.encode()),
                    "top_logprobs": [{"token": (t := tokenizer.decode([k], skip_special_tokens=False)), "logprob": v,
                                      "bytes": list(t.encode())} for k, v in list(d.items())[: top or 0]]}

        streams = _submit(bridge, jobs, request)
        if not req.stream:
            results = await _unless_disconnected(request, streams)
            choices, usage = [], _Usage()
            for (index, _, _), r in zip(jobs, results):
                message: dict[str, Any] = {"role": "assistant", "content": r.text}
                finish = r.finish_reason
                if tools:
                    content, calls = tokenizer.parse_tool_calls(r.token_ids)
                    if calls:
                        message = {"role": "assistant", "content": content or None,
                                   "tool_calls": [c.to_openai() for c in calls]}
                        finish = "tool_calls"
                logprobs = ({"content": [lp_entry(t, d) for t, d in zip(r.token_ids, r.logprobs)]}
                            if req.logprobs else None)
                choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs})
                usage.add(ids, r.token_ids, r.cached, first_of_prompt=index == 0)
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": choices, "usage": usage.body()}

        def chunk(index, delta, finish=None, logprobs=None):
            return _chunk({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                           "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                        "finish_reason": finish}]})

        async def sse() -> AsyncIterator[str]:
            finished = set()
            try:
                async for line in events(finished):
                    yield line
            except (EngineStopped, RequestFailed) as e:
                for line in _failed_stream_end(e, [chunk(i, {}, "error") for i, _, _ in jobs if i not in finished]):
                    yield line

        async def events(finished: set) -> AsyncIterator[str]:
            usage, started, held, text, sent, in_calls = _Usage(), set(), {}, {}, {}, set()
            async for index, event in _merged(streams):
                finished.update([index] if event.finished else [])
                if index not in started:
                    started.add(index)
                    yield chunk(index, {"role": "assistant", "content": ""})
                usage.count(index, ids, event, req.n)
                lps = {"content": [lp_entry(event.token_id, event.logprobs)]} if req.logprobs else None
                if tools:  # text streams until the reply turns into tool calls (where the format tells)
                    held.setdefault(index, []).append(event.token_id)
                    text[index] = text.get(index, "") + event.text
                    if tokenizer.tool_call_started([event.token_id]) is not False:  # begun, or cannot tell
                        in_calls.add(index)
                    if not event.finished:
                        if index not in in_calls:
                            sent[index] = len(text[index])
                            yield chunk(index, {"content": event.text} if event.text else {}, None, lps)
                        continue
                    content, calls = tokenizer.parse_tool_calls(held[index])
                    if not calls:
                        yield chunk(index, {"content": text[index][sent.get(index, 0):]}, event.finish_reason)
                        continue
                    if content and not sent.get(index):
                        yield chunk(index, {"content": content})
                    for k, c in enumerate(calls):  # OpenAI's order: id and name first, then the arguments
                        call = c.to_openai()
                        yield chunk(index, {"tool_calls": [{"index": k, "id": call["id"], "type": "function",
                                                            "function": {"name": call["function"]["name"],
                                                                         "arguments": ""}}]})
                        yield chunk(index, {"tool_calls": [{"index": k, "function": {
                            "arguments": call["function"]["arguments"]}}]})
                    yield chunk(index, {}, "tool_calls")
                    continue
                yield chunk(index, {"content": event.text} if event.text else {},
                            event.finish_reason if event.finished else None, lps)
            for line in _stream_end({"id": rid, "object": "chat.completion.chunk", "created": now,
                                     "model": model_name}, usage, req.stream_options):
                yield line

        return _EventStream(sse(), streams)

    return app


# ---- helpers ----------------------------------------------------------------------------------

async def _warm_up(app, bridge: EngineClient, metrics, model_name: str, api_key: str | None) -> None:
    """One streamed one-token completion through this process's own app, before it accepts a
    connection: a process's first request went through paths still cold (a CPU, the demo model:
    3.5 ms from arrival to admission against 1.3 ms for the next ones; an H200's host, 4.2 against
    1.3), which a user's request should not pay. It is left out of /metrics."""
    if bridge.fault is not None:
        return
    body = json.dumps({"model": model_name, "prompt": [1], "max_tokens": 1, "stream": True,
                       "ignore_eos": True}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if api_key is not None:
        headers.append((b"authorization", b"Bearer " + api_key.encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "root_path": "", "query_string": b"",
             "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    sent, hang = [], asyncio.Event()

    async def receive():
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        await hang.wait()  # the client never hangs up
        return {"type": "http.disconnect"}

    statuses = []

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    bridge.observers.remove(metrics)
    try:
        await asyncio.wait_for(app(scope, receive, send), timeout=600)
    except (asyncio.TimeoutError, EngineStopped):
        pass  # /health and every request say what is wrong with the engine
    finally:
        hang.set()
        bridge.observers.append(metrics)
    if statuses and statuses[0] != 200:
        raise RuntimeError(f"the HTTP process's warm-up request failed with status {statuses[0]}")


class _Guard:
    """Every request, before any route runs: when the engine has stopped, a 503 that says why
    (every endpoint: the server is on its way out); with an API key, a 401 for a missing or wrong
    key (constant-time comparison) on every path but /health (and /metrics with public_metrics);
    a body over the limit, a 413. The limit holds on the bytes read, whatever the transfer
    encoding: the body is read here, chunk by chunk, and refused as soon as it passes the limit,
    before anything parses it (a chunked body carries no Content-Length to check up front)."""

    OPEN_PATHS = ("/health",)

    def __init__(self, app, max_body_bytes: int, api_key: str | None, reject, fault, public_metrics: bool = False):
        self.app, self.max_body_bytes, self.reject, self.fault = app, max_body_bytes, reject, fault
        self.api_key = api_key.encode() if api_key is not None else None
        self.open_paths = self.OPEN_PATHS + (("/metrics",) if public_metrics else ())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["arrived"] = time.perf_counter()  # request.state.arrived (queue time)
        if (why := self.fault()) is not None:
            return await self.reject(503, f"the server cannot serve: {why}", "server_error")(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in self.open_paths:
            given = headers.get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.api_key):
                return await self.reject(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                         "authentication_error")(scope, receive, send)
        too_big = self.reject(413, f"the body is over {self.max_body_bytes} bytes: send a smaller request",
                              "invalid_request_error")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await too_big(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away before its body ended
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        scope["state"]["body_bytes"] = size  # tokenizing.py: a large body is tokenized off the event loop

        async def replay():  # the body once, whole; then the client's own messages (its hang-up)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _Result:
    def __init__(self):
        self.token_ids, self.logprobs, self.text = [], [], ""
        self.finish_reason, self.cached, self.prompt_logprobs = None, 0, None


def _submit(bridge: EngineClient, jobs, request: Request) -> list[tuple[int, RequestStream]]:
    """Every job (index, ids, params) to the engine now, before the handler returns."""
    arrived = getattr(request.state, "arrived", None)
    return [(index, bridge.submit(ids, params, arrived)) for index, ids, params in jobs]


class _EventStream(StreamingResponse):
    """Server-sent events of submitted requests, which are aborted however the response ends
    (a client that hangs up before the first chunk included)."""

    def __init__(self, body, streams: list[tuple[int, RequestStream]]):
        super().__init__(body, media_type="text/event-stream")
        self.streams = streams

    async def __call__(self, scope, receive, send):
        # Starlette runs the stream and a listener for the client's hang-up in an anyio task group:
        # ~14% of the HTTP process's CPU per request (cProfile, thread CPU time). Two asyncio tasks.
        writer = asyncio.ensure_future(self.stream_response(send))
        listener = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait((writer, listener), return_when=asyncio.FIRST_COMPLETED)
        finally:
            writer.cancel()
            listener.cancel()
            for _, stream in self.streams:
                stream.close()
        if writer.done() and not writer.cancelled() and writer.exception() is not None:
            raise writer.exception()


async def _collect(stream: RequestStream) -> _Result:
    r = _Result()
    async for event in stream:
        r.token_ids.append(event.token_id)
        r.logprobs.append(event.logprobs)
        r.text += event.text
        if event.prompt_logprobs is not None:
            r.prompt_logprobs = event.prompt_logprobs
        if event.finished:
            r.finish_reason, r.cached = event.finish_reason, event.num_cached_tokens or 0
    return r


async def _unless_disconnected(request: Request, streams: list[tuple[int, RequestStream]]) -> list[_Result]:
    """A non-streamed request's generations, collected; a client that hangs up before they end
    has them aborted (the engine frees their pages)."""
    work = asyncio.ensure_future(asyncio.gather(*(_collect(s) for _, s in streams)))
    try:
        while not work.done():
            await asyncio.wait([work], timeout=0.5)
            if not work.done() and await request.is_disconnected():
                work.cancel()
                raise BadRequest("the client disconnected", status=499)
        return work.result()
    finally:
        for _, stream in streams:
            stream.close()


async def _merged(streams: list[tuple[int, RequestStream]]) -> AsyncIterator[tuple[int, StepEvent]]:
    """Events of several requests (index, event) in arrival order."""
    if len(streams) == 1:  # one request (n = 1): its own events, without a task and a second queue
        index, stream = streams[0]
        async for event in stream:
            yield index, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, stream):
        try:
            async for event in stream:
                await queue.put((index, event))
        except BaseException as e:  # noqa: BLE001
            await queue.put((index, e))
            raise
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(*s)) for s in streams]
    try:
        done = 0
        while done < len(tasks):
            index, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()


def _chunk(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _failed_stream_end(e: Exception, open_choices: list[str]) -> list[str]:
    """A stream whose engine stopped, or whose request failed, mid-answer: each choice still open
    ends with finish_reason "error", then OpenAI's error event (the openai client raises it as an
    APIError), then [DONE]."""
    status = getattr(e, "status", 503)
    body = {"message": str(e), "type": "server_error" if status >= 500 else "invalid_request_error",
            "param": None, "code": status}
    return open_choices + [_chunk({"error": body}), "data: [DONE]\n\n"]


def _stream_end(head: dict, usage: "_Usage", stream_options: dict | None) -> list[str]:
    """A stream's last events: the usage chunk (if stream_options.include_usage), then [DONE]."""
    usage_chunk = [_chunk(dict(head, choices=[], usage=usage.body()))] if (stream_options or {}).get("include_usage") else []
    return usage_chunk + ["data: [DONE]\n\n"]


class _Usage:
    def __init__(self):
        self.prompt = self.completion = self.cached = 0
        self._seen: set[int] = set()

    # A prompt's tokens (and its cached ones) count once, however many choices (n) it has: cached
    # tokens never exceed prompt tokens.
    def add(self, ids, generated, cached, first_of_prompt=True):
        if first_of_prompt:
            self.prompt += len(ids)
            self.cached += cached
        self.completion += len(generated)

    def count(self, index, ids, event: StepEvent, n: int):
        if index // n not in self._seen and index % n == 0:
            self._seen.add(index // n)
            self.prompt += len(ids)
        self.completion += 1
        if event.finished and index % n == 0:
            self.cached += event.num_cached_tokens or 0

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion,
                "prompt_tokens_details": {"cached_tokens": self.cached}}


def _offsets(tokens: list[str]) -> list[int]:
    out, at = [], 0
    for t in tokens:
        out.append(at)
        at += len(t)
    return out


def _seeded(params: SamplingParams, c: int) -> SamplingParams:
    """The c-th of n choices: its own seed (a given seed plus c), so choices differ when sampling."""
    return params if params.seed is None or c == 0 else dataclasses.replace(params, seed=params.seed + c)


def _sampling(req, *, max_tokens, logprobs, prompt_logprobs=None, defaults: dict | None = None) -> SamplingParams:
    """OpenAI's fields -> SamplingParams (its checks name the field and the fix). defaults: the
    model's generation_config values (vLLM's --generation-config auto), for fields the request
    leaves unset."""
    given = {k: getattr(req, k) for k in ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                                          "presence_penalty", "frequency_penalty", "repetition_penalty")
             if getattr(req, k) is not None}
    given = {k: v for k, v in (defaults or {}).items() if k != "max_tokens"} | given
    if max_tokens is None and (defaults or {}).get("max_tokens") is not None:
        max_tokens = defaults["max_tokens"]
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              ignore_eos=req.ignore_eos, **given)
    except ValueError as e:
        raise BadRequest(str(e)) from e


def _big(request: Request) -> bool:
    return getattr(request.state, "body_bytes", 0) > INLINE_BODY_BYTES


async def _completion_prompts(tokenizing: Tokenizing, prompt, big: bool) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):  # token ids (the request model allows no mixed list)
        prompt = [prompt]
    if not prompt:
        raise BadRequest("prompt is empty: send a string, a list of strings, or token ids", "prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((p, await tokenizing.encode(p, add_bos=True, big=big)))
        else:
            out.append((None, list(p)))
    return out


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(value, field: str) -> None:
    """Text that cannot be UTF-8 (a lone surrogate such as JSON's "\\ud800", which JSON parsers
    pass through) is the client's error, named by its field: no tokenizer could encode it."""
    if isinstance(value, str):
        if not value.isascii() and _SURROGATE.search(value):
            raise BadRequest(f"{field} holds a lone UTF-16 surrogate (e.g. \\ud800), which is not text: "
                             "send valid Unicode (pair surrogates, or drop them)", field.split(".")[0])
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, field)
            _check_text(v, f"{field}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_text(v, f"{field}.{i}")


def _content(message: dict) -> dict:
    """OpenAI content parts -> text (we serve text models)."""
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest("message content parts must be {'type': 'text', 'text': ...} (text models only)",
                                 "messages")
            parts.append(part["text"])
        message = dict(message, content="".join(parts))
    return message


def _chat_messages(messages: list[dict]) -> list[dict]:
    """OpenAI-shaped messages checked and made ready for the chat template."""
    roles = ("system", "developer", "user", "assistant", "tool")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in roles:
            raise BadRequest(f"messages[{i}].role must be one of {roles}", f"messages.{i}.role")
        if m.get("content") is not None and not isinstance(m.get("content"), (str, list)):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", f"messages.{i}.content")
    _check_text(messages, "messages")
    return [_content(m) for m in _mistral_tool_ids(messages)]


async def _templated(work):
    """A template's or tokenizer's refusal of the client's input is a 400 naming it."""
    try:
        return await work
    except BadRequest:
        raise
    except Exception as e:  # noqa: BLE001  mistral-common / the template said no: the client's input
        raise BadRequest(f"the conversation cannot be templated: {type(e).__name__}: {e}", "messages") from e


_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")
_BASE62 = string.digits + string.ascii_letters


def _mistral_id(call_id) -> str:
    """A tool-call id as Mistral's templates accept it (exactly 9 letters or digits): valid ids pass
    through; any other (OpenAI's call_..., UUIDs) maps to one by its hash, so a call and its
    result still match."""
    if isinstance(call_id, str) and _MISTRAL_ID.fullmatch(call_id):
        return call_id
    n = int.from_bytes(hashlib.sha256(str(call_id).encode()).digest()[:8], "big")
    return "".join(_BASE62[(n // 62**i) % 62] for i in range(9))


def _mistral_tool_ids(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        if m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
            m = dict(m, tool_calls=[dict(c, id=_mistral_id(c.get("id"))) if isinstance(c, dict) else c
                                    for c in m["tool_calls"]])
        elif m.get("role") == "tool" and "tool_call_id" in m:
            m = dict(m, tool_call_id=_mistral_id(m["tool_call_id"]))
        out.append(m)
    return out


def _tools(req: ChatCompletionRequest):
    choice = req.tool_choice
    if choice in (None, "auto"):
        return req.tools or None
    if choice == "none":
        return None
    if not req.tools:
        raise BadRequest("tool_choice needs tools: send the tools it may call", "tool_choice")
    names = [t.get("function", {}).get("name") for t in req.tools]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise BadRequest(f"tool_choice names {name!r}, which is not among the tools {names}", "tool_choice")
    elif choice != "required":
        raise BadRequest(f"tool_choice {choice!r} is not one of 'auto', 'none', 'required' or a named function",
                         "tool_choice")
    return req.tools  # the call itself is enforced by a grammar (constraints.py)
