"""Tool calls streamed as they are generated, and the finish_reason that tells how a reply ended.

Replies are real tokenizers' ids: Mistral's as mistral-common encodes an assistant message with
tool calls (every prompt format), Hermes' as the default model's GGUF tokenizer encodes
<tool_call> blocks (SmolLM2's template writes no tool calls of its own). The engine's own output
processing (OutputState: detokenization, stop strings, max_tokens) turns them into StepEvents,
which go through the server's ToolCallDeltas one by one; the same reply read whole is the
non-streamed message (tool_call_message). Each test checks that the two agree: the content
deltas add up to the content, and each call's argument fragments to its arguments. Last, the
same through the server's app in-process, talked to with the openai client, over an engine that
writes a scripted reply (a server subprocess with a model would not write calls of its own)."""

import json
from pathlib import Path

import numpy as np
import openai
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool
from mistral_common.protocol.instruct.tool_calls import ToolCall as MCToolCall
from starlette.testclient import TestClient

from mistral_jax.engine.outputs import OutputState
from mistral_jax.engine.request_limits import RequestLimits
from mistral_jax.entrypoints.server.app import create_app
from mistral_jax.entrypoints.server.engine_process import EngineInfo, Stats
from mistral_jax.entrypoints.server.tool_call_stream import ToolCallDeltas, finish_reason, tool_call_message
from mistral_jax.loading.default_model import default_model_path
from mistral_jax.sample.sampling import SamplingParams
from mistral_jax.tokenizer import Tokenizer, load_tokenizer

from helpers.tokenizer_files import TIME_TOOL, WEATHER_TOOL

CONTENT = "Let me see."
CALLS = [("abcDEF123", "get_weather", {"city": "São Paulo", "unit": "C"}),
         ("xyz987QRS", "get_time", {"tz": "America/Sao_Paulo"})]
MISTRAL = ["spm_v3", "spm_v7", "tekken_v3", "tekken_v7", "tekken_v11", "tekken_v13"]


@pytest.fixture(scope="module")
def hermes() -> Tokenizer:
    """The default model's GGUF tokenizer: a ChatML model, Hermes tool calls."""
    return load_tokenizer(Path(default_model_path()))


def mistral_reply(pair, content: str = CONTENT, calls=CALLS) -> list[int]:
    """The assistant turn as the model generates it, up to </s>: mistral-common's encoding of a
    message with these calls (v3 takes no content beside calls: then ours is put before them)."""
    ours, ref = pair
    mc_calls = [MCToolCall(id=i, function=FunctionCall(name=n, arguments=json.dumps(a))) for i, n, a in calls]
    tools = [Tool(function=Function(**t["function"])) for t in (WEATHER_TOOL, TIME_TOOL)]

    def turn(text):
        request = ChatCompletionRequest(
            messages=[UserMessage(content="Weather?"), AssistantMessage(content=text, tool_calls=mc_calls)]
            + [ToolMessage(tool_call_id=i, content="ok") for i, _, _ in calls], tools=tools)
        ids = ref.encode_chat_completion(request).tokens
        start = len(ids) - ids[::-1].index(ours.special_id("[/INST]"))
        return ids[start : ids.index(ours.eos_id, start) + 1]

    try:
        return turn(content or None)
    except Exception:  # mistral-common before v7: content or calls, not both
        return ours.encode(content, add_bos=False) + turn(None)


def hermes_reply(tok: Tokenizer, content: str = CONTENT, calls=CALLS) -> list[int]:
    blocks = "\n".join(f'<tool_call>\n{json.dumps({"name": n, "arguments": a}, ensure_ascii=False)}\n</tool_call>'
                       for _, n, a in calls)
    return tok.encode(f"{content}\n{blocks}", add_bos=False) + [tok.eos_id]


# ---- the engine's events through the stream, and the same reply whole --------------------------------


class Run:
    """One reply streamed: every chunk (delta, finish_reason, logprobs) with the number of the
    event that sent it, and the reply as the engine collected it (ids, text, finish_reason)."""

    def __init__(self, tok: Tokenizer, ids: list[int], max_tokens: int | None = None, stop=None, logprobs=False):
        limit = len(ids) + 1 if max_tokens is None else max_tokens
        state = OutputState("r", 0, SamplingParams(max_tokens=limit, stop=stop), tok)
        deltas = ToolCallDeltas(tok)
        self.chunks: list[tuple[int, dict, str | None, dict | None]] = []
        self.ids, self.text, self.texts, self.finish = [], "", [], None
        for k, t in enumerate(ids):
            event = state.add(t, None)
            self.ids.append(t)
            self.text += event.text
            self.texts.append(self.text)
            self.chunks += [(k, *c) for c in deltas.step(event, {"token": k} if logprobs else None)]
            if event.finished:
                self.finish = event.finish_reason
                break
        self.whole = tool_call_message(tok, self.ids, self.text, self.finish)

    @property
    def content(self) -> str:
        return "".join(d.get("content", "") for _, d, _, _ in self.chunks)

    def calls(self) -> list[dict]:
        """The streamed calls as a client adds them up, in index order; each also counts its
        argument fragments and checks that its id and name came first."""
        calls: dict[int, dict] = {}
        for _, d, _, _ in self.chunks:
            for tc in d.get("tool_calls", []):
                if "id" in tc:
                    assert tc["index"] not in calls and tc["type"] == "function" and tc["function"]["arguments"] == ""
                    calls[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": "",
                                          "fragments": 0}
                else:
                    assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                    call = calls[tc["index"]]  # its id and name came first
                    call["arguments"] += tc["function"]["arguments"]
                    call["fragments"] += 1
        assert sorted(calls) == list(range(len(calls)))
        return [calls[k] for k in sorted(calls)]

    @property
    def finish_reasons(self) -> list[str | None]:
        return [f for _, _, f, _ in self.chunks if f is not None]


def check_agrees(run: Run) -> None:
    """The streamed reply adds up to the whole one: content, calls (name and arguments text), and
    finish_reason, which only the last chunk carries."""
    assert run.finish_reasons == [run.whole[1] if run.whole else run.finish]
    assert run.chunks[-1][2] is not None
    message, _ = run.whole
    assert run.content == (message["content"] or "")
    whole_calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]
    streamed = [(c["name"], c["arguments"]) for c in run.calls()]
    assert streamed[: len(whole_calls)] == whole_calls  # the whole message has the calls that completed


def check_calls(run: Run, calls=CALLS, content: str = CONTENT) -> None:
    """A reply with all its calls: streamed as they came and equal to the whole message."""
    check_agrees(run)
    message, finish = run.whole
    assert finish == "tool_calls" and message["content"] == content and run.content == content
    got = run.calls()
    assert [(c["name"], json.loads(c["arguments"])) for c in got] == [(n, a) for _, n, a in calls]
    assert [c["id"] for c in message["tool_calls"]] != [] and all(len(c["id"]) == 9 for c in got)
    assert got[0]["fragments"] >= 2  # the arguments streamed, not at the end
    first_call = min(k for k, d, _, _ in run.chunks if "tool_calls" in d)
    assert all(k <= first_call for k, d, _, _ in run.chunks if d.get("content"))  # content came before the calls
    # Each argument fragment went out with the event of its token, not later.
    args_events = [k for k, d, _, _ in run.chunks if "tool_calls" in d and "id" not in d["tool_calls"][0]]
    assert len(set(args_events)) == len(args_events)


# ---- Mistral --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MISTRAL)
def test_mistral_calls_stream_as_generated(mistral_pairs, name):
    ours = mistral_pairs[name][0]
    run = Run(ours, mistral_reply(mistral_pairs[name]))
    check_calls(run)
    if name == "tekken_v11":  # [CALL_ID] comes before the arguments: the model's ids go out
        assert [c["id"] for c in run.calls()] == [i for i, _, _ in CALLS]
        assert [c["id"] for c in run.whole[0]["tool_calls"]] == [i for i, _, _ in CALLS]


@pytest.mark.parametrize("name", MISTRAL)
def test_mistral_reply_cut_off_by_max_tokens(mistral_pairs, name):
    """Cut anywhere after [TOOL_CALLS]: finish_reason "length", the calls that completed (streamed
    and whole), and none of the calls' text as content."""
    ours = mistral_pairs[name][0]
    ids = mistral_reply(mistral_pairs[name])
    first = ids.index(ours.special_id("[TOOL_CALLS]"))
    completed_seen = completed_at_cuts(ours, ids, range(first + 1, len(ids)))
    # cut in the first call, in the second with the first whole, and just before </s>
    assert completed_seen == {0, 1, 2}


def test_content_held_by_a_stop_string_still_comes_before_the_calls(mistral_pairs):
    """The engine holds back text that could begin a stop string; at [TOOL_CALLS] the content it
    still holds goes out before the calls."""
    ours = mistral_pairs["tekken_v11"][0]
    run = Run(ours, mistral_reply(mistral_pairs["tekken_v11"], content="Let me see..."), stop=["....."])
    check_calls(run, content="Let me see...")


def test_malformed_mistral_calls(mistral_pairs):
    ours = mistral_pairs["tekken_v7"][0]
    tool_calls = ours.special_id("[TOOL_CALLS]")
    # No call began: the reply is text, as the engine wrote it.
    ids = ours.encode(CONTENT, add_bos=False) + [tool_calls] + ours.encode("[{oops", add_bos=False) + [ours.eos_id]
    run = Run(ours, ids)
    check_agrees(run)
    assert run.whole == ({"role": "assistant", "content": CONTENT + "[{oops"}, "stop")
    # A call began, then broke: not a call, not text; the model stopped.
    ids = (ours.encode(CONTENT, add_bos=False) + [tool_calls]
           + ours.encode('[{"name": "get_time", "arguments": {"tz": oops}}]', add_bos=False) + [ours.eos_id])
    run = Run(ours, ids)
    check_agrees(run)
    assert run.whole == ({"role": "assistant", "content": CONTENT}, "stop") and run.calls()[0]["name"] == "get_time"


def test_every_tokens_logprobs_go_out(mistral_pairs):
    ours = mistral_pairs["tekken_v11"][0]
    run = Run(ours, mistral_reply(mistral_pairs["tekken_v11"]), logprobs=True)
    sent = [lp["token"] for _, _, _, lp in run.chunks if lp is not None]
    assert sent == list(range(len(run.ids)))


# ---- Hermes ----------------------------------------------------------------------------------------


def test_hermes_calls_stream_as_generated(hermes):
    run = Run(hermes, hermes_reply(hermes))
    check_calls(run)


def test_hermes_holds_back_only_what_could_begin_a_call(hermes):
    """Text streams as it comes except a tail that could still be "<tool_call>" (with the
    whitespace before it); one that turns out not to be goes out as text."""
    text = "Write <tool_ or <tool> and <tool_call without calls.\n"
    run = Run(hermes, hermes.encode(text, add_bos=False) + [hermes.eos_id])
    check_agrees(run)
    assert run.whole == ({"role": "assistant", "content": text}, "stop")
    sent = ""
    for k, so_far in enumerate(run.texts[:-1]):
        sent += "".join(d.get("content", "") for e, d, _, _ in run.chunks if e == k)
        assert so_far.startswith(sent)
        held = so_far[len(sent):].lstrip()
        assert len(held) < len("<tool_call>") and "<tool_call>".startswith(held), (so_far, sent)


def test_hermes_reply_cut_off_by_max_tokens(hermes):
    ids = hermes_reply(hermes)
    marker_done = next(k for k in range(len(ids)) if "<tool_call>" in hermes.decode(ids[:k]))
    completed_seen = completed_at_cuts(hermes, ids, range(marker_done, len(ids)))
    assert completed_seen == {0, 1, 2}  # 2: cut before "</tool_call>" of a whole second call


def test_malformed_hermes_block_is_text(hermes):
    text = "Sure. <tool_call>{oops}</tool_call>"
    run = Run(hermes, hermes.encode(text, add_bos=False) + [hermes.eos_id])
    check_agrees(run)
    assert run.whole == ({"role": "assistant", "content": text}, "stop")


# ---- through the server ---------------------------------------------------------------------------


class ScriptedEngine:
    """The bridge's interface (EngineClient) over one scripted reply: whatever the prompt, the
    model writes `reply`, and the engine's own output processing (OutputState) makes its events
    under the request's checked sampling params (max_tokens, stop), as the engine process does."""

    def __init__(self, tokenizer: Tokenizer, reply: list[int]):
        self.tokenizer, self.reply = tokenizer, reply
        self.info = EngineInfo(model_path="scripted", tokenizer_source="unused", max_model_len=4096,
                               limits=RequestLimits(tokenizer.vocab_size, 4096, 16, 1024), speculative=False)
        self.stats, self.observers, self.fault = Stats(), [], None

    def check(self, prompt_ids, params, where="the prompt"):
        return self.info.limits.check(prompt_ids, params, where, np.random.default_rng(0))

    def submit(self, prompt_ids, params, arrived=None):
        state, events = OutputState("r", 0, params, self.tokenizer), []
        for t in self.reply:
            events.append(state.add(t, None))
            if events[-1].finished:
                break
        return _Events(events)

    def attach(self, loop):
        pass

    def shutdown(self, timeout=5.0):
        pass


class _Events:
    def __init__(self, events):
        self.events = events

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.events:
            raise StopAsyncIteration
        return self.events.pop(0)

    def close(self):
        pass


@pytest.mark.parametrize("name", ["spm_v3", "tekken_v11", "hermes"])
def test_through_the_server(mistral_pairs, hermes, name):
    """Whole and streamed, all calls and cut off in the second: the openai client gets the same."""
    tok, reply = ((hermes, hermes_reply(hermes)) if name == "hermes"
                  else (mistral_pairs[name][0], mistral_reply(mistral_pairs[name])))
    app = create_app(ScriptedEngine(tok, reply), tok, "scripted")  # no `with`: no lifespan, no warm-up
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", max_retries=0,
                           http_client=TestClient(app))
    request = {"model": "scripted", "messages": [{"role": "user", "content": "Weather?"}],
               "tools": [WEATHER_TOOL, TIME_TOOL]}
    cut = next(k for k in range(1, len(reply)) if len(Run(tok, reply, max_tokens=k).calls()) == 2) + 2
    for max_tokens, finish, n_calls in ((None, "tool_calls", 2), (cut, "length", 1)):
        whole = client.chat.completions.create(**request, max_tokens=max_tokens).choices[0]
        assert whole.finish_reason == finish and whole.message.content == CONTENT
        calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        assert [(n, json.loads(a)) for n, a in calls] == [(n, a) for _, n, a in CALLS[:n_calls]]
        content, streamed, fragments, reasons = "", {}, 0, []
        for chunk in client.chat.completions.create(**request, max_tokens=max_tokens, stream=True):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                c = streamed.setdefault(tc.index, {"name": tc.function.name, "arguments": ""})
                c["arguments"] += tc.function.arguments or ""
                fragments += bool(tc.function.arguments)
            reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
        assert reasons == [finish] and content == CONTENT and fragments >= 4
        assert [(c["name"], c["arguments"]) for c in streamed.values()][:n_calls] == calls


# ---- finish_reason ---------------------------------------------------------------------------------


def test_finish_reason():
    assert finish_reason("stop", begun=0, completed=0) == "stop"  # no call: the engine's
    assert finish_reason("length", begun=0, completed=0) == "length"
    assert finish_reason("stop", begun=2, completed=2) == "tool_calls"
    assert finish_reason("length", begun=2, completed=1) == "length"  # cut off in a call
    assert finish_reason("length", begun=1, completed=1) == "length"  # cut off: more calls may have followed
    assert finish_reason("stop", begun=1, completed=0) == "stop"  # a call began and broke


def completed_at_cuts(tokenizer, ids: list[int], cuts) -> set[int]:
    """For each cut (max_tokens = cut: the reply ends after ids[:cut]): finish "length" in both
    paths, which agree, the content exactly the text before the calls, and the completed calls a
    prefix of CALLS. Returns how many calls had completed, per cut."""
    completed_seen = set()
    for cut in cuts:
        run = Run(tokenizer, ids, max_tokens=cut)
        assert run.finish == "length"
        check_agrees(run)
        message, finish = run.whole
        assert finish == "length" and run.content == CONTENT and message["content"] == CONTENT, cut
        completed = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                     for c in message.get("tool_calls", [])]
        assert completed == [(n, a) for _, n, a in CALLS[: len(completed)]]
        completed_seen.add(len(completed))
    return completed_seen
