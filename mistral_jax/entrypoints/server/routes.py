"""The HTTP routes: OpenAI's API (/v1/models, /v1/completions, /v1/chat/completions) and vLLM's
extras (/health, /metrics, /tokenize, /detokenize). Each parses its body (protocol.py) and hands
it to the module that serves it, with the app's ServerContext."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mistral_jax.entrypoints.server.chat import create_chat_completion
from mistral_jax.entrypoints.server.completions import create_completion
from mistral_jax.entrypoints.server.context import context_of
from mistral_jax.entrypoints.server.errors import BadRequest, error_response
from mistral_jax.entrypoints.server.inputs import (
    chat_messages,
    check_text,
    is_big,
    templated,
)
from mistral_jax.entrypoints.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    fault = context_of(request).bridge.fault
    if fault is not None:
        return error_response(503, fault, type_="server_error")
    return Response(status_code=200)


@router.get("/v1/models")
async def models(request: Request):
    ctx = context_of(request)
    return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": ctx.created,
                                        "owned_by": "mistral_jax", "max_model_len": ctx.max_model_len}]}


@router.get("/metrics")
async def prometheus(request: Request):
    metrics = context_of(request).metrics
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    return await create_completion(context_of(request), req, request)


@router.post("/v1/chat/completions")
async def chat(req: ChatCompletionRequest, request: Request):
    return await create_chat_completion(context_of(request), req, request)


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request):
    ctx = context_of(request)
    ctx.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise BadRequest("give exactly one of 'prompt' (text) or 'messages' (a chat)", "prompt")
    check_text(req.prompt, "prompt")
    messages = chat_messages(req.messages) if req.messages is not None else None
    if is_big(request):  # the whole body made off the loop: a long text's ids are millions of numbers
        body = await templated(ctx.tokenizing.tokenize_body(req.prompt, messages, req.add_special_tokens,
                                                            ctx.max_model_len))
        return Response(body, media_type="application/json")
    ids = (ctx.tokenizer.encode(req.prompt, add_bos=req.add_special_tokens) if req.prompt is not None
           else await templated(ctx.tokenizing.encode_chat(messages, None, big=False)))
    return {"tokens": ids, "count": len(ids), "max_model_len": ctx.max_model_len}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request):
    ctx = context_of(request)
    ctx.check_model(req.model)
    bad = [t for t in req.tokens if not 0 <= t < ctx.vocab_size]
    if bad:
        raise BadRequest(f"token ids outside [0, {ctx.vocab_size}): {bad[:5]}", "tokens")
    return {"prompt": ctx.tokenizer.decode(req.tokens)}
