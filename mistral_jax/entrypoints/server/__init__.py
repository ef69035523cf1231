"""The OpenAI-compatible HTTP server: `python -m mistral_jax.serve`.

- protocol.py: the request and response bodies (pydantic, OpenAI's shapes) and error objects;
- engine_process.py: the engine's own process, stepping the engine for every HTTP process;
- channel.py: the framed messages between them (any size, never blocking an event loop);
- bridge.py: an HTTP process's side: submits requests, hands each its events, supervises the engine;
- tokenizing.py: large bodies tokenized in a worker process, off the event loop;
- app.py: the app (guard, error handlers, router); routes.py: the endpoints; context.py: what
  every route shares;
- completions.py, chat.py: the two generation endpoints and their stream state machines;
  tool_call_stream.py: a reply's tool calls as chat deltas, as it is generated;
- responses.py (+ responses_protocol.py): OpenAI's Responses API over chat's jobs;
  messages.py (+ messages_protocol.py): Anthropic's Messages API over chat's jobs;
- chat_page.py: the chat page at / (static/chat.html: one file, no network);
- request_params.py: request -> SamplingParams, the one validation path; inputs.py, usage.py,
  events.py, sse.py, logprobs.py, errors.py, guard.py, warmup.py, constraints.py, metrics.py.
"""


def name_process(name: str) -> None:
    """The name `ps -o comm`, `top` and /proc/PID/comm show for this process (Linux, 15 bytes):
    mistral-jax-engine's processes are told apart from other Python processes, and from each other."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass  # not Linux: names are only a convenience


def die_with_parent() -> None:
    """End this process when the one that started it ends, however it ends (Linux's
    PR_SET_PDEATHSIG): for helper processes (the tokenizer worker) that would otherwise wait on a
    queue for ever once a killed server can no longer tell them to stop."""
    import os
    import signal

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent ended before the line above ran
        os._exit(0)
