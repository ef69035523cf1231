"""A step's host-built inputs, and their form on the way to the device: two int32 arrays.

The engine packs a step on the host (StepInputs and the rows' SamplingArrays: ~23 small NumPy
arrays). Handed to the jitted step as they are, each is its own host-to-device transfer, and
when the host's dispatch of a step takes nearly as long as the device's step, those transfers
leave the device idle (docs/performance.md). `to_wire` lays them out as two arrays (one per
token, one per sequence row; floats and unsigned seeds by their bits), `from_wire` takes them
apart inside the program (slices: no kernel of their own). The grammar bitmask stays apart: it
is already on the device.

Logit bias (OpenAI's logit_bias) is a third int32 array, `bias` [S, 2 * MAX_LOGIT_BIAS]: each
row's token ids, then their biases' f32 bits. At the cap of 300 entries that is 2,400 bytes a
row, 614,400 bytes (600 KiB) a step of 256 rows, where the per-sequence array is 68 bytes a row
plus 4 per page-table entry (8,260 bytes at a 32k context in pages of 16, 1,092 at 4k). So it is
sent only on steps where some row has a bias: every other step passes a resident all-padding
array of the same shape (the model runner keeps one per sequence bucket), the same program with
no transfer. A per-row array rather than per-slot state kept on the device: nothing to keep in
step with admissions, preemptions and recovery, and a biased step costs one transfer, which the
runner skips while the rows' biases stay the same (runner.py).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.sample.sampling import MAX_LOGIT_BIAS, SamplingArrays


@flax.struct.dataclass
class StepInputs:
    """One step's packed batch (host-built)."""

    tokens: jax.Array  # [T] i32 token ids (placeholder where prev_index >= 0)
    prev_index: jax.Array  # [T] i32 row of the previous step's sampled tokens to use, -1 = tokens
    positions: jax.Array  # [T] i32, -1 = padding
    slot_mapping: jax.Array  # [T] i32 flat cache slot, -1 = padding
    next_ids: jax.Array  # [T] i32 the prompt token after each position (prompt logprobs), -1 = none
    kv_lens: jax.Array  # [S] i32
    page_indices: jax.Array  # [S, pages] i32
    cu_q_lens: jax.Array  # [S + 1] i32, cu_q_lens[0] = 0
    num_seqs: jax.Array  # [] i32
    # Sampling rows: one per sequence (its last token), plus one per draft of a speculating one.
    logits_at: jax.Array  # [S] i32 packed position each row samples after
    slots: jax.Array  # [S] i32 row of the persistent penalty state (max_num_seqs = none)
    sampled: jax.Array  # [S] bool the row's token is kept (penalty counts)
    step: jax.Array  # [S] i32 index of the token being sampled among the generated ones


def empty_inputs(T: int, S: int, pages: int, no_slot: int) -> StepInputs:
    """A step's inputs with no sequence in it (warm-up): every row padding."""
    return StepInputs(tokens=np.zeros(T, np.int32), prev_index=np.full(T, -1, np.int32),
                      positions=np.full(T, -1, np.int32), slot_mapping=np.full(T, -1, np.int32),
                      next_ids=np.full(T, -1, np.int32), kv_lens=np.zeros(S, np.int32),
                      page_indices=np.zeros((S, pages), np.int32), cu_q_lens=np.zeros(S + 1, np.int32),
                      num_seqs=np.int32(0), logits_at=np.zeros(S, np.int32), slots=np.full(S, no_slot, np.int32),
                      sampled=np.zeros(S, bool), step=np.zeros(S, np.int32))


@flax.struct.dataclass
class StepWire:
    """StepInputs and SamplingArrays (less its bitmask) as two int32 arrays, and the logit bias."""

    per_token: jax.Array  # [len(TOKEN_FIELDS), T]
    per_seq: jax.Array  # [S, len(SEQ_COLUMNS) + pages]: the columns below, then the page table
    # [S, BIAS_COLUMNS]: token ids (-1 = padding), then their biases' f32 bits (0 on padding).
    # None from to_wire when no row has a bias; a step's program always gets one (runner.py).
    bias: jax.Array | None = None

    @property
    def num_tokens(self) -> int:
        return self.per_token.shape[1]

    @property
    def next_ids(self) -> jax.Array:
        return self.per_token[TOKEN_FIELDS.index("next_ids")]


TOKEN_FIELDS = ("tokens", "prev_index", "positions", "slot_mapping", "next_ids")
# Per sequence row, (field, its dtype): StepInputs' fields as they are, then SamplingArrays'.
INPUT_ROWS = (("kv_lens", np.int32), ("logits_at", np.int32), ("slots", np.int32), ("sampled", np.bool_),
              ("step", np.int32))
SAMPLING_ROWS = (("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32), ("min_p", np.float32),
                 ("repetition_penalty", np.float32), ("presence_penalty", np.float32),
                 ("frequency_penalty", np.float32), ("greedy", np.bool_))
# The per-sequence array's columns, then the page table: cu_q_lens is stored without its leading
# 0, num_seqs as a column of one value, the seed [S, 2] as two columns.
SEQ_COLUMNS = (*INPUT_ROWS, ("cu_q_lens", np.int32), ("num_seqs", np.int32), *SAMPLING_ROWS,
               ("seed", np.uint32), ("seed_lo", np.uint32))
BIAS_COLUMNS = 2 * MAX_LOGIT_BIAS


def no_bias(S: int) -> np.ndarray:
    """The bias array of a step where no row has one: [S, BIAS_COLUMNS], every entry padding."""
    return np.concatenate([np.full((S, MAX_LOGIT_BIAS), -1, np.int32), np.zeros((S, MAX_LOGIT_BIAS), np.int32)],
                          axis=1)


def to_wire(inputs: StepInputs, sampling: SamplingArrays) -> StepWire:
    """Host arrays -> the two int32 arrays (NumPy; bit-exact, floats included)."""
    S = len(inputs.kv_lens)
    values = {**{name: getattr(inputs, name) for name, _ in INPUT_ROWS},
              **{name: getattr(sampling, name) for name, _ in SAMPLING_ROWS},
              "cu_q_lens": np.asarray(inputs.cu_q_lens)[1:], "num_seqs": np.full(S, inputs.num_seqs),
              "seed": np.asarray(sampling.seed)[:, 0], "seed_lo": np.asarray(sampling.seed)[:, 1]}
    columns = [_bits(np.asarray(values[name], dtype)) for name, dtype in SEQ_COLUMNS]
    per_seq = np.concatenate([np.stack(columns, axis=1), np.asarray(inputs.page_indices, np.int32)], axis=1)
    per_token = np.stack([np.asarray(getattr(inputs, f), np.int32) for f in TOKEN_FIELDS])
    bias = None
    if sampling.bias_ids is not None:
        bias = np.concatenate([np.asarray(sampling.bias_ids, np.int32),
                               _bits(np.asarray(sampling.bias_values, np.float32))], axis=1)
    return StepWire(per_token, per_seq, bias)


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.int32) if x.dtype.itemsize == 4 else x.astype(np.int32)


def from_wire(wire: StepWire, allowed: jax.Array | None = None) -> tuple[StepInputs, SamplingArrays]:
    """The two arrays -> StepInputs and SamplingArrays (inside a jitted program)."""
    col = {name: _typed(wire.per_seq[:, i], dtype) for i, (name, dtype) in enumerate(SEQ_COLUMNS)}
    tok = dict(zip(TOKEN_FIELDS, wire.per_token))
    inputs = StepInputs(**tok, **{name: col[name] for name, _ in INPUT_ROWS},
                        page_indices=wire.per_seq[:, len(SEQ_COLUMNS):],
                        cu_q_lens=jnp.concatenate([jnp.zeros(1, jnp.int32), col["cu_q_lens"]]),
                        num_seqs=col["num_seqs"][0])
    bias_ids = bias_values = None
    if wire.bias is not None:
        bias_ids = wire.bias[:, :MAX_LOGIT_BIAS]
        bias_values = jax.lax.bitcast_convert_type(wire.bias[:, MAX_LOGIT_BIAS:], jnp.float32)
    sampling = SamplingArrays(**{name: col[name] for name, _ in SAMPLING_ROWS},
                              seed=jnp.stack([col["seed"], col["seed_lo"]], axis=1), allowed=allowed,
                              bias_ids=bias_ids, bias_values=bias_values)
    return inputs, sampling


def _typed(x: jax.Array, dtype) -> jax.Array:
    if dtype == np.bool_:
        return x != 0
    return x if dtype == np.int32 else jax.lax.bitcast_convert_type(x, dtype)
