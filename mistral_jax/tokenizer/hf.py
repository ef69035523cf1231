"""A Hugging Face `tokenizers.Tokenizer` with the model's own jinja chat template, read from a
`tokenizer.json` directory or from a GGUF file's metadata (rebuilt in gguf.py).

Chat templates are compiled and rendered as transformers does, so prompts match it token for
token. Tool calls are written in the Hermes format (`<tool_call>` blocks), which
mistral_jax.tool_calls.hermes reads. A template that has no place for the tools (it never reads
`tools`) gets them in a system message (tool_prompt.py), so the model sees what it may call."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from mistral_jax.tokenizer.base import Tokenizer, TokenizerError, openai_roles
from mistral_jax.tokenizer.gguf import read_gguf_vocabulary
from mistral_jax.tokenizer.tool_prompt import hermes_tools_text, with_tools_message


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with the model's own jinja chat template (GGUF or tokenizer.json)."""

    tool_call_parser = "hermes"  # the common convention of ChatML models, SmolLM2's included

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
        self._template = compile_chat_template(chat_template) if chat_template else None
        # Whether the template places the tools itself; if not, render_chat adds them as a system message.
        self.template_takes_tools = (self._template is not None
                                     and "tools" in template_variables(self._template, chat_template))
        self.stop_token_ids = frozenset({eos_id, *extra_stop_ids, *self._turn_end_ids()})

    # -- construction --

    @classmethod
    def from_gguf(cls, path: str | Path) -> HFTokenizer:
        v = read_gguf_vocabulary(path)
        _set_bos_processor(v.tok, v.bos_id, v.add_bos)
        return cls(v.tok, v.bos_id, v.eos_id, v.chat_template, v.extra_stop_ids)

    @classmethod
    def from_hf_dir(cls, folder: str | Path) -> HFTokenizer:
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
        if tools and not self.template_takes_tools:
            messages = with_tools_message(messages, hermes_tools_text(tools))
        return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = self.render_chat(messages, tools)
        # The template writes its own special tokens; add BOS only if the model wants it and it is missing.
        ids = self.encode(text, add_bos=False)
        if self.add_bos and self.bos_token and not text.startswith(self.bos_token):
            ids = [self.bos_id, *ids]
        return ids

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


def compile_chat_template(source: str) -> Any:
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


def template_variables(template: Any, source: str) -> set[str]:
    """The variables a chat template (compiled from source) reads from its caller: messages,
    tools, add_generation_prompt..."""
    from jinja2 import meta

    return meta.find_undeclared_variables(template.environment.parse(source))


def _set_bos_processor(tok: Any, bos_id: int | None, add_bos: bool) -> None:
    """Make `encode(add_special_tokens=True)` prepend BOS exactly when the model wants it."""
    from tokenizers import processors

    if add_bos and bos_id is not None:
        bos = tok.id_to_token(bos_id)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = None


def _read_json(path: Path) -> dict:
    """An optional JSON file ({} where there is none); a malformed one is an error naming it."""
    from mistral_jax.config import read_json

    return read_json(path) if path.is_file() else {}
