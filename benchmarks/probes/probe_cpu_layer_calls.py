"""Batch-1/8 CPU decode of the demo model: the engine's scanned layer stack (one program) against
one jitted layer program called per layer from Python, and against one program whose layers are
unrolled over per-layer weight buffers (arguments of their own, so XLA:CPU need not copy them
out of the stacks), each with its compile time.

    python benchmarks/probes/probe_cpu_layer_calls.py
Times the model's hidden states for T decode tokens (T = 1 and 8) over a paged cache of 128
tokens per sequence; the head and sampling are left out (they are the same in both)."""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mistral_jax import LLM
from mistral_jax.cache.paged import PagedKVCache
from mistral_jax.model.transformer import rotary_phases

llm = LLM(dtype="float32", max_model_len=512, max_num_seqs=8, progress=False)
eng = llm.engine
model = nnx.merge(eng.graphdef, eng.state)
L, P = llm.config.n_layers, eng.page_table_width
k_pages, v_pages = eng.k_pages, eng.v_pages


def meta(T):
    ctx = 128
    pages = np.zeros((T, P), np.int32)
    for s in range(T):
        pages[s, : ctx // 16 + 1] = 1 + s * (ctx // 16 + 1) + np.arange(ctx // 16 + 1)
    slot = pages[:, ctx // 16] * 16 + ctx % 16
    return dict(slot_mapping=jnp.asarray(slot), kv_lens=jnp.full(T, ctx + 1, jnp.int32),
                page_indices=jnp.asarray(pages),
                cu_q_lens=jnp.arange(T + 1, dtype=jnp.int32), num_seqs=jnp.int32(T))


@functools.partial(jax.jit, donate_argnums=(1, 2))  # the pools updated in place, as the engine's step does
def scanned(state, k, v, tokens, positions, m):
    mdl = nnx.merge(eng.graphdef, state)
    cache = PagedKVCache(k, v, **m, impl="reference")
    x, cache = mdl.hidden(tokens, positions, cache)
    return x, cache.k, cache.v


graphdef, whole, stacked = nnx.split(model.layers, lambda path, x: False, ...)
per_layer = [jax.tree.map(lambda a, i=i: jnp.array(a[i]), stacked) for i in range(L)]


@functools.partial(jax.jit, donate_argnums=(3, 4))
def one_layer(whole, layer_state, x, k, v, positions, m, i):
    cache = PagedKVCache(k, v, **m, impl="reference")
    phases = rotary_phases(positions, llm.config.head_dim, llm.config.rope_theta)
    x, cache = nnx.merge(graphdef, whole, layer_state)(x, positions, phases, cache, i)
    return x, cache.k, cache.v


@functools.partial(jax.jit, donate_argnums=(2, 3))
def unrolled(emb, per_layer, k, v, tokens, positions, m):
    cache = PagedKVCache(k, v, **m, impl="reference")
    phases = rotary_phases(positions, llm.config.head_dim, llm.config.rope_theta)
    x = emb[tokens]
    for i, st in enumerate(per_layer):
        x, cache = nnx.merge(graphdef, whole, st)(x, positions, phases, cache, i)
    return x, cache.k, cache.v


@jax.jit
def embed(emb, tokens):
    return emb[tokens]


def per_layer_calls(k, v, tokens, positions, m):
    x = embed(model.tok_embeddings[...], tokens)
    for i, st in enumerate(per_layer):
        x, k, v = one_layer(whole, st, x, k, v, positions, m, jnp.int32(i))
    return x, k, v


for T in (1, 8):
    m = meta(T)
    tokens = jnp.asarray(np.random.default_rng(0).integers(100, 40000, (1, T)), jnp.int32)
    positions = jnp.full((1, T), 128, jnp.int32)
    # Bound as defaults (B023); each f runs only in this iteration of T anyway.
    for name, f in (("scan", lambda k, v, t=tokens, p=positions, m=m: scanned(eng.state, k, v, t, p, m)),
                    ("per-layer calls", lambda k, v, t=tokens, p=positions, m=m: per_layer_calls(k, v, t, p, m)),
                    ("unrolled", lambda k, v, t=tokens, p=positions, m=m: unrolled(model.tok_embeddings[...], per_layer,
                                                                                   k, v, t, p, m))):
        t = time.perf_counter()
        x, k_pages, v_pages = f(k_pages, v_pages)
        jax.block_until_ready(x)
        first = time.perf_counter() - t
        times = []
        for _ in range(20):
            t = time.perf_counter()
            x, k_pages, v_pages = f(k_pages, v_pages)
            jax.block_until_ready(x)
            times.append(time.perf_counter() - t)
        print(f"T={T} {name:16s} {np.median(times) * 1e3:7.2f} ms  (first call {first:.2f} s)", flush=True)
