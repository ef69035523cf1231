"""The server's FastAPI app: routes (routes.py) over the async bridge, behind the guard
(guard.py), with OpenAI's error objects (errors.py).

Bad input is a 4xx with OpenAI's error object naming the field and the fix; only a fault of
ours is a 500, logged once with the request's id (every response carries it in x-request-id).
Streams are server-sent events (`data: {...}`, then `data: [DONE]`); a client that goes away
has its request aborted. The OpenAPI document (/openapi.json) says so: errors as OpenAI's error
object (never FastAPI's 422), streams as text/event-stream, /metrics as text/plain, /health
without a body (routes.py declares each)."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI

from mistral_jax.entrypoints.server import chat_page, messages, responses, routes
from mistral_jax.entrypoints.server.bridge import EngineClient
from mistral_jax.entrypoints.server.context import ServerContext
from mistral_jax.entrypoints.server.errors import (
    BadRequest,
    RequestIds,
    error_response,
    install_error_handlers,
    log_to_stderr,
)
from mistral_jax.entrypoints.server.guard import MAX_BODY_BYTES, Guard
from mistral_jax.entrypoints.server.request_params import (
    sampling_params as _sampling,  # tests/test_model_cards.py
)
from mistral_jax.entrypoints.server.warmup import warm_up

__all__ = ["BadRequest", "MAX_BODY_BYTES", "create_app", "_sampling"]


def create_app(bridge: EngineClient, tokenizer, served_model_name: str | None = None, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, public_metrics: bool = False) -> FastAPI:
    """The server's app in front of a running engine process (bridge) and its tokenizer.
    api_key: every endpoint but /health needs it (/metrics too, unless public_metrics)."""
    # prometheus-client is imported only now: with several HTTP processes, serve.py sets
    # PROMETHEUS_MULTIPROC_DIR first, which prometheus-client reads when imported.
    from mistral_jax.entrypoints.server.metrics import Metrics

    metrics = Metrics(bridge)
    bridge.observers.append(metrics)
    ctx = ServerContext(bridge, tokenizer, served_model_name, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()
        bridge.attach(loop)
        ctx.tokenizing.start()
        for hook in app.state.on_startup:  # the server's own (serve.py: it watches its other HTTP processes)
            hook(loop)
        await warm_up(app, bridge, metrics, ctx.model_name, api_key)
        yield
        ctx.tokenizing.close()
        await loop.run_in_executor(None, bridge.shutdown)

    app = FastAPI(title="mistral_jax", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.bridge, app.state.metrics, app.state.on_startup, app.state.server = bridge, metrics, [], ctx
    install_error_handlers(app)
    log_to_stderr()
    app.add_middleware(Guard, max_body_bytes=max_body_bytes, api_key=api_key, public_metrics=public_metrics,
                       reject=lambda status, message, type_: error_response(status, message, type_=type_),
                       fault=lambda: bridge.fault)
    app.add_middleware(RequestIds)  # added last: the outermost, so the Guard's refusals carry an id too
    app.include_router(routes.router)
    app.include_router(responses.router)  # /v1/responses (OpenAI's Responses API)
    app.include_router(messages.router)  # /v1/messages (Anthropic's Messages API)
    app.include_router(chat_page.router)  # the chat page at / and /chat
    return app
