"""A draft model for speculative decoding: a smaller checkpoint with the target's vocabulary.

Its KV cache is paged like the target's and uses the same page numbers: a page the allocator hands
out holds the target's k/v and the draft's (the engine sizes pages for both), so block tables,
the prefix cache, preemption and abort need nothing new. Two kinds of jitted programs:

- `step`: the draft runs every engine step's packed batch (prefill chunks, decode tokens, verify
  rows), so its cache always covers what the target's covers. One program per token bucket.
- `propose`: k greedy decode steps for the speculating sequences, on the device in one program
  (a scan: step j's token feeds step j + 1); only the [k, rows] drafts come back to the host.
  One program per row bucket. A greedy draft is a point mass, so verification stays exact
  (speculative.py).

A sequence proposes from its last token (position N - 1), writing the draft's k/v at N - 1 ..
N + k - 2; the verify step that follows runs the draft over the same positions again (with the
drafts as tokens), so whatever is kept is consistent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mistral_jax.cache.paged import PAGE_AXES, PagedKVCache, init_pages, page_bytes
from mistral_jax.engine.programs import Program
from mistral_jax.engine.step_inputs import StepWire, from_wire
from mistral_jax.model.transformer import Transformer
from mistral_jax.runtime.sharding import constrain, use_mesh


@functools.partial(jax.jit, static_argnames=("graphdef", "impl"), donate_argnames=("k_pages", "v_pages"))
def _step(state, k_pages, v_pages, wire: StepWire, prev_tokens, *, graphdef, impl: str):
    """The engine step's packed batch through the draft: only its k/v are kept."""
    model: Transformer = nnx.merge(graphdef, state)
    inputs, _ = from_wire(wire)
    prev = prev_tokens[jnp.maximum(inputs.prev_index, 0)]
    tokens = jnp.where(inputs.prev_index >= 0, prev, inputs.tokens)[None]
    cache = PagedKVCache(k_pages, v_pages, inputs.slot_mapping, inputs.kv_lens, inputs.page_indices,
                         inputs.cu_q_lens, inputs.num_seqs, impl=impl)
    _, cache = model.hidden(tokens, inputs.positions[None], cache)
    return constrain(cache.k, PAGE_AXES), constrain(cache.v, PAGE_AXES)


@functools.partial(jax.jit, static_argnames=("graphdef", "impl"), donate_argnames=("k_pages", "v_pages"))
def _propose(state, k_pages, v_pages, first, positions, slots, page_indices, num_seqs, *, graphdef, impl: str):
    """k greedy draft tokens per row. first: [R] each row's last token; positions, slots:
    [k, R] where step j's token goes (-1 = nothing: padding rows, or past the row's own k)."""
    model: Transformer = nnx.merge(graphdef, state)
    R = first.shape[0]
    cu_q_lens = jnp.minimum(jnp.arange(R + 1, dtype=jnp.int32), num_seqs)

    def one(carry, step):
        tokens, k_pages, v_pages = carry
        pos, slot = step
        cache = PagedKVCache(k_pages, v_pages, slot, pos + 1, page_indices, cu_q_lens, num_seqs, impl=impl)
        hidden, cache = model.hidden(tokens[None], pos[None], cache)  # [1, R, dim]
        nxt = jnp.argmax(model.logits(hidden)[0], axis=-1).astype(jnp.int32)  # [R]
        return (nxt, cache.k, cache.v), nxt

    (_, k_pages, v_pages), drafts = jax.lax.scan(one, (first, k_pages, v_pages), (positions, slots))
    return drafts, constrain(k_pages, PAGE_AXES), constrain(v_pages, PAGE_AXES)


class DraftModel:
    def __init__(self, model: Transformer, target_cfg, k: int):
        if model.cfg.vocab_size != target_cfg.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary has {model.cfg.vocab_size} tokens, "
                f"the target's {target_cfg.vocab_size}: "
                "a draft must share the target's tokenizer (e.g. a smaller model of the same family)")
        self.graphdef, self.state = nnx.split(model)
        self.cfg, self.dtype, self.k = model.cfg, model.dtype, k
        self.k_pages = self.v_pages = None

    def page_bytes(self, page_size: int) -> int:
        return page_bytes(self.cfg, page_size, self.dtype)

    def allocate(self, mesh, num_pages: int, page_size: int, impl: str) -> None:
        """The paged cache, and the programs (by bucket) that run on it."""
        devices = list(mesh.devices.flat)
        self._step_program = Program(_step, devices, graphdef=self.graphdef, impl=impl)
        self._propose_program = Program(_propose, devices, graphdef=self.graphdef, impl=impl)
        with use_mesh(mesh):
            self.k_pages, self.v_pages = init_pages(self.cfg, num_pages, page_size, self.dtype, mesh)

    def step(self, wire: StepWire, prev_tokens) -> None:
        self.k_pages, self.v_pages = self._step_program(wire.num_tokens, self.state, self.k_pages, self.v_pages,
                                                        wire, prev_tokens)

    def propose(self, first: np.ndarray, positions: np.ndarray, slots: np.ndarray, page_indices: np.ndarray,
                num_seqs: int, put) -> jax.Array:
        """Host arrays (padded to a row bucket) -> drafts [k, rows] on the device. put: the
        engine's host-to-mesh placement."""
        args = put((first, positions, slots, page_indices, np.int32(num_seqs)))
        drafts, self.k_pages, self.v_pages = self._propose_program(len(first), self.state, self.k_pages,
                                                                   self.v_pages, *args)
        return drafts
