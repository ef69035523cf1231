"""Errors as OpenAI's error object: bad input is a 4xx naming the field and the fix; only a fault
of ours is a 500.

Handlers raise BadRequest; the exception handlers installed here turn it, FastAPI's own
validation errors and the engine's refusals into JSON error responses. Anything else that a
request raises is a fault of ours, which RequestIds (the outermost layer of the app) answers:
every response carries its request id (the `x-request-id` header), and a fault is logged once,
with its traceback and that id, and answered with a 500 naming the id; the connection stays
open and the server serves on. On the paths of Anthropic's Messages API (/v1/messages), every
such error comes as Anthropic's error object instead (its type, the field first in its message)."""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from mistral_jax.entrypoints.server.bridge import EngineStopped, RequestFailed
from mistral_jax.entrypoints.server.constraints import ConstraintError
from mistral_jax.entrypoints.server.messages_protocol import ANTHROPIC_PATHS, anthropic_error_body
from mistral_jax.entrypoints.server.protocol import ErrorType, error_body

log = logging.getLogger("mistral_jax.server")


def log_to_stderr() -> None:
    """The server's log lines (faults, aborted requests) on stderr, beside uvicorn's, unless the
    process has configured logging itself (a handler here or on the root logger)."""
    if not log.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


class BadRequest(Exception):
    """The client's request cannot be served as sent. param: the request field at fault (OpenAI's
    error.param), where one is."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: ErrorType = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type_


class ErrorObject(BaseModel):
    """OpenAI's error fields; code is the HTTP status here."""

    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    """OpenAI's error object, as every error response carries it (the OpenAPI document's schema)."""

    error: ErrorObject


def error_response(status: int, message: str, param: str | None = None,
                   type_: ErrorType = "invalid_request_error") -> JSONResponse:
    return _ErrorJSON(status, message, param, type_)


class _ErrorJSON(JSONResponse):
    """An error as OpenAI's error object, or as Anthropic's on the paths of Anthropic's Messages
    API (messages_protocol.ANTHROPIC_PATHS), chosen by the path it answers when it is sent: every
    error (a handler's, the Guard's 401/413/503, a fault's 500) speaks the API its route speaks."""

    def __init__(self, status: int, message: str, param: str | None, type_: ErrorType):
        super().__init__(error_body(message, type_, param, status), status_code=status)
        self.anthropic = anthropic_error_body(status, message, param, type_)

    async def __call__(self, scope, receive, send):
        if scope.get("path") in ANTHROPIC_PATHS:
            return await JSONResponse(self.anthropic, status_code=self.status_code)(scope, receive, send)
        await super().__call__(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BadRequest)
    async def _bad(_, e: BadRequest):
        return error_response(e.status, e.message, e.param, e.type)

    @app.exception_handler(ConstraintError)
    async def _constraint(_, e: ConstraintError):
        return error_response(400, str(e), e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        return _validation_error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), type_=type_)

    @app.exception_handler(EngineStopped)
    async def _stopped(_, e: EngineStopped):
        return error_response(503, str(e), type_="server_error")

    @app.exception_handler(RequestFailed)
    async def _failed(_, e: RequestFailed):
        return error_response(e.status, str(e), type_="server_error" if e.status >= 500 else "invalid_request_error")


def _validation_error(e: RequestValidationError) -> JSONResponse:
    """pydantic's first complaint about a body, as a 400 naming the request's field (a union's
    branch or a list index follows the field in the message, not in param)."""
    first = e.errors()[0] if e.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    if first.get("type") == "json_invalid":
        return error_response(400, "the body is not valid JSON: send a JSON object (Content-Type: application/json)")
    got = first.get("input")
    got = repr(got)[:80] if not isinstance(got, dict) else "an object"
    return error_response(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')} (got {got})", param)


# A client's own X-Request-Id is kept if it is printable ASCII without spaces, of a sane length:
# it goes into a response header and the log as it is.
_CLIENT_ID = re.compile(rb"[\x21-\x7e]{1,128}")


class RequestIds:
    """The outermost layer of the app (an ASGI wrapper, in front of the Guard): every HTTP request
    gets an id, `req-<16 hex>` or the client's own X-Request-Id, kept in its scope's state
    (request.state.request_id: the log names requests by it) and sent back in an
    `x-request-id` header on whatever response it gets.

    Anything a request raises that no exception handler took is a fault of ours: it is logged
    here once, with its traceback and the request id, and answered with OpenAI's error object
    (500, type server_error, the id in the message). Nothing is re-raised, so neither
    Starlette nor uvicorn logs it again, and uvicorn keeps the connection (it closes one whose
    application raised). A response that had already started cannot become a 500: a stream of
    server-sent events ends with OpenAI's error event and [DONE], as streams whose engine failed
    do (sse.py); any other body (no route streams one) just ends."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        rid = given.decode() if _CLIENT_ID.fullmatch(given) else f"req-{secrets.token_hex(8)}"
        scope.setdefault("state", {})["request_id"] = rid
        header = (b"x-request-id", rid.encode())
        started = ended = False
        event_stream = False

        async def send_with_id(message):
            nonlocal started, ended, event_stream
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", ()))
                event_stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                   for k, v in headers)
                message = dict(message, headers=[*headers, header])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:  # noqa: BLE001  a fault of ours: logged and answered here, once
            log.error("request %s (%s %s) failed: %s: %s", rid, scope["method"], scope["path"],
                      type(e).__name__, e, exc_info=e)
            message = f"internal error (request {rid}): {type(e).__name__}: {e}"
            if not started:
                await error_response(500, message, type_="server_error")(scope, receive, send_with_id)
            elif not ended:
                tail = b""
                if event_stream and scope["path"] in ANTHROPIC_PATHS:  # Anthropic's error event
                    event = anthropic_error_body(500, message, None, "server_error")
                    tail = f"event: error\ndata: {json.dumps(event)}\n\n".encode()
                elif event_stream:
                    event = error_body(message, "server_error", None, 500)
                    tail = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
                await send({"type": "http.response.body", "body": tail, "more_body": False})
