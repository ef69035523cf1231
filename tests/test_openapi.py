"""The server's OpenAPI document (/openapi.json) describes what it sends: errors as OpenAI's error
object with status 400 for bad input (never FastAPI's 422, which errors.py turns into 400s), a
"default" error for the other statuses (401, 404, 413, 500, 503), server-sent events for
streamed completions, Prometheus text for /metrics and no body for /health. Checked on the
document itself, then by schemathesis, which sends generated requests (valid and invalid) to the
app over the scripted engine of test_server_units.py and checks each response's status, content
type and body against the document."""

import pytest
from starlette.testclient import TestClient
from test_server_units import MODEL, FakeEngine, FakeTokenizer

from mistral_jax.entrypoints.server.app import create_app
from mistral_jax.entrypoints.server.messages_protocol import ANTHROPIC_PATHS

POSTS = ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize", "/detokenize"]
STREAMED = ["/v1/completions", "/v1/chat/completions", "/v1/responses"]
ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
ANTHROPIC_ERROR = {"$ref": "#/components/schemas/AnthropicErrorResponse"}  # on ANTHROPIC_PATHS


@pytest.fixture(scope="module")
def doc():
    r = TestClient(create_app(FakeEngine(), FakeTokenizer(), MODEL)).get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def operations(doc):
    return [(path, method, op) for path, ops in doc["paths"].items() for method, op in ops.items()]


def test_every_route_is_documented(doc):
    assert set(doc["paths"]) == {"/health", "/v1/models", "/metrics", "/tokenizer_info", *POSTS,
                                 "/v1/responses/{response_id}", *ANTHROPIC_PATHS}


def test_no_422_anywhere(doc):
    for path, method, op in operations(doc):
        assert "422" not in op["responses"], (method, path)
    assert not {"HTTPValidationError", "ValidationError"} & set(doc["components"]["schemas"])


def test_errors_are_openais_error_object(doc):
    error = doc["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    assert error["properties"]["error"] == {"$ref": "#/components/schemas/ErrorObject"}
    obj = doc["components"]["schemas"]["ErrorObject"]
    assert set(obj["required"]) == {"message", "type", "param", "code"}
    for path in POSTS:
        assert doc["paths"][path]["post"]["responses"]["400"]["content"] == {"application/json": {"schema": ERROR}}
    for path, method, op in operations(doc):  # whatever else goes wrong, on every route: its API's error object
        error = ANTHROPIC_ERROR if path in ANTHROPIC_PATHS else ERROR
        assert op["responses"]["default"]["content"] == {"application/json": {"schema": error}}, (method, path)


def test_media_types_are_what_is_sent(doc):
    paths = doc["paths"]
    for path in STREAMED:
        content = paths[path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}, path
        assert content["text/event-stream"]["itemSchema"]["required"] == ["data"]  # what each event holds
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "content" not in paths["/health"]["get"]["responses"]["200"]  # an empty 200
    for path in ("/v1/models", "/tokenizer_info", "/tokenize", "/detokenize"):
        method = "post" if path in POSTS else "get"
        assert set(paths[path][method]["responses"]["200"]["content"]) == {"application/json"}, path


def test_the_document_matches_what_the_routes_send():
    client = TestClient(create_app(FakeEngine(), FakeTokenizer(), MODEL))
    assert client.get("/health").content == b""
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    streamed = client.post("/v1/completions", json={"prompt": "hi", "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    bad = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": "many"})  # pydantic's complaint
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.slow
def test_schemathesis_finds_the_server_as_documented():
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    app = create_app(FakeEngine(), FakeTokenizer(), MODEL)

    async def without_lifespan(scope, receive, send):
        # As the unit tests run the app: no lifespan (its tokenizer worker and warm-up request).
        # Refusing the scope at once is how an ASGI app says it has none.
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan")
        await app(scope, receive, send)

    schema = schemathesis.openapi.from_asgi("/openapi.json", without_lifespan)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              response_headers_conformance]
    streamed = {"/v1/completions": {"prompt": "hi", "stream": True},
                "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "stream": True},
                "/v1/responses": {"input": "hi", "stream": True}}
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def generated(case):
            case.call_and_validate(checks=checks)

        try:
            generated()
            if operation.path in streamed:  # a stream for sure, besides whatever hypothesis makes
                operation.Case(body=streamed[operation.path], media_type="application/json").call_and_validate(
                    checks=checks)
        except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001  schemathesis raises a BaseExceptionGroup
            failures.append(f"{operation.method.upper()} {operation.path}: {e!r}")  # every operation's, not the first
    assert not failures, "\n\n".join(failures)
