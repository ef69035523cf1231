"""Tokenizers behind one interface, and streaming detokenization.

Two implementations:
- `MistralTokenizer` wraps mistral-common, the source of truth for Mistral prompts (SentencePiece v1-v7
  and Tekken): we never write Mistral chat templates by hand.
- `HFTokenizer` (alias `GGUFTokenizer`) is a `tokenizers.Tokenizer` plus the model's jinja chat template,
  read either from a GGUF file's metadata or from a Hugging Face `tokenizer.json` directory.

`load_tokenizer(path)` picks one; `StreamDecoder` turns generated ids into text one token at a time.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import string
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable



@dataclass
class ToolCall:
    id: str | None
    name: str
    arguments: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's shape; the arguments travel as a JSON string there."""
        return {"id": self.id or new_tool_call_id(), "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def new_tool_call_id() -> str:
    # mistral-common only accepts 9 ASCII letters/digits as the id of a call echoed back in a later turn.
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def openai_roles(messages: list[dict]) -> list[dict]:
    """OpenAI's `developer` role is its newer name for `system` (what the templates know)."""
    return [dict(m, role="system") if m.get("role") == "developer" else m for m in messages]


class Tokenizer:
    """What the engine needs from a tokenizer."""

    bos_id: int
    eos_id: int
    vocab_size: int
    stop_token_ids: frozenset[int]  # ids that end generation: eos, plus e.g. <|im_end|> for ChatML models

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Prompt ids for OpenAI-shaped messages (and tools), ending where the assistant's reply starts."""
        raise NotImplementedError

    def parse_tool_calls(self, token_ids: list[int]) -> tuple[str, list[ToolCall]]:
        """Split generated ids into content text and tool calls ([] when there are none)."""
        raise NotImplementedError

    def tool_call_started(self, token_ids: list[int]) -> bool | None:
        """Whether these generated ids begin tool calls (text before them can stream as it
        comes); None: this format only tells at the end (hold the reply)."""
        return None

    def tool_call_grammar(self, tools: list[dict], one: bool, json_style: dict) -> str:
        """A Lark grammar (llguidance's dialect) for a reply that is only tool calls, in this
        model's format, with each call's arguments under its function's JSON schema.
        tools: OpenAI function definitions; one: exactly one call (a named tool_choice)."""
        raise NotImplementedError


# ---- Mistral (mistral-common) --------------------------------------------------------------------


class MistralTokenizer(Tokenizer):
    """mistral-common's tokenizer: tokenizer.model.v* (SentencePiece) or tekken.json."""

    def __init__(self, path: str | Path):
        # Imported here so the engine runs where only GGUF/HF tokenizers are needed.
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MistralCommonTokenizer

        self.mistral = MistralCommonTokenizer.from_file(str(path))
        self.raw = self.mistral.instruct_tokenizer.tokenizer
        self.bos_id, self.eos_id, self.vocab_size = self.raw.bos_id, self.raw.eos_id, self.raw.n_words
        self.stop_token_ids = frozenset({self.eos_id})
        self._special_ids: set[int] = set(self.raw.special_ids)
        self._tool_calls_id = self._special("[TOOL_CALLS]")
        self._args_id = self._special("[ARGS]")
        self._call_id_id = self._special("[CALL_ID]")

    def _special(self, token: str) -> int | None:
        try:
            tid = self.raw.get_special_token(token)
        except ValueError:  # Tekken: unknown token
            return None
        return tid if tid in self._special_ids else None  # SentencePiece maps unknown pieces to <unk>

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self.raw.encode(text, bos=add_bos, eos=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

            return self.raw.decode(list(ids), special_token_policy=SpecialTokenPolicy.IGNORE)
        # SentencePiece's KEEP policy returns raw pieces ("▁Hello"), so decode the text between special
        # tokens ourselves and put the special tokens' names in between.
        parts, run = [], []
        for t in ids:
            if t in self._special_ids:
                parts += [self.raw.decode(run), self.raw.id_to_piece(t)]
                run = []
            else:
                run.append(t)
        return "".join(parts) + self.raw.decode(run)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        # A conversation ending with an assistant message is continued (mistral-common's `prefix`).
        cont = bool(messages) and messages[-1].get("role") == "assistant"
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        request = ChatCompletionRequest.from_openai(openai_roles(messages), tools=tools, continue_final_message=cont)
        return self.mistral.encode_chat_completion(request).tokens

    def parse_tool_calls(self, token_ids: list[int]) -> tuple[str, list[ToolCall]]:
        ids = list(token_ids)
        while ids and ids[-1] in self.stop_token_ids:  # the engine reports the stop token too
            ids.pop()
        if self._tool_calls_id is None or self._tool_calls_id not in ids:
            return self.decode(ids), []
        start = ids.index(self._tool_calls_id)
        segments, calls = _split_at(ids[start + 1:], self._tool_calls_id), []
        try:
            for seg in segments:
                calls += self._parse_segment(seg)
        except (ValueError, KeyError, TypeError, AttributeError):  # malformed output: give it back as text
            return self.decode(ids), []
        return self.decode(ids[:start]), calls

    def tool_call_started(self, token_ids: list[int]) -> bool | None:
        return self._tool_calls_id is not None and self._tool_calls_id in token_ids

    def tool_call_grammar(self, tools: list[dict], one: bool, json_style: dict) -> str:
        if self._tool_calls_id is None:
            raise ValueError("this tokenizer has no [TOOL_CALLS] token: the model cannot call tools")
        if self._args_id is not None:  # v11+: [TOOL_CALLS]name[ARGS]{arguments}, repeated
            calls = [f'"{_lark_str(name)}" <[{self._args_id}]> %json {json.dumps(dict(params, **{"x-guidance": json_style}))}'
                     for name, params in _functions(tools)]
            call = " | ".join(f"({c})" for c in calls)
            return f"start: <[{self._tool_calls_id}]> ({call}){'' if one else '+'}"
        # v2-v7: [TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "abcDEF123"}, ...]
        schemas = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params,
                                                     "id": {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}},
                    "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": json_style}
                   for name, params in _functions(tools)]
        call = " | ".join(f"%json {json.dumps(sc)}" for sc in schemas)
        more = "" if one else ' (", " call)*'
        return f'start: <[{self._tool_calls_id}]> "[" call{more} "]"\ncall: {call}'

    def _parse_segment(self, seg: list[int]) -> list[ToolCall]:
        """One [TOOL_CALLS] segment. v2-v7 write a JSON list of {"name", "arguments"[, "id"]}; v11+
        write `name[ARGS]{json}`, or `name[CALL_ID]id[ARGS]{json}` (mistral-common's formats)."""
        if self._args_id is not None and self._args_id in seg:
            cut = seg.index(self._args_id)
            head, args = seg[:cut], json.loads(self.decode(seg[cut + 1:]))
            call_id = None
            if self._call_id_id is not None and self._call_id_id in head:
                c = head.index(self._call_id_id)
                head, call_id = head[:c], self.decode(head[c + 1:]).strip()
            return [_tool_call(call_id, self.decode(head).strip(), args)]
        items = json.loads(self.decode(seg))
        items = items if isinstance(items, list) else [items]
        return [_tool_call(it.get("id"), it["name"], it.get("arguments", {})) for it in items]


def _functions(tools: list[dict]) -> list[tuple[str, dict]]:
    """(name, arguments schema) of each OpenAI tool; no schema: any object."""
    return [(t["function"]["name"], t["function"].get("parameters") or {"type": "object"}) for t in tools]


def _lark_str(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def _split_at(ids: list[int], sep: int) -> list[list[int]]:
    out: list[list[int]] = [[]]
    for t in ids:
        if t == sep:
            out.append([])
        else:
            out[-1].append(t)
    return out


def _tool_call(call_id: Any, name: Any, arguments: Any) -> ToolCall:
    """Validate one parsed call; raises ValueError/TypeError so callers fall back to plain text."""
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = json.loads(arguments)
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        raise ValueError(f"not a tool call: name={name!r} arguments={arguments!r}")
    valid_id = isinstance(call_id, str) and call_id not in ("", "null")
    return ToolCall(call_id if valid_id else new_tool_call_id(), name, arguments)


# ---- tokenizers + jinja (GGUF files, Hugging Face tokenizer.json) --------------------------------

# Pre-tokenizer split regexes of byte-level GGUF vocabularies, by `tokenizer.ggml.pre` (llama.cpp's
# names). Anything else gets GPT-2's split, which is what SmolLM2 ('smollm') uses: llama.cpp also splits
# digits one by one there, but SmolLM2's merges never join digits, so the result is the same.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                "tekken": _TEKKEN_SPLIT}

_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # llama.cpp token types


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with the model's own jinja chat template (GGUF or tokenizer.json)."""

    def __init__(self, tok: Any, bos_id: int | None, eos_id: int, chat_template: str | None,
                 extra_stop_ids: Iterable[int] = ()):
        self.tok = tok
        self.bos_id = bos_id if bos_id is not None else -1
        self.eos_id = eos_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # Whether the model wants BOS on plain text: its post-processor adds it (GGUF: tokenizer.ggml.add_bos_token).
        self.add_bos = bos_id is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
        self.bos_token = tok.id_to_token(bos_id) if bos_id is not None else ""
        self.eos_token = tok.id_to_token(eos_id)
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None
        self.stop_token_ids = frozenset({eos_id, *extra_stop_ids, *self._turn_end_ids()})

    # -- construction --

    @classmethod
    def from_gguf(cls, path: str | Path) -> "HFTokenizer":
        from mistral_jax.loading.checkpoint.gguf_file import open_gguf

        meta = open_gguf(path).metadata  # the weights' loader parsed it already: shared

        def field(key: str, default: Any = None) -> Any:
            return meta.get(key, default)

        kind = field("tokenizer.ggml.model")
        tokens: list[str] = field("tokenizer.ggml.tokens")
        types: list[int] = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            tok = _byte_level_bpe(tokens, field("tokenizer.ggml.merges"), field("tokenizer.ggml.pre"))
        elif kind == "llama":
            tok = _sentencepiece_bpe(tokens, field("tokenizer.ggml.scores"), field("tokenizer.ggml.unknown_token_id"),
                                     field("tokenizer.ggml.add_space_prefix", True))
        else:
            raise TokenizerError(f"{path}: unsupported GGUF tokenizer {kind!r} (supported: 'gpt2', 'llama'). "
                                 f"Fix: pass another with {_PASS_ONE}")
        from tokenizers import AddedToken

        # Control tokens (<|im_start|>) must be matched whole in text and skipped when decoding;
        # user-defined ones (<think>) are matched whole but are ordinary text.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _GGUF_USER_DEFINED])
        bos_id, eos_id = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
        # llama.cpp's default: SentencePiece vocabularies get BOS unless the file says otherwise.
        add_bos = bool(field("tokenizer.ggml.add_bos_token", kind == "llama")) and bos_id is not None
        extra = {field(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")} - {None}
        _set_bos_processor(tok, bos_id, add_bos)
        return cls(tok, bos_id, eos_id, field("tokenizer.chat_template"), extra)

    @classmethod
    def from_hf_dir(cls, folder: str | Path) -> "HFTokenizer":
        from tokenizers import Tokenizer as HFRawTokenizer

        folder = Path(folder)
        tok = HFRawTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg = _read_json(folder / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():  # newer repos keep it in its own file
            template = (folder / "chat_template.jinja").read_text()

        def token_id(name: str) -> int | None:
            t = cfg.get(name)
            t = t.get("content") if isinstance(t, dict) else t
            return tok.token_to_id(t) if t else None

        bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
        gen_eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        extra = set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        if eos_id is None:
            if not extra:
                raise TokenizerError(f"{folder}: no eos_token in tokenizer_config.json or generation_config.json. "
                                     "Fix: add the model's eos_token to tokenizer_config.json")
            eos_id = min(extra)
        if "add_bos_token" in cfg:  # otherwise tokenizer.json's own post-processor decides, as in transformers
            _set_bos_processor(tok, bos_id, bool(cfg["add_bos_token"]))
        return cls(tok, bos_id, eos_id, template, extra)

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json, which
        `from_hf_dir` reads back into the same tokenizer (how a GGUF file's tokenizer travels
        to a converted checkpoint without the file's weights)."""
        folder = Path(folder)
        self.tok.save(str(folder / "tokenizer.json"))
        cfg = {"bos_token": self.bos_token or None, "eos_token": self.eos_token, "add_bos_token": self.add_bos,
               "chat_template": self.chat_template}
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        stops = sorted(self.stop_token_ids - self._turn_end_ids())  # the template's turn end is found again
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}) + "\n")

    # -- interface --

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # add_bos=True means "as the model expects": the post-processor adds BOS only if the model wants it.
        return self.tok.encode(text, add_special_tokens=add_bos).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this tokenizer has no chat template: pass token ids or plain text prompts")
        # Templates concatenate content as a string: an assistant turn that only called tools comes
        # back from OpenAI's clients with content null or absent, which is no text.
        messages = [dict(m, content="") if m.get("content") is None else m for m in openai_roles(messages)]
        return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = self.render_chat(messages, tools)
        # The template writes its own special tokens; add BOS only if the model wants it and it is missing.
        ids = self.encode(text, add_bos=False)
        if self.add_bos and self.bos_token and not text.startswith(self.bos_token):
            ids = [self.bos_id, *ids]
        return ids

    def parse_tool_calls(self, token_ids: list[int]) -> tuple[str, list[ToolCall]]:
        """Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (the common
        convention of ChatML models, SmolLM2 included; a block may also hold a JSON list)."""
        text = self.decode([t for t in token_ids if t not in self.stop_token_ids])
        blocks = re.findall(r"<tool_call>(.*?)</tool_call>", text, flags=re.S)
        if not blocks:
            return text, []
        try:
            calls = []
            for block in blocks:
                items = json.loads(block)
                for it in items if isinstance(items, list) else [items]:
                    calls.append(_tool_call(it.get("id"), it["name"], it.get("arguments", {})))
        except (ValueError, KeyError, TypeError, AttributeError):
            return text, []
        return re.sub(r"<tool_call>.*?</tool_call>", "", text, flags=re.S).strip(), calls

    def tool_call_grammar(self, tools: list[dict], one: bool, json_style: dict) -> str:
        # The Hermes blocks parse_tool_calls reads: <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>
        schemas = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                    "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": json_style}
                   for name, params in _functions(tools)]
        call = " | ".join(f"%json {json.dumps(sc)}" for sc in schemas)
        more = "" if one else ' ("\\n" block)*'
        return f'start: block{more}\nblock: "<tool_call>\\n" call "\\n</tool_call>"\ncall: {call}'

    def _turn_end_ids(self) -> set[int]:
        """The special token the template writes right after an assistant message (e.g. <|im_end|>),
        found by rendering a sample conversation: the model emits it to end its turn."""
        if self._template is None:
            return set()
        marker = "\u2063MARKER\u2063"
        try:
            text = self.render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}],
                                    add_generation_prompt=False)
        except Exception:  # a template may reject the sample (e.g. it requires a system message)
            return set()
        after = text.split(marker, 1)[-1] if marker in text else ""
        specials = [t.content for t in self.tok.get_added_tokens_decoder().values() if t.special]
        hits = [t for t in specials if after.startswith(t)]
        return {self.tok.token_to_id(max(hits, key=len))} if hits else set()


GGUFTokenizer = HFTokenizer  # the same class: GGUF metadata is just another source for it


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> Any:
    from tokenizers import Regex, Tokenizer as HFRawTokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFRawTokenizer(models.BPE(vocab, pairs, fuse_unk=False))
    split = _GGUF_SPLITS.get(pre or "")
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(tokens: list[str], scores: list[float], unk_id: int | None, add_space_prefix: bool) -> Any:
    """SentencePiece BPE (Mistral/Llama GGUFs): GGUF keeps pieces and scores but no merges; a piece's
    score ranks the merge that makes it, so rebuild merges from every split of every piece."""
    from tokenizers import Tokenizer as HFRawTokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, score in zip(tokens, scores):
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    merges = [(l, r) for *_, l, r in sorted(ranked)]
    unk = tokens[unk_id] if unk_id is not None else None
    tok = HFRawTokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    scheme = "first" if add_space_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:  # drop the space the pre-tokenizer prepended
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _set_bos_processor(tok: Any, bos_id: int | None, add_bos: bool) -> None:
    from tokenizers import processors

    if add_bos and bos_id is not None:
        bos = tok.id_to_token(bos_id)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = None


def _compile_template(source: str) -> Any:
    """Compile a chat template the way transformers does, so prompts match token for token."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_json(path: Path) -> dict:
    """An optional JSON file ({} where there is none); a malformed one is an error naming it."""
    from mistral_jax.config import read_json

    return read_json(path) if path.is_file() else {}


# ---- loading -------------------------------------------------------------------------------------

_MISTRAL_FILES = ("tekken.json", "tokenizer.model.v*")


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read: the message names it and the fix. A ValueError, so
    that the server reports it as a failed start, as it does a bad checkpoint."""


TOKENIZER_MODES = ("auto", "mistral", "hf")


def load_tokenizer(model_path: str | Path, mode: str = "auto") -> Tokenizer:
    """A .gguf file, a tokenizer file, or a model directory. mode (vLLM's tokenizer_mode): "auto",
    Mistral files (tekken.json, tokenizer.model.v*) win over Hugging Face's tokenizer.json, since
    they carry the exact template; "mistral": only those (mistral-common); "hf": only
    tokenizer.json (or a GGUF file's own tokenizer)."""
    from mistral_jax.config import CheckpointError  # not from .checkpoint: that would import JAX into HTTP processes

    if mode not in TOKENIZER_MODES:
        raise ValueError(f"tokenizer_mode={mode!r} is not one of {TOKENIZER_MODES}")
    file, read = _find_tokenizer(Path(model_path), mode)
    if mode != "auto" and (mode == "mistral") != (read is MistralTokenizer):
        raise TokenizerError(f"{file} is not a {mode} tokenizer file (tokenizer_mode={mode!r}). Fix: pass "
                             f"{'tekken.json or tokenizer.model.v*' if mode == 'mistral' else 'tokenizer.json'}, "
                             "or tokenizer_mode='auto'")
    if file.is_symlink() and not file.exists():  # a Hugging Face cache whose blob is gone
        raise TokenizerError(f"{file}: a broken symbolic link (to {os.readlink(file)}). Fix: re-download it")
    if file.is_dir():
        raise TokenizerError(f"{file}: a directory, not a file. Fix: put the tokenizer file there, or pass {_PASS_ONE}")
    try:
        return read(file)
    except (TokenizerError, CheckpointError):  # ours: they name the file already
        raise
    except OSError as e:
        raise TokenizerError(f"{file}: cannot be read ({e.strerror or e}). "
                             "Fix: make it a readable file (check its permissions), or re-download it") from e
    except Exception as e:  # noqa: BLE001  the libraries' own errors (RuntimeError, KeyError, ...) name no file
        raise TokenizerError(f"{file}: not a valid tokenizer file ({type(e).__name__}: {e}). "
                             f"Fix: re-download it, or pass another with {_PASS_ONE}") from e


_PASS_ONE = "tokenizer=PATH (--tokenizer PATH)"


def _find_tokenizer(path: Path, mode: str = "auto") -> tuple[Path, Callable[[Path], Tokenizer]]:
    """The tokenizer file that `path` (a file, or a directory to look in) names, and its reader.
    In a directory, mode "auto" takes Mistral's files first, then Hugging Face's (or a GGUF's);
    "mistral" and "hf" take only their own kind."""
    if path.is_file() or path.is_symlink():
        if path.suffix == ".gguf":
            return path, HFTokenizer.from_gguf
        if path.name == "tokenizer.json":
            return path, _from_tokenizer_json
        return path, MistralTokenizer  # tekken*.json, tokenizer.model.v*
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer: {path} does not exist. Fix: pass an existing file or directory")
    found = (_mistral_tokenizer_file(path) if mode != "hf" else None) or (
        _hf_tokenizer_file(path) if mode != "mistral" else None)
    if found is not None:
        return found
    looked = {"auto": f"{', '.join(_MISTRAL_FILES)}, tokenizer.json or a single .gguf file",
              "mistral": "tekken.json or tokenizer.model.v* (tokenizer_mode='mistral')",
              "hf": "tokenizer.json or a single .gguf file (tokenizer_mode='hf')"}[mode]
    other = "" if mode == "auto" else " or another tokenizer_mode"
    raise FileNotFoundError(f"no tokenizer in {path}: looked for {looked}. Fix: add the model's tokenizer "
                            f"file{other}, or pass {_PASS_ONE}")


def _from_tokenizer_json(file: Path) -> Tokenizer:
    return HFTokenizer.from_hf_dir(file.parent)


def _mistral_tokenizer_file(path: Path):
    if (path / "tekken.json").is_file():
        return path / "tekken.json", MistralTokenizer
    sentencepiece = sorted(path.glob("tokenizer.model.v*"))
    if len(sentencepiece) > 1:  # no safe guess: the version decides the prompt format
        raise ValueError(f"several tokenizers in {path}: {[p.name for p in sentencepiece]}. "
                         f"Fix: pass the model's one with {_PASS_ONE}")
    return (sentencepiece[0], MistralTokenizer) if sentencepiece else None


def _hf_tokenizer_file(path: Path):
    if (path / "tokenizer.json").is_file():
        return path / "tokenizer.json", _from_tokenizer_json
    ggufs = sorted(path.glob("*.gguf"))
    return (ggufs[0], HFTokenizer.from_gguf) if len(ggufs) == 1 else None


# ---- streaming ---------------------------------------------------------------------------------

_PROMPT_CONTEXT = 6  # prompt tokens decoded ahead of the first generated one (vLLM uses 5)
_WINDOW = 6  # tokens a step decodes at most before its window restarts (plus the restart's context)


class StreamDecoder:
    """Incremental detokenization (the prefix/read offset technique of vLLM and TGI).

    Each step decodes a window of recent tokens (from `prefix`) and emits what it adds to the
    text the same window gave when the last text was emitted (kept, so one decode a step: the
    tokenizer call is most of a step's host time per sequence at large batches). Decoding in
    context keeps the leading space a token gets from its neighbour (SentencePiece drops it on
    the first piece of a decode), and text is held back while it ends with U+FFFD, i.e. while a
    multi-byte character is still incomplete. Once the window spans _WINDOW tokens it restarts
    at the tokens emitted last, which are the next text's context (one more decode then).

    Without prompt_ids, "".join(steps) + flush() == tokenizer.decode(all ids). With prompt_ids, the
    first token decodes after the prompt's tail, so its leading space is kept (as vLLM does).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids or [])[-_PROMPT_CONTEXT:]
        self.prefix = 0  # window start: tokens already emitted, decoded again for context
        self.read = len(self.ids)  # tokens before this index have been emitted
        self.text = self._decode(self.ids) if self.ids else ""  # the window's text up to `read`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(self.text) or after.endswith("\ufffd"):
            return ""  # nothing printable yet (a special token, or half a character)
        new = after[len(self.text):]
        if len(self.ids) - self.prefix > _WINDOW:  # restart at the tokens emitted now
            self.prefix = self.read
            after = self._decode(self.ids[self.prefix:])
        self.read, self.text = len(self.ids), after
        return new

    def flush(self) -> str:
        """Whatever is still held back (e.g. a trailing incomplete character, as U+FFFD)."""
        after = self._decode(self.ids[self.prefix:])
        new = after[len(self.text):]
        self.read, self.text = len(self.ids), after
        return new
