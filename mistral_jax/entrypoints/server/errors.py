"""Errors as OpenAI's error object: bad input is a 4xx naming the field and the fix; only a fault
of ours is a 500.

Handlers raise BadRequest; the exception handlers installed here turn it, FastAPI's own
validation errors, the engine's refusals and anything unexpected into JSON error responses."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mistral_jax.entrypoints.server.bridge import EngineStopped, RequestFailed
from mistral_jax.entrypoints.server.constraints import ConstraintError
from mistral_jax.entrypoints.server.protocol import ErrorType, error_body


class BadRequest(Exception):
    """The client's request cannot be served as sent. param: the request field at fault (OpenAI's
    error.param), where one is."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: ErrorType = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type_


def error_response(status: int, message: str, param: str | None = None,
                   type_: ErrorType = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, status), status_code=status)


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

    @app.exception_handler(Exception)
    async def _ours(_, e: Exception):
        # a fault of ours: still OpenAI's JSON error object (the traceback goes to the log)
        return error_response(500, f"internal error: {type(e).__name__}: {e}", type_="server_error")


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
