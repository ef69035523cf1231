"""The chat page (/ and /chat), as a person uses it: headless Chromium (Debian's `chromium`, driven
by Playwright) against `python -m mistral_jax.serve` on the default model, with an API key.

- the page is served without the key, and fetches nothing but this server's API (its
  Content-Security-Policy, and every request the browser makes, say so);
- the key typed into the page is kept in localStorage and sent as `Authorization: Bearer`;
- the model's name (from /v1/models) shows; a message sent with temperature 0 streams back the
  same reply as the same request through the API, and tokens/s shows, counted by the usage chunk;
- Stop aborts a long reply: it stops growing, and the server has no running request soon after;
- a reply's tool calls show as collapsible blocks with their name and arguments;
- the markdown renderer (the page's own function) renders code, lists and links, and escapes HTML.

Playwright's own browser download is not used (nothing outside the package registries can be
fetched here): it launches /usr/bin/chromium. Waits poll with page.evaluate, which runs outside
the page's CSP; page.wait_for_function evaluates a string inside the page, which the CSP (no
'unsafe-eval') refuses, as it should. CHAT_PAGE_SCREENSHOT=docs/chat_page.png also saves the
screenshot there (the docs' picture); otherwise it goes to a temporary folder.
"""

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from helpers.server import default_model_server

NAME = "SmolLM2-135M-Instruct"
KEY = "chat-page-test-key"
PAGE_FILE = Path(__file__).resolve().parent.parent / "mistral_jax/entrypoints/server/static/chat.html"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
LAST_REPLY = "document.querySelector('#messages > .msg.assistant:last-child')"
SYSTEM = "You are a helpful assistant."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_the_page_loads_nothing_from_elsewhere():
    """No script, style, font or image from another host: the page works with no network."""
    html = PAGE_FILE.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)
    assert not re.search(r"@import|url\(\s*[\"']?(?:https?:)?//", html)


@pytest.fixture(scope="module")
def server():
    s = default_model_server(api_key=KEY)
    try:
        yield s
    finally:
        code = s.stop()
    assert code == 0


@pytest.mark.slow
def test_the_page_is_served_without_the_key(server):
    for path in ("/", "/chat"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
        assert r.content == PAGE_FILE.read_bytes()
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert httpx.head(server.url + "/").status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 401  # the API still needs it
    assert httpx.post(server.url + "/v1/chat/completions", json={"messages": []}).status_code == 401
    paths = httpx.get(server.url + "/openapi.json", headers=server.headers).json()["paths"]
    assert "/" not in paths and "/chat" not in paths  # a page for people, not part of the API


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("headless Chromium is missing: apt-get install chromium (tests/run.sh does where apt-get works)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install -e '.[test]'")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def page(browser, server):
    """One tab on the page for the module, with the key typed in; every request it makes and every
    page error are recorded (page.requests, page.errors)."""
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    p = context.new_page()
    p.requests, p.errors = [], []
    p.on("request", lambda r: p.requests.append(r))  # a lambda: Playwright tags handlers, a builtin can't be
    p.on("pageerror", lambda e: p.errors.append(str(e)))
    p.on("console", lambda m: "Content Security Policy" in m.text and p.errors.append(m.text))
    p.goto(server.url + "/")
    wait_for(p, "document.querySelector('#model').textContent.startsWith('unavailable')")
    assert "API key" in p.text_content("#model")  # no key yet: /v1/models answered 401
    p.fill("#api-key", KEY)
    p.press("#api-key", "Tab")  # the change event: the page asks /v1/models again
    wait_for(p, f"document.querySelector('#model').textContent === {json.dumps(NAME)}")
    try:
        yield p
    finally:
        context.close()
    assert not p.errors
    assert all(r.url.startswith(server.url + "/") for r in p.requests), [r.url for r in p.requests]


def wait_for(page, expression: str, timeout: float = 240.0):
    """Polls a JS expression with page.evaluate until it is truthy (see the module's docstring)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = page.evaluate(expression)
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{expression} stayed false for {timeout} s")


def send(page, text: str):
    """Types a message, presses Enter, waits for the reply to end; returns the reply's element."""
    count = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    wait_for(page, f"document.querySelectorAll('.msg.assistant[data-done]').length === {count + 1}")
    return page.locator(".msg.assistant").last


def chat_requests(page) -> list[dict]:
    return [r for r in page.requests if r.url.endswith("/v1/chat/completions")]


@pytest.mark.slow
def test_a_streamed_reply_is_the_apis_greedy_reply(page, server):
    page.fill("#system", SYSTEM)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "48")
    question = "Write a Python function that adds two numbers."
    reply = send(page, question)
    assert reply.get_attribute("data-done") == "done"

    request = chat_requests(page)[-1]
    assert request.headers["authorization"] == f"Bearer {KEY}"
    body = request.post_data_json
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    assert body["messages"] == messages and body["temperature"] == 0 and body["max_tokens"] == 48
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}

    expected = httpx.post(server.url + "/v1/chat/completions", headers=server.headers, timeout=300, json={
        "model": NAME, "messages": messages, "temperature": 0, "max_tokens": 48}).json()
    got = page.evaluate("chat.messages")
    assert got == [messages[1], {"role": "assistant", "content": expected["choices"][0]["message"]["content"]}]
    assert reply.locator(".body").inner_text().strip()

    stats = page.evaluate("chat.lastStats")
    assert stats["tokens"] == expected["usage"]["completion_tokens"] and stats["tokensPerSecond"] > 0
    assert re.fullmatch(rf"last reply: {stats['tokens']} tokens, \d+\.\d tok/s, first token after \d+\.\d\d s",
                        page.text_content("#stats"))
    shot = page.screenshot(type="png")
    assert len(shot) < 200_000
    if os.environ.get("CHAT_PAGE_SCREENSHOT"):
        Path(os.environ["CHAT_PAGE_SCREENSHOT"]).write_bytes(shot)


@pytest.mark.slow
def test_the_key_is_kept_across_a_reload(page):
    page.reload()
    wait_for(page, f"document.querySelector('#model').textContent === {json.dumps(NAME)}")
    assert page.input_value("#api-key") == KEY


@pytest.mark.slow
def test_stop_aborts_the_reply_on_the_server(page, server):
    aborted = server.metric("request_success_total", 'finished_reason="abort"')
    page.click("#new-chat")
    page.fill("#max-tokens", "1500")
    page.fill("#extra", json.dumps({"ignore_eos": True}))  # no early end: the reply runs until stopped
    page.fill("#input", "Tell me a long story.")
    page.click("#send")
    wait_for(page, f"({LAST_REPLY}?.querySelector('.body').textContent.length ?? 0) > 20")
    assert server.metric("num_requests_running") == 1
    page.click("#stop")
    wait_for(page, f"{LAST_REPLY}.dataset.done === 'stopped'")
    length = page.evaluate(f"{LAST_REPLY}.querySelector('.body').textContent.length")
    deadline = time.time() + 30
    while server.metric("num_requests_running") != 0:
        assert time.time() < deadline, "the stopped request still runs on the server"
        time.sleep(0.2)
    assert server.metric("request_success_total", 'finished_reason="abort"') == aborted + 1
    time.sleep(1)
    assert page.evaluate(f"{LAST_REPLY}.querySelector('.body').textContent.length") == length
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    stats = page.evaluate("chat.lastStats")
    assert stats["stopped"] and 0 < stats["tokens"] < 1500 and page.text_content("#stats").endswith("(stopped)")
    assert page.evaluate("chat.messages.at(-1).role") == "assistant"  # the partial reply stays in the chat


@pytest.mark.slow
def test_tool_calls_show_as_collapsible_blocks(page):
    page.click("#new-chat")
    page.fill("#max-tokens", "80")
    page.fill("#extra", json.dumps({"tools": [WEATHER], "tool_choice": "required"}))
    reply = send(page, "What is the weather in Paris?")
    calls = page.evaluate("chat.messages.at(-1).tool_calls")
    assert calls and all(c["function"]["name"] == "get_weather" for c in calls)
    blocks = reply.locator("details.tool-call")
    assert blocks.count() == len(calls)
    first = blocks.first
    assert first.locator("summary").inner_text() == f"tool call: get_weather ({calls[0]['id']})"
    assert json.loads(first.locator("pre").inner_text()) == json.loads(calls[0]["function"]["arguments"])
    assert first.locator("pre").is_visible()
    first.locator("summary").click()  # collapses
    assert not first.locator("pre").is_visible()
    page.fill("#extra", "")


MARKDOWN = """# Title

Some **bold**, *italic* and `x < y` text.

```python
def f(a):
    return a < 1 and '<b>'
```

- one
- two with [a link](https://example.com/?a=1&b=2)

1. first
2. second

<script>alert(1)</script> <img src=x onerror=alert(1)> [js](javascript:alert(1))
[quote](https://example.com/"onmouseover="alert(1))"""


@pytest.mark.slow
def test_markdown_renders_and_escapes_html(page):
    html = page.evaluate("md => chat.renderMarkdown(md)", MARKDOWN)
    for part in ("<h1>Title</h1>", "<strong>bold</strong>", "<em>italic</em>", "<code>x &lt; y</code>",
                 '<pre><code class="language-python">def f(a):\n'
                 '    return a &lt; 1 and &#39;&lt;b&gt;&#39;</code></pre>',
                 '<ul><li>one</li><li>two with <a href="https://example.com/?a=1&amp;b=2" target="_blank" '
                 'rel="noopener noreferrer">a link</a></li></ul>',
                 "<ol><li>first</li><li>second</li></ol>",
                 "&lt;script&gt;alert(1)&lt;/script&gt; &lt;img src=x onerror=alert(1)&gt; [js](javascript:alert(1))"):
        assert part in html, part
    # as the page shows it: no element but those the renderer writes, no handler, no script URL
    dom = page.evaluate("""md => {
        const d = document.createElement('div');
        d.innerHTML = chat.renderMarkdown(md);
        return {tags: [...new Set([...d.querySelectorAll('*')].map(e => e.tagName.toLowerCase()))].sort(),
                attributes: [...new Set([...d.querySelectorAll('*')].flatMap(e => e.getAttributeNames()))].sort(),
                hrefs: [...d.querySelectorAll('a')].map(a => a.getAttribute('href')),
                text: d.textContent};
    }""", MARKDOWN)
    assert dom["tags"] == ["a", "br", "code", "em", "h1", "li", "ol", "p", "pre", "strong", "ul"]
    assert dom["attributes"] == ["class", "href", "rel", "target"]
    assert dom["hrefs"] == ["https://example.com/?a=1&b=2", 'https://example.com/"onmouseover="alert(1']
    assert "<script>alert(1)</script> <img src=x onerror=alert(1)>" in dom["text"]
    # a reply still streaming: an open fence is code up to the end
    assert page.evaluate("chat.renderMarkdown('```js\\nlet a = 1 < 2')") == \
        '<pre><code class="language-js">let a = 1 &lt; 2</code></pre>'
