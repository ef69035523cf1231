"""Client conformance: the clients people point at an OpenAI-compatible server, run as their docs
run them against `python -m mistral_jax.serve` on the default model (SmolLM2-135M-Instruct, a
ChatML model whose tool calls are Hermes <tool_call> blocks):

- the `openai` SDK's tool loop, with the assistant turn sent back as the SDK's object (content
  null) and as a hand-built dict (no content key);
- LangChain (langchain-openai): a two-turn agent whose first call is forced, and
  `with_structured_output` in its three methods;
- instructor: TOOLS, TOOLS_STRICT and JSON_SCHEMA modes, and `create_partial` streaming;
- lm-evaluation-harness: `local-completions` loglikelihood and `local-chat-completions`
  generate_until with lm-eval's remote tokenizer (our /tokenizer_info, /tokenize, /detokenize),
  scored against lm-eval's own `hf` backend (transformers on the same GGUF file);
- forced tool calls (tool_choice required and named) on 20 ordinary schemas: each ends with
  finish_reason "tool_calls" and arguments that jsonschema accepts;
- the README's serving examples (curl, the openai snippet), extracted and run as written.

The judges are the clients' own parsers and validators, jsonschema and transformers, not our code.
The clients are pinned in pyproject.toml's `test` extra (instructor is installed by tests/run.sh).
One server serves the whole module; requests that can run together do (threads, lm-eval's
num_concurrent) so that the CPU runs batches, not one request at a time.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest

from mistral_jax.loading.default_model import default_model_path

from helpers.server import default_model_server

NAME = "SmolLM2-135M-Instruct"  # the default model's served name when no --model is given
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def server():
    """The default model, in float32 (the CPU default) as lm-eval's hf backend runs it; no warm-up:
    the few programs these clients need compile on first use."""
    s = default_model_server()
    try:
        yield s
    finally:
        code = s.stop()
    assert code == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


# ---- openai: the function-calling guide's loop ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("content", ["null", "absent"])
def test_openai_tool_loop(client, content):
    """OpenAI's guide: call with tools, `messages.append(resp.choices[0].message)`, one tool message
    per call, call again. The SDK's message object goes back with `"content": null`; hand-built
    history often leaves the key out. Both are what clients send, and both must be accepted."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER], tool_choice="required",
                                           max_tokens=64, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and len(choice.message.tool_calls) >= 1
    if content == "null":
        messages.append(choice.message)
    else:
        messages.append({"role": "assistant", "tool_calls": [c.model_dump() for c in choice.message.tool_calls]})
    for call in choice.message.tool_calls:
        city = json.loads(call.function.arguments)["city"]
        messages.append({"role": "tool", "tool_call_id": call.id,
                         "content": json.dumps({"city": city, "sky": "sunny", "celsius": 21})})
    raw = client.chat.completions.with_raw_response.create(model=NAME, messages=messages, tools=[WEATHER],
                                                           max_tokens=48, temperature=0)
    sent = json.loads(raw.http_request.content)["messages"][1]
    assert ("content" in sent and sent["content"] is None) if content == "null" else "content" not in sent
    final = raw.parse().choices[0]
    assert final.finish_reason == "stop" and final.message.content.strip() and not final.message.tool_calls


# ---- LangChain -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=NAME, temperature=0, max_tokens=48,
                      max_retries=0, timeout=300)


@pytest.mark.slow
def test_langchain_agent_forced_first_call(chat_model):
    """The agent loop LangChain's docs build by hand: a model with tools bound and the first call
    forced by name, the AIMessage and the tool's result (a ToolMessage) sent back, then the final
    answer in text, which uses the result."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"Sunny and 21 C in {city}."

    messages = [HumanMessage("What is the weather in Paris?")]
    ai = chat_model.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    assert ai.response_metadata["finish_reason"] == "tool_calls"
    assert [c["name"] for c in ai.tool_calls] == ["get_weather"] and ai.tool_calls[0]["args"].get("city")
    assert not ai.invalid_tool_calls
    messages += [ai, *(ToolMessage(get_weather.invoke(c["args"]), tool_call_id=c["id"]) for c in ai.tool_calls)]
    final = chat_model.invoke(messages)  # the answer step, tools unbound (the demo model writes code when it sees them)
    assert final.response_metadata["finish_reason"] == "stop" and not final.tool_calls
    assert "21" in final.content  # the tool's result reached the prompt


@pytest.mark.slow
@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_langchain_structured_output(chat_model, method):
    """`with_structured_output` in each of its methods returns the parsed object: a forced tool call,
    response_format json_schema, and json_object with the keys named in the prompt (json_mode
    constrains JSON, not the schema, so the prompt says which keys; LangChain's docs do the same)."""
    from pydantic import BaseModel

    class City(BaseModel):
        """A city and its country."""

        name: str
        country: str

    structured = chat_model.with_structured_output(City, method=method, include_raw=True)
    out = structured.invoke('Name a city in France. Reply as JSON: {"name": ..., "country": ...}')
    assert out["parsing_error"] is None, out
    assert isinstance(out["parsed"], City) and out["parsed"].name.strip(), out


# ---- instructor ------------------------------------------------------------------------------------


def _instructor(server, mode):
    import instructor

    return instructor.from_openai(openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                                timeout=300), mode=getattr(instructor.Mode, mode))


def _person_model():
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str
        age: int = Field(ge=0, le=150)

    return Person


PERSON_PROMPT = [{"role": "user", "content": "Ana is 31 years old. Extract the person."}]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["TOOLS", "TOOLS_STRICT", "JSON_SCHEMA"])
def test_instructor_modes(server, mode):
    """instructor validates the reply with the response model (no retries: a reply that does not
    validate fails the test)."""
    Person = _person_model()
    person = _instructor(server, mode).chat.completions.create(
        model=NAME, response_model=Person, messages=PERSON_PROMPT, max_retries=0, max_tokens=48, temperature=0)
    assert isinstance(person, Person) and person.name.strip()


@pytest.mark.slow
def test_instructor_create_partial(server):
    """create_partial streams the tool call's arguments as they are generated: partial objects
    with fields still missing, then the complete one."""
    Person = _person_model()
    parts = list(_instructor(server, "TOOLS").chat.completions.create_partial(
        model=NAME, response_model=Person, messages=PERSON_PROMPT, max_retries=0, max_tokens=48, temperature=0))
    assert len(parts) >= 2, parts
    assert any(p.name is None or p.age is None for p in parts[:-1]), parts  # streamed, not one final delta
    last = Person.model_validate(parts[-1].model_dump())
    assert last.name.strip()


# ---- lm-evaluation-harness -------------------------------------------------------------------------

MC = [("The capital of France is", ["Paris", "London", "Berlin", "Madrid"]),
      ("Water freezes at zero degrees", ["Celsius", "Kelvin", "Newton", "Pascal"]),
      ("The opposite of hot is", ["cold", "warm", "loud", "green"]),
      ("A week has seven", ["days", "hours", "years", "cats"]),
      ("The sun rises in the", ["east", "west", "north", "south"]),
      ("Two plus two equals", ["four", "five", "six", "seven"]),
      ("Cats often chase", ["mice", "planets", "clouds", "houses"]),
      ("The largest ocean on Earth is the", ["Pacific", "Atlantic", "Indian", "Arctic"]),
      ("Bees make", ["honey", "milk", "steel", "glass"]),
      ("The colour of a clear sky is", ["blue", "red", "purple", "brown"])]
GEN = ["What is the capital of France?", "What is 2 + 3?", "Name a colour of the rainbow.",
       "What animal says meow?", "What is the opposite of up?"]


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory):
    """Two tasks on local JSON Lines files (no network): 10 multiple-choice items (loglikelihood)
    and 5 questions answered greedily up to a newline (generate_until)."""
    import yaml

    root = tmp_path_factory.mktemp("lm_eval")
    with open(root / "mc.jsonl", "w") as f:
        f.writelines(json.dumps({"question": q, "choices": c, "answer": 0}) + "\n" for q, c in MC)
    with open(root / "gen.jsonl", "w") as f:
        f.writelines(json.dumps({"question": q, "answer": ""}) + "\n" for q in GEN)
    tasks = {
        "mc": {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
               "metric_list": [{"metric": "acc"}]},
        "gen": {"output_type": "generate_until", "doc_to_target": "{{answer}}",
                "metric_list": [{"metric": "exact_match"}],
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 16, "do_sample": False, "temperature": 0}},
    }
    for name, config in tasks.items():
        files = {"data_files": {"test": str(root / f"{name}.jsonl")}, "cache_dir": str(root / "hf")}
        config |= {"task": f"mj_{name}", "dataset_path": "json", "dataset_kwargs": files, "test_split": "test",
                   "doc_to_text": "{{question}}"}
        (root / f"mj_{name}.yaml").write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        from lm_eval.tasks import TaskManager

        yield TaskManager(include_path=str(root), include_defaults=False)


def _evaluate(lm_eval_tasks, model, model_args, task, chat):
    """(the task's metrics, each document's responses: one per request, a choice's (loglikelihood,
    is_greedy) or a generated text) from lm_eval.simple_evaluate."""
    import lm_eval

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=lm_eval_tasks,
                                  log_samples=True, apply_chat_template=chat)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task], [[r[0] for r in s["resps"]] for s in samples]


@pytest.fixture(scope="module")
def hf_reference(lm_eval_tasks):
    """lm-eval's `hf` backend (transformers, float32, CPU) on the default model's GGUF file: the
    scores our server must reproduce through lm-eval's API backends."""
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    gguf = Path(default_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")
    return {"mj_mc": _evaluate(lm_eval_tasks, lm, None, "mj_mc", chat=False),
            "mj_gen": _evaluate(lm_eval_tasks, lm, None, "mj_gen", chat=True)}


def _api_args(server, endpoint):
    return {"model": NAME, "base_url": f"{server.url}/v1/{endpoint}", "tokenizer_backend": "remote",
            "num_concurrent": 4, "max_retries": 1, "max_length": 2048, "timeout": 300}


@pytest.mark.slow
def test_lm_eval_loglikelihood_equals_hf(server, lm_eval_tasks, hf_reference):
    """local-completions sends token ids (tokenized by our /tokenize) with echo and logprobs and
    sums the continuation's logprobs: the same accuracy as transformers, and the same
    loglikelihood per choice within 1e-3 nats."""
    ours, our_resps = _evaluate(lm_eval_tasks, "local-completions", _api_args(server, "completions"), "mj_mc",
                                chat=False)
    ref, ref_resps = hf_reference["mj_mc"]
    assert ours["acc,none"] == ref["acc,none"]
    got = [[ll for (ll, _greedy) in choices] for choices in our_resps]
    want = [[ll for (ll, _greedy) in choices] for choices in ref_resps]
    assert len(got) == len(MC) and all(len(g) == 4 for g in got)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-3), (got, want)
    assert [[gr for (_ll, gr) in c] for c in our_resps] == [[gr for (_ll, gr) in c] for c in ref_resps]


@pytest.mark.slow
def test_lm_eval_generate_until_equals_hf(server, lm_eval_tasks, hf_reference):
    """local-chat-completions: the server applies the model's chat template, lm-eval stops at a
    newline and at the EOS string our /tokenizer_info names; greedy text equals transformers'."""
    _, ours = _evaluate(lm_eval_tasks, "local-chat-completions", _api_args(server, "chat/completions"), "mj_gen",
                        chat=True)
    _, ref = hf_reference["mj_gen"]
    assert ours == ref
    assert all(r[0].strip() for r in ours)  # a real answer, not empty strings on both sides


# ---- forced tool calls on ordinary schemas ----------------------------------------------------------

S = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}


def _obj(required, **properties):
    return {"type": "object", "properties": properties, "required": required}


# (name, description, parameters, the user's request): what tool definitions look like in the wild
# (nested objects, arrays, enums, optional fields; no additionalProperties, no string lengths).
FORCED = [
    ("get_weather", "Current weather in a city",
     _obj(["city"], city=S, unit={"type": "string", "enum": ["celsius", "fahrenheit"]}),
     "What is the weather in Paris, in celsius?"),
    ("add", "Add two integers", _obj(["a", "b"], a=INT, b=INT), "What is 12 plus 30?"),
    ("send_email", "Send an email", _obj(["to", "subject", "body"], to=S, subject=S, body=S,
                                          cc={"type": "array", "items": S}),
     "Email bob@example.com with the subject 'Lunch' and the body 'See you at noon'."),
    ("set_alarm", "Set an alarm", _obj(["hour", "minute"], hour={"type": "integer", "minimum": 0, "maximum": 23},
                                       minute={"type": "integer", "minimum": 0, "maximum": 59}, label=S),
     "Wake me at 7:30."),
    ("book_table", "Book a restaurant table",
     _obj(["restaurant", "people", "time"], restaurant=S, people={"type": "integer", "minimum": 1}, time=S, name=S),
     "Book a table for 2 at Chez Marie at 19:00 under the name Ana."),
    ("create_event", "Create a calendar event",
     _obj(["title", "start"], title=S, start=_obj(["date"], date=S, time=S),
          attendees={"type": "array", "items": _obj(["name"], name=S, email=S)}),
     "Create a meeting called Review on 2025-03-04 at 10:00 with Tom."),
    ("search_products", "Search the catalogue",
     _obj(["query"], query=S, max_price=NUM, in_stock={"type": "boolean"},
          sort={"type": "string", "enum": ["price", "rating", "newest"]}),
     "Find running shoes under 80 dollars, cheapest first."),
    ("translate", "Translate a text", _obj(["text", "target"], text=S,
                                           target={"type": "string", "enum": ["fr", "de", "es", "it"]}),
     "Translate 'good morning' into German."),
    ("convert_currency", "Convert an amount of money", _obj(["amount", "from", "to"], amount=NUM, **{"from": S}, to=S),
     "How much is 100 USD in EUR?"),
    ("get_stock_price", "Latest price of a stock", _obj(["ticker"], ticker=S), "What is Apple's stock price (AAPL)?"),
    ("create_todo", "Add items to a to-do list",
     _obj(["items"], items={"type": "array", "items": S, "minItems": 1},
          priority={"type": "string", "enum": ["low", "medium", "high"]}),
     "Add milk and eggs to my list, high priority."),
    ("order_pizza", "Order a pizza",
     _obj(["size", "address"], size={"type": "string", "enum": ["small", "medium", "large"]},
          toppings={"type": "array", "items": {"type": "string", "enum": ["cheese", "ham", "mushrooms", "olives"]}},
          address=_obj(["street", "city"], street=S, city=S)),
     "A large pizza with ham and olives to 5 Main Street, Springfield."),
    ("rate_movie", "Rate a movie", _obj(["title", "stars"], title=S, stars={"type": "integer", "minimum": 1,
                                                                             "maximum": 5}, comment=S),
     "Give Inception 5 stars, with the comment 'Great'."),
    ("get_directions", "Directions between two places",
     _obj(["origin", "destination"], origin=S, destination=S,
          mode={"type": "string", "enum": ["driving", "walking", "transit"]}),
     "How do I walk from the station to the museum?"),
    ("update_profile", "Update a user profile",
     _obj(["user"], user=_obj(["name"], name=S, age=INT, tags={"type": "array", "items": S}),
          notify={"type": "boolean"}),
     "Set my name to Lee and my age to 30."),
    ("play_music", "Play music", _obj([], artist=S, song=S, volume={"type": "integer", "minimum": 0, "maximum": 100}),
     "Play something by Queen."),
    ("log_expense", "Record an expense",
     _obj(["amount", "category"], amount={"type": "number", "minimum": 0},
          category={"type": "string", "enum": ["food", "travel", "rent", "other"]}, note=S),
     "I spent 12.50 on lunch."),
    ("lookup_word", "Look a word up in the dictionary", _obj(["word"], word=S, language=S),
     "What does 'serendipity' mean?"),
    ("schedule_posts", "Schedule social media posts",
     _obj(["posts"], posts={"type": "array", "minItems": 1, "maxItems": 3, "items": _obj(
         ["text", "platform"], text=S, platform={"type": "string", "enum": ["x", "mastodon", "linkedin"]})}),
     "Post 'We are hiring' on linkedin."),
    ("set_thermostat", "Set the thermostat",
     _obj(["temperature"], room=S, temperature=NUM, mode={"type": "string", "enum": ["heat", "cool", "auto"]}),
     "Heat the bedroom to 21 degrees."),
]


@pytest.fixture(scope="module")
def forced_calls(client):
    """Every (schema, tool_choice) request at once, through the openai client: {(name, how): choice}.
    `required` with parallel_tool_calls false (exactly one call, as a named choice makes)."""

    def ask(job):
        (name, description, parameters, request), how = job
        tool = {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}
        extra = ({"tool_choice": "required", "parallel_tool_calls": False} if how == "required"
                 else {"tool_choice": {"type": "function", "function": {"name": name}}})
        out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": request}],
                                             tools=[tool], max_tokens=160, temperature=0, **extra)
        return (name, how), out.choices[0]

    jobs = [(tool, how) for how in ("required", "named") for tool in FORCED]
    with ThreadPoolExecutor(len(jobs)) as pool:
        return dict(pool.map(ask, jobs))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["required", "named"])
@pytest.mark.parametrize("name, parameters", [(t[0], t[2]) for t in FORCED], ids=[t[0] for t in FORCED])
def test_forced_call_is_valid(forced_calls, name, parameters, how):
    """A forced call is one call of the tool, its arguments valid for the tool's schema, and the
    reply says so: finish_reason "tool_calls", no text."""
    choice = forced_calls[name, how]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), parameters)
    assert not choice.message.content


# ---- the README's serving examples -----------------------------------------------------------------


def readme_serving_examples() -> dict[str, str]:
    """The code blocks of the README's serving section: {"serve": ..., "curl": ..., "python": ...}."""
    text = README.read_text()
    section = text[text.index("## Serving over HTTP"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"^```(bash|python)\n(.*?)^```", section, re.S | re.M)
    found = {"serve": next(b for lang, b in blocks if lang == "bash" and "mistral_jax.serve" in b),
             "curl": next(b for lang, b in blocks if lang == "bash" and b.startswith("curl ")),
             "python": next(b for lang, b in blocks if lang == "python" and "OpenAI(" in b)}
    return found


def test_readme_serving_examples_are_complete():
    """What a reader copies must run as is: the serve command without --model serves the default
    model on port 8000; both clients bound the reply (max_tokens) and ask for greedy decoding;
    the Python one says what to install and compiles."""
    ex = readme_serving_examples()
    assert ex["serve"].splitlines()[0].split("#")[0].split() == ["python", "-m", "mistral_jax.serve", "--port",
                                                                 "8000"]
    assert '"max_tokens"' in ex["curl"] and '"temperature": 0' in ex["curl"] and "127.0.0.1:8000" in ex["curl"]
    assert "pip install openai" in ex["python"] and "max_tokens=" in ex["python"] and "temperature=0" in ex["python"]
    compile(ex["python"], "README.md", "exec")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
def test_readme_curl_example_runs(server):
    block = readme_serving_examples()["curl"].replace("http://127.0.0.1:8000", server.url)
    out = subprocess.run(["bash", "-c", block], capture_output=True, text=True, timeout=120, check=True)
    reply = json.loads(out.stdout)["choices"][0]
    assert reply["message"]["content"].strip() and reply["finish_reason"] in ("stop", "length")


@pytest.mark.slow
def test_readme_python_example_runs(server):
    code = readme_serving_examples()["python"].replace("http://127.0.0.1:8000", server.url)
    assert code != readme_serving_examples()["python"]  # the base URL was found and replaced
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env=dict(os.environ, OPENAI_API_KEY=""))
    assert out.stdout.strip(), out.stderr
