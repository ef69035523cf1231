"""Shared by the two-GPU FP8 tests and their one-process-per-GPU worker: the model, the prompts
and one greedy engine run (tokens and each token's logprob)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mistral_jax.config import ModelConfig
from mistral_jax.engine.engine import Engine, EngineConfig
from mistral_jax.sample.sampling import SamplingParams
from mistral_jax.tokenizer import Tokenizer

# Mistral-Small-2501's real shapes: over tp=2 its FP8 w1, w3 and w2 stacks are 3.36 GB per GPU,
# the 2-4 GiB range where Pallas's Triton lowering overflowed its i32 offsets (issue 22).
CFG = ModelConfig.named("mistral-small-2501")
STEPS = 32
SEED = 7


class IdsOnly(Tokenizer):
    bos_id, eos_id, stop_token_ids = 1, 2, frozenset()

    def decode(self, ids, skip_special_tokens=True):
        return ""


def prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, CFG.vocab_size, size=length).tolist() for _ in range(batch)]


def greedy(model, mesh, batch: list[list[int]], steps: int = STEPS):
    """The engine's greedy tokens [batch][steps] and their logprobs, prefix cache off."""
    config = EngineConfig(max_model_len=8192, num_pages=1400, max_num_seqs=64, max_num_batched_tokens=4096,
                          enable_prefix_caching=False)
    engine = Engine(model, IdsOnly(), mesh, config)
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, logprobs=1)
    for i, p in enumerate(batch):
        engine.add_request(p, params, index=i)
    tokens, logprobs = [[] for _ in batch], [[] for _ in batch]
    for ev in engine.run():
        tokens[ev.index].append(ev.token_id)
        logprobs[ev.index].append(ev.logprobs[ev.token_id])
    return tokens, logprobs


DTYPE = jnp.bfloat16
