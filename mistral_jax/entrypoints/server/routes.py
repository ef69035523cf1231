"""The HTTP routes: OpenAI's API (/v1/models, /v1/completions, /v1/chat/completions) and vLLM's
extras (/health, /metrics, /tokenize, /detokenize, /tokenizer_info). Each parses its body
(protocol.py) and hands it to the module that serves it, with the app's ServerContext.

Each route declares its responses as they are sent, so the OpenAPI document matches the server:
errors are OpenAI's error object (a 400 for bad input, never FastAPI's 422: errors.py answers
validation errors; "default" covers the rest: 401, 404, 413, 500, 503), streams are
text/event-stream, /metrics is text/plain and /health has no body."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mistral_jax.entrypoints.server.chat import create_chat_completion
from mistral_jax.entrypoints.server.completions import create_completion
from mistral_jax.entrypoints.server.context import context_of
from mistral_jax.entrypoints.server.errors import BadRequest, ErrorResponse, error_response
from mistral_jax.entrypoints.server.inputs import (
    chat_messages,
    check_text,
    is_big,
    templated,
    with_legacy_functions,
)
from mistral_jax.entrypoints.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

router = APIRouter()

# Declaring "default" (any status not listed) also keeps FastAPI from documenting its 422.
_ERRORS = {"default": {"model": ErrorResponse, "description": "OpenAI's error object"}}
_BAD_INPUT = {400: {"model": ErrorResponse, "description": "the request cannot be served as sent: error.param "
                                                          "names the field"}, **_ERRORS}
# One server-sent event, as FastAPI's own streams (and OpenAPI 3.2's itemSchema) document it.
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a chunk as JSON, or [DONE] last"}, "event": {"type": "string"},
    "id": {"type": "string"}, "retry": {"type": "integer", "minimum": 0}}}
_STREAMED = {200: {"description": "the response; with `stream: true`, server-sent events (`data: {chunk}`, "
                                  "then `data: [DONE]`)",
                   "content": {"text/event-stream": {"itemSchema": _SSE_EVENT}}}, **_BAD_INPUT}


@router.get("/health", response_class=Response, responses={
    200: {"description": "the engine serves (no body)"},
    "default": {"model": ErrorResponse, "description": "503: the engine has stopped, and why"}})
async def health(request: Request):
    fault = context_of(request).bridge.fault
    if fault is not None:
        return error_response(503, fault, type_="server_error")
    return Response(status_code=200)


@router.get("/v1/models", responses=_ERRORS)
async def models(request: Request):
    ctx = context_of(request)
    return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": ctx.created,
                                        "owned_by": "mistral_jax", "max_model_len": ctx.max_model_len}]}


@router.get("/metrics", response_class=Response, responses={
    200: {"description": "Prometheus' text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
    **_ERRORS})
async def prometheus(request: Request):
    metrics = context_of(request).metrics
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)


@router.post("/v1/completions", responses=_STREAMED)
async def completions(req: CompletionRequest, request: Request):
    return await create_completion(context_of(request), req, request)


@router.post("/v1/chat/completions", responses=_STREAMED)
async def chat(req: ChatCompletionRequest, request: Request):
    return await create_chat_completion(context_of(request), with_legacy_functions(req), request)


@router.post("/tokenize", responses=_BAD_INPUT)
async def tokenize(req: TokenizeRequest, request: Request):
    ctx = context_of(request)
    ctx.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise BadRequest("give exactly one of 'prompt' (text) or 'messages' (a chat)", "prompt")
    check_text(req.prompt, "prompt")
    messages = chat_messages(req.messages) if req.messages is not None else None
    special = special_tokens(ctx.tokenizer).get(req.prompt) if req.prompt is not None else None
    if special is not None:  # /tokenizer_info's special token, alone: its id (see special_tokens)
        ids = ctx.tokenizer.encode("", add_bos=req.add_special_tokens) + [special]
        return {"tokens": ids, "count": len(ids), "max_model_len": ctx.max_model_len}
    if is_big(request):  # the whole body made off the loop: a long text's ids are millions of numbers
        body = await templated(ctx.tokenizing.tokenize_body(req.prompt, messages, req.add_special_tokens,
                                                            ctx.max_model_len))
        return Response(body, media_type="application/json")
    ids = (ctx.tokenizer.encode(req.prompt, add_bos=req.add_special_tokens) if req.prompt is not None
           else await templated(ctx.tokenizing.encode_chat(messages, None, big=False)))
    return {"tokens": ids, "count": len(ids), "max_model_len": ctx.max_model_len}


@router.post("/detokenize", responses=_BAD_INPUT)
async def detokenize(req: DetokenizeRequest, request: Request):
    ctx = context_of(request)
    ctx.check_model(req.model)
    bad = [t for t in req.tokens if not 0 <= t < ctx.vocab_size]
    if bad:
        raise BadRequest(f"token ids outside [0, {ctx.vocab_size}): {bad[:5]}", "tokens")
    return {"prompt": ctx.tokenizer.decode(req.tokens)}


@router.get("/tokenizer_info", responses=_ERRORS)
async def tokenizer_info(request: Request):
    """The tokenizer's configuration as vLLM's /tokenizer_info serves it (tokenizer_config.json's
    fields): its class, special tokens, whether it adds BOS, the served context, and the chat
    template where the tokenizer has a jinja one (Mistral's tokenizers template in code, in
    mistral-common: none). lm-eval's remote tokenizer reads eos_token, bos_token and
    chat_template here, then learns their ids from /tokenize."""
    ctx = context_of(request)
    tokenizer = ctx.tokenizer
    names = {token_id: name for name, token_id in special_tokens(tokenizer).items()}
    info = {"tokenizer_class": type(tokenizer).__name__,
            "bos_token": names.get(tokenizer.bos_id), "eos_token": names.get(tokenizer.eos_id),
            "add_bos_token": tokenizer.encode("", add_bos=True)[:1] == [tokenizer.bos_id],
            "model_max_length": ctx.max_model_len, "vocab_size": ctx.vocab_size}
    if getattr(tokenizer, "chat_template", None):
        info["chat_template"] = tokenizer.chat_template
    return {k: v for k, v in info.items() if v is not None}


def special_tokens(tokenizer) -> dict[str, int]:
    """BOS and EOS by name ("<s>": 1), as /tokenizer_info names them. /tokenize reads a prompt that
    is exactly one of these names as that token, as Hugging Face tokenizers read special tokens
    in text: clients (lm-eval's remote tokenizer) learn the ids of /tokenizer_info's tokens by
    tokenizing their names, and mistral-common, which reads every text as plain text, would
    give the pieces of "</s>" instead. Only the whole prompt: a special token's name inside a
    text stays text, as in a completion's prompt."""
    out = {}
    for token_id in (tokenizer.bos_id, tokenizer.eos_id):
        if token_id is not None and 0 <= token_id < tokenizer.vocab_size:
            name = tokenizer.decode([token_id], skip_special_tokens=False)
            if name:
                out[name] = token_id
    return out
