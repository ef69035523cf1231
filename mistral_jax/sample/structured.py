"""Structured outputs: a grammar per request, enforced as a token mask inside the jitted sampler.

A request may ask that its output match a JSON schema, any JSON object, a regex, one of a list
of strings, or a grammar (Lark in llguidance's dialect, or GBNF); the server also uses this for
tool calls that must happen (`tool_choice` "required" or a named function). The grammar
library is llguidance (guidance-ai): it computes a request's allowed-token bitmask on the host
in tens of microseconds, from any tokenizer's byte vocabulary; its wheel has no dependencies
(xgrammar's pulls torch, transformers and triton), and mistral-common builds its own guidance on
it. Here it turns each constrained request's state into one row of a [seqs, vocab / 32] int32
bitmask; unconstrained rows are all ones, so every request shares the same step program.

A constrained sequence's next mask depends on the token it just sampled, which the host reads
one step late (the engine runs a step ahead of its results): such a sequence therefore decodes
every other step while others run, and the unconstrained ones keep their pace (scheduler.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import numpy as np

from mistral_jax.tokenizer import HFTokenizer, MistralTokenizer, Tokenizer
from mistral_jax.tool_calls import tool_call_format


def words(vocab_size: int) -> int:
    """int32 words of one bitmask row."""
    return (vocab_size + 31) // 32


# JSON as json.dumps writes it (", " and ": ", no other whitespace), as Mistral models saw it in
# training: free whitespace let a small model emit newlines until max_tokens. A schema's own
# "x-guidance" options override this.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclasses.dataclass(frozen=True)
class StructuredOutputs:
    """What a request's output must match; exactly one field set (vLLM's names)."""

    json: dict | str | None = None  # a JSON schema (dict or its JSON text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None  # exactly one of these strings
    grammar: str | None = None  # Lark (llguidance's dialect: %json, <[token id]>) or GBNF

    def __post_init__(self):
        given = [f for f in ("json", "regex", "choice", "grammar") if getattr(self, f) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"StructuredOutputs needs exactly one of json, json_object, regex, choice, grammar; "
                             f"got {given or 'none'}")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"StructuredOutputs.choice={self.choice!r} is invalid: give a non-empty list of strings")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"StructuredOutputs.{name} must be a non-empty string, got {v!r}")

    def field(self) -> str:
        return next(f for f in ("json", "json_object", "regex", "choice", "grammar") if getattr(self, f))

    def llguidance_grammar(self) -> str:
        """The llguidance grammar text; ValueError naming the problem for an invalid spec."""
        import llguidance

        if self.json_object or self.json is not None:
            schema = {"type": "object"} if self.json_object else self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
            _check_schema(schema)
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"regex {self.regex!r} is invalid: {e}") from None
            return llguidance.grammar_from("regex", self.regex)
        if self.choice is not None:
            return llguidance.grammar_from("choice", json.dumps(list(self.choice)))
        return llguidance.grammar_from("grammar", self.grammar)


def _check_schema(schema: Any) -> None:
    import jsonschema

    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(map(str, e.absolute_path)) or "(top level)"
        raise ValueError(f"the JSON schema is invalid at {where}: {e.message}") from None


# ---- tokenizers as llguidance sees them ---------------------------------------------------------


class _SentencePieceVocab:
    """A SentencePiece (Mistral v1-v3) vocabulary as bytes, in llguidance's TokenizerWrapper shape:
    "▁" is a space, <0xNN> pieces are bytes, control pieces ([INST]) are special tokens, written
    <INST> as llguidance expects (mistral-common's adapter does the same for Tekken)."""

    def __init__(self, tok: MistralTokenizer):
        sp = tok.raw._model
        self._raw = tok.raw
        self.eos_token_id, self.bos_token_id = tok.eos_id, tok.bos_id
        self._newline = sp.piece_to_id("<0x0A>")
        self.tokens, self.special_token_ids = [], []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i):
                self.special_token_ids.append(i)
                self.tokens.append(re.sub(r"^\[(.*)\]$", r"<\1>", piece).encode())
            elif sp.is_byte(i):
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())

    def __call__(self, s: str) -> list[int]:
        # SentencePiece prefixes a space ("▁") to what it encodes; llguidance needs the bytes of
        # the tokens to be exactly s (or its matcher fails). Encode after a newline, which is
        # a byte-fallback token no piece merges with, and keep what follows it.
        ids = self._raw.encode("\n" + s, bos=False, eos=False)
        return ids[ids.index(self._newline) + 1:]


def llg_tokenizer(tokenizer: Tokenizer, vocab_size: int):
    """The tokenizer's llguidance view (about 1-2 s for 131k tokens: built once, kept on it)."""
    cached = getattr(tokenizer, "_llg", None)
    if cached is not None:
        return cached
    import llguidance

    eos = sorted(tokenizer.stop_token_ids)
    if isinstance(tokenizer, HFTokenizer):
        llg = llguidance.LLTokenizer(tokenizer.tok.to_str(), n_vocab=vocab_size, eos_token=eos)
    elif isinstance(tokenizer, MistralTokenizer):
        from mistral_common.tokens.tokenizers.tekken import is_tekkenizer

        if is_tekkenizer(tokenizer.raw):
            from mistral_common.guidance.tokenizer import MistralLLGTokenizer

            vocab = MistralLLGTokenizer(tokenizer.raw)
        else:
            vocab = _SentencePieceVocab(tokenizer)
        llg = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), n_vocab=vocab_size, eos_token=eos)
    else:
        raise ValueError(f"structured outputs do not support {type(tokenizer).__name__} tokenizers")
    tokenizer._llg = llg
    return llg


# ---- per-request state --------------------------------------------------------------------------


class Matcher:
    """One request's grammar state: the mask of its next token, and the tokens it accepted."""

    def __init__(self, spec: StructuredOutputs, tokenizer: Tokenizer, vocab_size: int):
        import llguidance

        # Built once: a grammar the matcher cannot build leaves it in an error state, with the reason.
        self.matcher = llguidance.LLMatcher(llg_tokenizer(tokenizer, vocab_size), spec.llguidance_grammar(),
                                            log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"the {spec.field()} constraint is invalid: {self.matcher.get_error().strip()}")

    def accept(self, token: int) -> bool:
        """Advance over a sampled token; False if the grammar rejects it (it never should)."""
        return self.matcher.consume_token(int(token))

    @property
    def stopped(self) -> bool:
        """The grammar is complete: nothing may follow."""
        return self.matcher.is_stopped()


class MaskBuffer:
    """Host bitmask rows for one step, filled in parallel for every constrained row."""

    def __init__(self, rows: int, vocab_size: int):
        self.all_ones = np.full((rows, words(vocab_size)), -1, np.int32)
        self._executor = None

    def build(self, rows: int, constrained: list[tuple[int, Matcher]]) -> np.ndarray:
        """[rows, words] int32: -1 everywhere, the grammar's allowed tokens on constrained rows."""
        import llguidance
        import llguidance.numpy as lnp

        mask = self.all_ones[:rows].copy()
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        lnp.fill_next_token_bitmask_par(self._executor, [(m.matcher, r) for r, m in constrained], mask)
        return mask


def tool_calls(tokenizer: Tokenizer, tools: list[dict], name: str | None = None,
               one: bool = False) -> StructuredOutputs:
    """The constraint for tool_choice "required" (calls of the given tools: one or more, or
    exactly one) or a named function (a call of it), in the model's own tool-call format."""
    chosen = [t for t in tools if t["function"]["name"] == name] if name else tools
    return StructuredOutputs(grammar=tool_call_format(tokenizer).grammar(chosen, one=one, json_style=JSON_STYLE))
