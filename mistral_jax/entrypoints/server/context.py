"""What every route of an HTTP process shares: the engine's bridge and what it told of the model,
the tokenizer, and the name the model is served under. One per app, at app.state.server."""

from __future__ import annotations

import time

from fastapi import Request

from mistral_jax.entrypoints.server.bridge import EngineClient
from mistral_jax.entrypoints.server.errors import BadRequest
from mistral_jax.entrypoints.server.tokenizing import Tokenizing


class ServerContext:
    def __init__(self, bridge: EngineClient, tokenizer, served_model_name: str | None, metrics):
        info = bridge.info
        self.bridge, self.tokenizer, self.metrics = bridge, tokenizer, metrics
        self.model_name = served_model_name or info.model_path
        self.max_model_len = info.max_model_len
        self.vocab_size = info.limits.vocab_size
        self.defaults = dict(info.default_sampling)  # the model's generation_config, for fields a request leaves unset
        self.tokenizing = Tokenizing(tokenizer, info.tokenizer_source, info.tokenizer_mode)
        self.created = int(time.time())  # /v1/models' `created`

    def check_model(self, name: str | None) -> None:
        """A request may name the served model, or none."""
        if name is not None and name != self.model_name:
            raise BadRequest(f"model {name!r} is not served here; this server serves {self.model_name!r}", "model",
                             404, "not_found_error")


def context_of(request: Request) -> ServerContext:
    return request.app.state.server
