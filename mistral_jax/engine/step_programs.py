"""The functions the engine compiles (one program per bucket each, buckets.py), and what each
computes on the device:

- `_step`: the model over a step's packed tokens and the paged cache, then one sampled token per
  sampling row; it updates the state it is given (KV pages, penalty counts, last tokens);
- `_top_logprobs`: the top MAX_LOGPROBS logprobs of each row, over the step's logits, only on
  steps where some request asks for them (in the step they would cost a sort of the vocabulary
  every step);
- `_prompt_logprobs_step`: prompt logprobs over the step's hidden states (the head and a
  log-softmax), only on steps that need them;
- `_reset_penalty_row`: a request's row of the penalty state, from its tokens.

Per-request settings are arrays, not program variants: sampling values, penalties (always
applied; neutral values change nothing), the chosen token's logprob (always computed).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mistral_jax.cache.paged import PAGE_AXES, PagedKVCache
from mistral_jax.engine.step_inputs import StepWire, from_wire
from mistral_jax.model.transformer import Transformer
from mistral_jax.runtime.sharding import constrain
from mistral_jax.sample.sampling import MAX_LOGPROBS, sample, top_k_over_vocab


@functools.partial(jax.jit, static_argnames=("graphdef", "impl", "max_seqs"),
                   donate_argnames=("k_pages", "v_pages", "counts", "seen"))
def _step(state, k_pages, v_pages, wire: StepWire, allowed, prev_tokens, counts, seen, *,
          graphdef, impl: str, max_seqs: int):
    """One step. allowed: [S, vocab / 32] grammar bitmask; prev_tokens: [max_seqs] the previous
    step's sampled tokens (fed where prev_index >= 0); counts, seen: [max_num_seqs, vocab] the
    penalty state. Returns (SampleResult over [S] rows, hidden [T, dim], logits [S, vocab],
    next prev_tokens, and the updated k_pages, v_pages, counts, seen)."""
    model: Transformer = nnx.merge(graphdef, state)
    inputs, sampling = from_wire(wire, allowed)
    prev = prev_tokens[jnp.maximum(inputs.prev_index, 0)]
    tokens = jnp.where(inputs.prev_index >= 0, prev, inputs.tokens)[None]  # [1, T]
    cache = PagedKVCache(k_pages, v_pages, inputs.slot_mapping, inputs.kv_lens, inputs.page_indices,
                         inputs.cu_q_lens, inputs.num_seqs, impl=impl)
    hidden, cache = model.hidden(tokens, inputs.positions[None], cache)  # [1, T, dim]
    last = model.logits(hidden[:, inputs.logits_at])[0]  # [S, vocab]: each sampling row
    vocab = last.shape[-1]
    # Every row's penalties apply (neutral values leave its logits as they are), so requests with
    # and without penalties share one program.
    result = sample(last, sampling, inputs.step, counts[inputs.slots], seen[inputs.slots])
    kept = jnp.where(inputs.sampled, result.tokens, vocab)  # record kept tokens; padding rows drop
    counts = counts.at[inputs.slots, kept].add(1, mode="drop")
    seen = seen.at[inputs.slots, kept].set(True, mode="drop")
    # A fixed-size copy of the sampled tokens feeds the next step, whatever its bucket.
    next_tokens = jnp.zeros((max_seqs,), jnp.int32).at[: result.tokens.shape[0]].set(result.tokens)
    k_pages, v_pages = constrain(cache.k, PAGE_AXES), constrain(cache.v, PAGE_AXES)  # keep their placement
    return result, hidden[0], last, next_tokens, k_pages, v_pages, counts, seen


@jax.jit
def _top_logprobs(logits):
    """A step's logits [S, vocab] -> the top MAX_LOGPROBS of each row's raw log-softmax:
    (logprobs [S, n] f32, ids [S, n] i32). Only for steps whose requests ask for them."""
    return top_k_over_vocab(jax.nn.log_softmax(logits, axis=-1), MAX_LOGPROBS)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prompt_logprobs_step(state, hidden, wire: StepWire, *, graphdef):
    """A step's hidden states [T, dim] -> prompt logprobs (see _prompt_logprobs): the head and a
    log-softmax over every row, only for steps that carry a request asking for them."""
    logits = nnx.merge(graphdef, state).logits(hidden[None])[0]  # [T, vocab]
    return _prompt_logprobs(logits, wire.next_ids, MAX_LOGPROBS)


def _prompt_logprobs(logits, next_ids, n: int):
    """logits [T, vocab] -> log p(next prompt token) [T] and the top-n [T, n] at each row."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    actual = jnp.take_along_axis(lp, jnp.maximum(next_ids, 0)[:, None], axis=-1)[:, 0]
    top_lp, top_ids = top_k_over_vocab(lp, n)
    return actual, top_ids, top_lp


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _reset_penalty_row(counts, seen, slot, ids, num_prompt):
    """Row `slot` of the penalty state from a sequence's tokens. ids: [max_model_len bucket]
    padded with vocab (one shape: one program)."""
    vocab = counts.shape[1]
    generated = jnp.arange(ids.shape[0]) >= num_prompt
    row_seen = jnp.zeros((vocab,), bool).at[ids].set(True, mode="drop")
    row_counts = jnp.zeros((vocab,), jnp.int32).at[jnp.where(generated, ids, vocab)].add(1, mode="drop")
    return counts.at[slot].set(row_counts), seen.at[slot].set(row_seen)
