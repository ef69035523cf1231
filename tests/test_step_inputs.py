"""A step's host arrays as two int32 arrays (step_inputs.py): what the program takes apart is,
bit for bit, what the host packed."""

import jax
import numpy as np

from mistral_jax.engine.step_inputs import StepInputs, empty_inputs, from_wire, to_wire
from mistral_jax.sample.sampling import SamplingArrays, SamplingParams


def _random_step(rng, T=16, S=8, pages=5):
    i32 = lambda *shape: rng.integers(-2**31, 2**31, size=shape, dtype=np.int64).astype(np.int32)  # noqa: E731
    cu = np.concatenate([[0], np.sort(rng.integers(0, T, size=S))]).astype(np.int32)
    inputs = StepInputs(tokens=i32(T), prev_index=i32(T), positions=i32(T), slot_mapping=i32(T), next_ids=i32(T),
                        kv_lens=i32(S), page_indices=i32(S, pages), cu_q_lens=cu, num_seqs=np.int32(5),
                        logits_at=i32(S), slots=i32(S), sampled=rng.random(S) < 0.5, step=i32(S))
    params = [SamplingParams(temperature=float(rng.uniform(0.1, 2)), top_k=int(rng.integers(0, 50)),
                             top_p=float(rng.uniform(0.1, 1)), min_p=float(rng.uniform(0, 0.3)),
                             repetition_penalty=float(rng.uniform(0.5, 2)), presence_penalty=float(rng.uniform(-2, 2)),
                             frequency_penalty=float(rng.uniform(-2, 2)), seed=int(rng.integers(0, 2**63)))
              for _ in range(S - 2)] + [SamplingParams(temperature=0.0)]  # a greedy row, then a padding row
    return inputs, SamplingArrays.from_params(params, pad_to=S)


def _assert_same(got, want):
    for name in want.__dataclass_fields__:
        a, b = getattr(want, name), getattr(got, name)
        if a is None:
            assert b is None, name
            continue
        b = np.asarray(b)
        assert b.dtype == np.asarray(a).dtype and b.shape == np.shape(a), (name, b.dtype, b.shape)
        np.testing.assert_array_equal(b.reshape(-1).view(np.uint8), np.asarray(a).reshape(-1).view(np.uint8),
                                      err_msg=name)  # the same bits


def test_the_program_unpacks_what_the_host_packed():
    inputs, sampling = _random_step(np.random.default_rng(0))
    wire = to_wire(inputs, sampling)
    assert wire.per_token.dtype == wire.per_seq.dtype == np.int32 and wire.num_tokens == 16
    got_inputs, got_sampling = jax.jit(from_wire)(wire)
    _assert_same(got_inputs, inputs)
    _assert_same(got_sampling, sampling)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda w: w.next_ids)(wire)), inputs.next_ids)


def test_an_empty_step_and_the_grammar_mask_pass_through():
    inputs = empty_inputs(T=4, S=1, pages=3, no_slot=8)
    sampling = SamplingArrays.from_params([], pad_to=1)
    allowed = np.full((1, 2), -1, np.int32)
    got_inputs, got_sampling = from_wire(to_wire(inputs, sampling), allowed)
    _assert_same(got_inputs, inputs)
    _assert_same(got_sampling, SamplingArrays.from_params([], pad_to=1, allowed=allowed))
