"""A GGUF file's tokenizer, rebuilt as a `tokenizers.Tokenizer` from the file's metadata.

GGUF keeps a vocabulary in llama.cpp's terms (`tokenizer.ggml.*`): byte-level BPE ('gpt2': tokens,
merges and the name of a pre-tokenizer split) or SentencePiece BPE ('llama': pieces and scores, no
merges). `HFTokenizer.from_gguf` wraps what `read_gguf_vocabulary` returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistral_jax.tokenizer.base import PASS_TOKENIZER, TokenizerError

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


@dataclass
class GGUFVocabulary:
    """What a GGUF file says about its tokenizer."""

    tok: Any  # a tokenizers.Tokenizer, special and user-defined tokens added
    bos_id: int | None
    eos_id: int
    add_bos: bool  # whether plain text gets BOS
    chat_template: str | None
    extra_stop_ids: set[int]  # end-of-turn/message tokens besides eos


def read_gguf_vocabulary(path: str | Path) -> GGUFVocabulary:
    from mistral_jax.gguf_file import open_gguf

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
                             f"Fix: pass another with {PASS_TOKENIZER}")
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
    return GGUFVocabulary(tok, bos_id, eos_id, add_bos, field("tokenizer.chat_template"), extra)


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> Any:
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFRawTokenizer

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
    from tokenizers import Tokenizer as HFRawTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, score in zip(tokens, scores):
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    merges = [(lhs, rhs) for *_, lhs, rhs in sorted(ranked)]
    unk = tokens[unk_id] if unk_id is not None else None
    tok = HFRawTokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    scheme = "first" if add_space_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:  # drop the space the pre-tokenizer prepended
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok
