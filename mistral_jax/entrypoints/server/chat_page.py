"""The chat page at / and /chat: one static HTML file (static/chat.html) that talks to this server's
own OpenAI API (/v1/models, streamed /v1/chat/completions), so a person who starts
`python -m mistral_jax.serve` can open the address in a browser and chat with the model.

The page is the same for everyone and holds no secret, so the guard serves it without the API key
(guard.py's OPEN_PATHS); the page asks for the key and sends it with each API call. It needs no
build step and nothing from the network: its script and style are inline, and its
Content-Security-Policy lets it reach only this server.

The file is read once, when this module is imported: a wheel that lacks it (pyproject.toml's
package-data) fails at import, which tests/test_wheel_install.py does for every module."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = resources.files(__package__).joinpath("static", "chat.html").read_bytes()
PATHS = ("/", "/chat")

# Inline script and style only; fetch() to this origin only; no frames, no form posts elsewhere.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a restarted (perhaps upgraded) server's page, not a stale copy
}

router = APIRouter()


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
@router.api_route("/chat", methods=["GET", "HEAD"], include_in_schema=False)
async def chat_page():
    """Left out of the OpenAPI document: it is a page for people, not part of the API."""
    return HTMLResponse(PAGE, headers=_HEADERS)
