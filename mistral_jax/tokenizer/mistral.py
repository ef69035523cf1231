"""Mistral's own tokenizers through mistral-common: SentencePiece (tokenizer.model.v1-v7) and
Tekken (tekken.json).

mistral-common is the source of truth for Mistral prompts, chat templates and tool-call tokens
included: we never write a Mistral template by hand. Its tool calls are read in
mistral_jax.tool_calls.mistral."""

from __future__ import annotations

from pathlib import Path

from mistral_jax.tokenizer.base import Tokenizer, openai_roles


class MistralTokenizer(Tokenizer):
    """mistral-common's tokenizer: tokenizer.model.v* (SentencePiece) or tekken.json."""

    tool_call_parser = "mistral"

    def __init__(self, path: str | Path):
        # Imported here so the engine runs where only GGUF/HF tokenizers are needed.
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MistralCommonTokenizer

        self.mistral = MistralCommonTokenizer.from_file(str(path))
        self.raw = self.mistral.instruct_tokenizer.tokenizer
        self.bos_id, self.eos_id, self.vocab_size = self.raw.bos_id, self.raw.eos_id, self.raw.n_words
        self.stop_token_ids = frozenset({self.eos_id})
        self._special_ids: set[int] = set(self.raw.special_ids)

    def special_id(self, token: str) -> int | None:
        """The id of a special token ("[TOOL_CALLS]"), or None where this vocabulary has none."""
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
