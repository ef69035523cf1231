"""The ASGI layer in front of every route: engine faults, the API key, the body's size.

A plain ASGI wrapper, not @app.middleware("http"): Starlette's BaseHTTPMiddleware carries every
streamed chunk through an extra memory stream and task; this one only reads the request's
headers, and its body when there is one."""

from __future__ import annotations

import hmac
import time

from mistral_jax.entrypoints.server.messages_protocol import ANTHROPIC_PATHS

MAX_BODY_BYTES = 8 << 20  # the default limit on a request's body


class Guard:
    """Every request, before any route runs: when the engine has stopped, a 503 that says why
    (every endpoint: the server is on its way out); with an API key, a 401 for a missing or wrong
    key (constant-time comparison) on every path but /health, /metrics with public_metrics, and
    the chat page (/ and /chat: a static page with no secret, which asks for the key and sends it
    with its API calls; chat_page.py); a body over the limit, a 413. The limit holds on the bytes
    read, whatever the transfer encoding: the body is read here, chunk by chunk, and refused as
    soon as it passes the limit, before anything parses it (a chunked body carries no
    Content-Length to check up front)."""

    OPEN_PATHS = ("/health", "/", "/chat")

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
            anthropic = scope["path"] in ANTHROPIC_PATHS  # Anthropic's clients send the key as x-api-key
            if anthropic and not token:
                token = headers.get(b"x-api-key", b"")
            if not hmac.compare_digest(token, self.api_key):
                how = "'x-api-key: <key>' or 'Authorization: Bearer <key>'" if anthropic else \
                    "'Authorization: Bearer <key>'"
                return await self.reject(401, f"missing or wrong API key: send {how}",
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
