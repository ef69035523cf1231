"""Smoke test on the GPU: random Mistral-Small-2501-shape weights, raw jitted forward, timings."""
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, ".")
from benchmarks.bench_generate import ceilings
from mistral_jax.cache.kv_cache import DenseKVCache
from mistral_jax.config import ModelConfig
from mistral_jax.loading.weights import random_weights

print(jax.__version__, jax.devices())
if not os.environ.get("SKIP_CEIL"):
    c = ceilings()
    print({k: v for k, v in c.items()})
cfg = ModelConfig.named(sys.argv[1] if len(sys.argv) > 1 else "mistral-small-2501")
t = time.perf_counter()
model = random_weights(cfg, jnp.bfloat16)
jax.block_until_ready(nnx.state(model))
print("init", time.perf_counter() - t)
graphdef, state = nnx.split(model)

@functools.partial(jax.jit, donate_argnums=(3,))
def fwd(state, tokens, positions, cache):
    logits_at = jnp.zeros((tokens.shape[0], 1), jnp.int32) + tokens.shape[1] - 1
    logits, cache = nnx.merge(graphdef, state)(tokens, positions, cache, logits_at=logits_at)
    return jnp.argmax(logits[:, 0], -1), cache

SHAPES = [(1, 512, 1024), (1, 4096, 8192), (1, 1, 1024), (8, 1, 1024), (32, 1, 1024)]
if os.environ.get("SHAPES"):
    SHAPES = [tuple(int(v) for v in s.split("x")) for s in os.environ["SHAPES"].split(",")]
for B, T, S in SHAPES:
    cache = jax.jit(DenseKVCache.init, static_argnums=(0,1,2,3))(cfg, B, S, jnp.bfloat16)
    tokens = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(T) + (100 if T == 1 else 0), (B, T))
    t = time.perf_counter()
    out, cache = fwd(state, tokens, pos, cache)
    jax.block_until_ready(out)
    cold = time.perf_counter() - t
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        out, cache = fwd(state, tokens, pos, cache)
        jax.block_until_ready(out)
        ts.append(time.perf_counter() - t)
    m = statistics.median(ts)
    print(f"B={B} T={T} S={S}: cold {cold:.2f}s warm {m*1e3:.2f} ms -> {B*T/m:,.1f} tok/s; "
          f"weight BW {cfg.num_params()*2/m/1e12:.2f} TB/s")
