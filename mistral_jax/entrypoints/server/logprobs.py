"""The engine's logprobs ({token id: logprob} per position, the chosen token among them) in
OpenAI's two shapes: the legacy completions' parallel lists, and chat's list of entries."""

from __future__ import annotations


def completion_logprobs(tokenizer, pairs) -> dict:
    """pairs: (token id, that position's {id: logprob}, or None where there is none: a prompt's
    first token)."""
    tokens, chosen, tops = [], [], []
    for tid, d in pairs:
        tokens.append(tokenizer.decode([tid], skip_special_tokens=False))
        chosen.append(None if d is None else d.get(tid))
        tops.append(None if d is None else {tokenizer.decode([t], skip_special_tokens=False): v for t, v in d.items()})
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": _offsets(tokens)}


def chat_logprob(tokenizer, tid: int, d: dict, top: int) -> dict:
    """One generated token's entry, with its `top` alternatives."""
    token = tokenizer.decode([tid], skip_special_tokens=False)
    return {"token": token, "logprob": d.get(tid), "bytes": list(token.encode()),
            "top_logprobs": [{"token": (t := tokenizer.decode([k], skip_special_tokens=False)), "logprob": v,
                              "bytes": list(t.encode())} for k, v in list(d.items())[:top]]}


def _offsets(tokens: list[str]) -> list[int]:
    out, at = [], 0
    for t in tokens:
        out.append(at)
        at += len(t)
    return out
