"""An HTTP process's warm-up: one request through its own app before it accepts a connection."""

from __future__ import annotations

import asyncio
import json

from mistral_jax.entrypoints.server.bridge import EngineClient, EngineStopped


async def warm_up(app, bridge: EngineClient, metrics, model_name: str, api_key: str | None) -> None:
    """One streamed one-token completion through this process's own app, before it accepts a
    connection: a process's first request goes through paths still cold (imports, first calls,
    the engine's first admission), which a user's request should not pay. It is left out of
    /metrics. A warm-up that gets an error status means the app cannot serve: it raises."""
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
    except (TimeoutError, EngineStopped):
        pass  # /health and every request say what is wrong with the engine
    finally:
        hang.set()
        bridge.observers.append(metrics)
    if statuses and statuses[0] != 200:
        raise RuntimeError(f"the HTTP process's warm-up request failed with status {statuses[0]}")
