"""Server-sent events as OpenAI streams them: `data: {...}` per chunk, then `data: [DONE]`.

A stream ends one of two ways: normally (the usage chunk if stream_options.include_usage asks
for it, then [DONE]), or when its engine stopped or its request failed mid-answer (each choice
still open ends with finish_reason "error", then OpenAI's error event, then [DONE])."""

from __future__ import annotations

import asyncio
import json

from fastapi.responses import StreamingResponse

from mistral_jax.entrypoints.server.events import Streams
from mistral_jax.entrypoints.server.usage import Usage

DONE = "data: [DONE]\n\n"


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def stream_end(head: dict, usage: Usage, stream_options: dict | None) -> list[str]:
    """A stream's last events: the usage chunk (if stream_options.include_usage), then [DONE].
    head: the id, object, created and model every chunk of the stream carries."""
    if (stream_options or {}).get("include_usage"):
        return [sse(dict(head, choices=[], usage=usage.body())), DONE]
    return [DONE]


def failed_stream_end(e: Exception, open_choices: list[str]) -> list[str]:
    """The end of a stream whose engine stopped (EngineStopped: 503) or whose request failed
    (RequestFailed: its status): the open choices' closing chunks, then OpenAI's error event (the
    openai client raises it as an APIError), then [DONE]."""
    status = getattr(e, "status", 503)
    body = {"message": str(e), "type": "server_error" if status >= 500 else "invalid_request_error",
            "param": None, "code": status}
    return open_choices + [sse({"error": body}), DONE]


class EventStream(StreamingResponse):
    """Server-sent events of submitted requests, which are aborted however the response ends
    (a client that hangs up before the first chunk included)."""

    def __init__(self, body, streams: Streams):
        super().__init__(body, media_type="text/event-stream")
        self.streams = streams

    async def __call__(self, scope, receive, send):
        # Two plain asyncio tasks (the writer, and a listener for the client's hang-up) in place of
        # Starlette's anyio task group, which costs more per request than the stream's own work.
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
