"""The KV cache interface the model's attention talks to, and its dense implementation.

A cache is a pytree carried through the layer scan. Attention hands it the new keys and values
of one layer and gets back the attention output and the updated cache:

    out, cache = cache.attend(layer, q, k, v, positions)

`DenseKVCache` keeps one contiguous [batch, max_len] slab per layer (simple batched generation).
The paged cache of the serving engine implements the same `attend` over pages and block tables,
so the model does not change when the cache does.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mistral_jax.config import ModelConfig
from mistral_jax.runtime.sharding import constrain

# Finite, so that a query row with nothing to attend to (a padding token) gives a uniform
# softmax instead of NaN; its output is discarded anyway. The kernels (the bottom layer) own it.
from pallas_kernels.ragged_paged_attention import MASK_VALUE

CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array) -> jax.Array:
    """Causal grouped-query attention of new queries over a slab of cached keys/values.

    q: [batch, q_len, n_heads, head_dim]; k, v: [batch, kv_len, n_kv_heads, head_dim], where key
    slot s holds position s; q_pos: [batch, q_len] absolute positions (-1 = padding).
    Returns [batch, q_len, n_heads, head_dim] in q's dtype.
    """
    b, t, n_heads, d = q.shape
    n_kv = k.shape[2]
    q = q.reshape(b, t, n_kv, n_heads // n_kv, d)  # group the query heads that share a kv head
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * d**-0.5
    kv_pos = jnp.arange(k.shape[1])
    visible = kv_pos[None, None, :] <= q_pos[:, :, None]  # [batch, q_len, kv_len]: causal
    scores = jnp.where(visible[:, None, None], scores, MASK_VALUE)
    # Softmax in f32, probabilities cast back like the reference implementation does.
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n_heads, d).astype(q.dtype)


@flax.struct.dataclass
class DenseKVCache:
    k: jax.Array  # [layers, batch, max_len, n_kv_heads, head_dim]
    v: jax.Array  # [layers, batch, max_len, n_kv_heads, head_dim]

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> DenseKVCache:
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        zeros = constrain(jnp.zeros(shape, dtype), CACHE_AXES)
        return cls(k=zeros, v=zeros)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def prepare(self, num_tokens: int, n_heads: int) -> DenseKVCache:
        """Per-forward work shared by the layers (PagedKVCache.prepare): none here."""
        return self

    def attend(
        self, layer: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, DenseKVCache]:
        """Write this step's k/v at `positions` of `layer`, then attend over the layer's slab.

        q: [batch, t, n_heads, head_dim]; k, v: [batch, t, n_kv_heads, head_dim];
        positions: [batch, t], -1 for padding tokens (not written).
        """
        # Padding goes to an out-of-range slot, which mode="drop" discards.
        slot = jnp.where(positions >= 0, positions, self.max_len)
        rows = jnp.arange(positions.shape[0])[:, None]
        ck = self.k.at[layer, rows, slot].set(k.astype(self.k.dtype), mode="drop")
        cv = self.v.at[layer, rows, slot].set(v.astype(self.v.dtype), mode="drop")
        out = dense_attention(q, ck[layer], cv[layer], positions)
        return out, DenseKVCache(k=ck, v=cv)
