"""The paged KV cache: one page pool per layer, shared by every sequence of the serving engine.

It implements the same `attend(layer, q, k, v, positions)` as the dense cache, so the model is
unchanged. A serving step packs the new tokens of all its sequences into one row of the model
input, tokens: [1, num_tokens]; the cache carries the step's metadata (where each token's k/v
goes, which pages each sequence reads) next to the page pools:

    k, v          [n_layers, num_pages, page_size, n_kv_heads, head_dim]   the pools (donated)
    slot_mapping  [num_tokens]       flat slot page * page_size + offset of each token, -1 = padding
    kv_lens       [max_seqs]         tokens in each sequence's cache after this step (0 = empty slot)
    page_indices  [max_seqs, pages]  block tables (unused entries: the null page 0)
    cu_q_lens     [max_seqs + 1]     where each sequence's tokens start in the packed batch
    num_seqs      []                 live sequences

The pools keep all layers in one array so that the layer scan writes them in place; the kernel
receives the whole pool and the layer index (slicing a layer out would copy it every step).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mistral_jax.cache.page_allocator import NULL_PAGE
from mistral_jax.config import ModelConfig
from mistral_jax.runtime.sharding import current_mesh, named_sharding
from pallas_kernels.ragged_paged_attention import attention_schedule, ragged_paged_attention, write_kv_pages

PAGE_AXES = ("layers", None, None, "kv_heads", "head_dim")


def page_bytes(cfg: ModelConfig, page_size: int, dtype) -> int:
    """Device bytes of one page across all layers, keys and values."""
    return 2 * cfg.n_layers * page_size * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def init_pages(cfg: ModelConfig, num_pages: int, page_size: int, dtype, mesh) -> tuple[jax.Array, jax.Array]:
    """Zeroed key and value pages [layers, pages, page_size, kv_heads, head_dim], made on their
    devices in the sharding the step returns them in (so the second step does not compile again;
    a device_put afterwards could copy gigabytes). The sharding is the program's output sharding,
    not read from the ambient mesh while tracing: JAX's trace cache does not key on that, and an
    engine on one device made after one on a tp mesh then got the tp trace."""
    shape = (cfg.n_layers, num_pages, page_size, cfg.n_kv_heads, cfg.head_dim)
    sharding = named_sharding(mesh, PAGE_AXES)
    return jax.jit(lambda: (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)), out_shardings=(sharding, sharding))()


@flax.struct.dataclass
class PagedKVCache:
    k: jax.Array
    v: jax.Array
    slot_mapping: jax.Array
    kv_lens: jax.Array
    page_indices: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array
    impl: str = flax.struct.field(pytree_node=False, default="auto")
    schedule: object = None  # the attention kernel's tables for this step's layout (prepare)

    def prepare(self, num_tokens: int, n_heads: int) -> PagedKVCache:
        """Before the layer loop: what the attention kernel derives from the step's layout (not
        from the layer) is computed here once, not inside every layer."""
        return self.replace(schedule=attention_schedule(self.impl, num_tokens, n_heads, self.k, self.kv_lens,
                                                        self.page_indices, self.cu_q_lens, self.num_seqs))

    def attend(
        self, layer: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, PagedKVCache]:
        """q: [1, num_tokens, n_heads, head_dim]; k, v: [1, num_tokens, n_kv_heads, head_dim].
        `positions` already placed the rotary phases; where the tokens go is slot_mapping."""
        # Padding tokens write into the null page, which no sequence reads: unconditional writes.
        ck, cv = write_kv_pages(self.k, self.v, k[0], v[0], self.slot_mapping, layer=layer,
                                trash_slot=NULL_PAGE * self.k.shape[-3])
        out = ragged_paged_attention(
            q[0], ck, cv, self.kv_lens, self.page_indices, self.cu_q_lens, self.num_seqs,
            layer=layer, impl=self.impl, mesh=current_mesh(),  # Pallas kernels: one call per tp shard
            schedule=self.schedule,
        )
        return out[None], self.replace(k=ck, v=cv)
