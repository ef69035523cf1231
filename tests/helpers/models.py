"""Small helpers around a model: the v3 tokenizer file, one dense forward, a slice of wqkv."""

from __future__ import annotations

from pathlib import Path


def v3_tokenizer() -> Path:
    """mistral-common's v3 SentencePiece tokenizer file (imported lazily: the GPU image has no
    mistral-common)."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"


def __getattr__(name):  # `from helpers.models import V3_TOKENIZER` stays lazy
    if name == "V3_TOKENIZER":
        return v3_tokenizer()
    raise AttributeError(name)


def dense_logits(model, tokens, to_numpy=True):
    """One full forward of `model` over tokens [batch, seq] with a dense cache: logits as NumPy
    (or as the array, to_numpy=False, e.g. inside jit)."""
    import jax.numpy as jnp
    import numpy as np

    from mistral_jax.cache.kv_cache import DenseKVCache

    b, t = tokens.shape
    cache = DenseKVCache.init(model.cfg, b, max(64, t), model.dtype)
    logits, _ = model(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(t), (b, t)), cache)
    return np.asarray(logits) if to_numpy else logits


def qkv_part(attention, name: str, layer: int):
    """The checkpoint's wq, wk or wv (or its `_scale`) of one layer out of the model's joint
    attention.wqkv [layers, kv_heads, g + 2, head_dim, ...]: [heads, head_dim, ...]."""
    wqkv = attention.wqkv  # an nnx.Param, or an Fp8Weight (quant, scale)
    w = (wqkv.scale if name.endswith("_scale") else getattr(wqkv, "quant", wqkv))[...][layer]
    g = w.shape[1] - 2
    part = {"wq": w[:, :g], "wk": w[:, g], "wv": w[:, g + 1]}[name.removesuffix("_scale")]
    return part.reshape(-1, *w.shape[2:])
