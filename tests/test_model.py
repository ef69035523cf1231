"""Logits and greedy tokens against Hugging Face transformers on the same random weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mistral_jax.cache.kv_cache import DenseKVCache
from mistral_jax.loading.checkpoint import open_checkpoint
from mistral_jax.loading.weights import load_weights

from helpers.checkpoints import hf_model_from_dir
from helpers.models import dense_logits


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def our_logits(path, tokens, dtype):
    return dense_logits(load_weights(open_checkpoint(str(path)), dtype, progress=False), tokens)


@pytest.fixture(scope="module")
def hf_reference(tiny_checkpoints, tokens):
    hf = hf_model_from_dir(tiny_checkpoints[1])
    with torch.no_grad():
        return hf(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("fmt", ["mistral", "hf"])
def test_logits_f32_match_transformers(tiny_checkpoints, tokens, hf_reference, fmt):
    path = tiny_checkpoints[0] if fmt == "mistral" else tiny_checkpoints[1]
    assert rel_err(our_logits(path, tokens, jnp.float32), hf_reference) <= 1e-5


@pytest.mark.parametrize("fmt", ["mistral", "hf"])
def test_logits_bf16_match_transformers(tiny_checkpoints, tokens, fmt):
    path = tiny_checkpoints[0] if fmt == "mistral" else tiny_checkpoints[1]
    hf = hf_model_from_dir(tiny_checkpoints[1]).to(torch.bfloat16)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    assert rel_err(our_logits(path, tokens, jnp.bfloat16), ref) <= 2e-2


def test_input_major_layout_matches_transformers(tiny_checkpoints, tokens, hf_reference):
    """The layout the CPU serves from (projections.prefers_input_major): every 16-bit projection
    stored [layers, in..., out...], logical axes moved along; the same logits as transformers."""
    model = load_weights(open_checkpoint(str(tiny_checkpoints[1])), jnp.float32, progress=False)
    att = model.layers.attention
    axes_of = lambda p: tuple(p.get_metadata()["logical_axes"])  # noqa: E731
    wo, axes = att.wo[...], axes_of(att.wo)  # [layers, embed, heads, head_dim]
    assert model.to_input_major() is model and att.input_major and model.layers.feed_forward.input_major
    np.testing.assert_array_equal(att.wo[...], jnp.transpose(wo, (0, 2, 3, 1)))
    assert axes_of(att.wo) == (axes[0], axes[2], axes[3], axes[1])
    assert att.wqkv[...].shape[1] == model.cfg.dim
    assert model.layers.feed_forward.w2[...].shape[1] == model.cfg.hidden_dim
    assert model.head_input_major and model.output[...].shape == (model.cfg.dim, model.cfg.vocab_size)
    assert axes_of(model.output) == ("embed", "vocab")
    model.to_input_major()  # a second call changes nothing
    np.testing.assert_array_equal(att.wo[...], jnp.transpose(wo, (0, 2, 3, 1)))
    assert rel_err(dense_logits(model, tokens), hf_reference) <= 1e-5
    from mistral_jax.loading.checkpoint.orbax import save

    with pytest.raises(ValueError, match="to_input_major"):  # checkpoints keep [out, in]
        save(model, tiny_checkpoints[1].parent / "never_written", jnp.float32)


def test_tied_head_input_major_matches_transformers(tmp_path, tiny_cfg, tokens):
    """A tied head (SmolLM2-style, the default model) stored [embed, vocab]: the embedding lookup
    takes its columns; the same logits as transformers, before and after."""
    import dataclasses

    from helpers.checkpoints import make_tiny_hf_checkpoint, make_tiny_mistral_checkpoint

    cfg = dataclasses.replace(tiny_cfg, tied_embeddings=True)
    make_tiny_hf_checkpoint(tmp_path / "hf", make_tiny_mistral_checkpoint(tmp_path / "m", cfg, seed=4), cfg)
    with torch.no_grad():
        ref = hf_model_from_dir(tmp_path / "hf")(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    model = load_weights(open_checkpoint(str(tmp_path / "hf")), jnp.float32, progress=False)
    assert rel_err(dense_logits(model, tokens), ref) <= 1e-5
    table = model.tok_embeddings[...]
    model.to_input_major()
    np.testing.assert_array_equal(model.tok_embeddings[...], table.T)
    assert rel_err(dense_logits(model, tokens), ref) <= 1e-5


def test_incremental_decode_equals_full_forward(tiny_checkpoints, tokens):
    """Prefill in two chunks through the cache gives the logits of one full pass."""
    model = load_weights(open_checkpoint(str(tiny_checkpoints[0])), jnp.float32, progress=False)
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    full, _ = model(jnp.asarray(tokens), pos, DenseKVCache.init(model.cfg, b, 64, jnp.float32))
    cache = DenseKVCache.init(model.cfg, b, 64, jnp.float32)
    first, cache = model(jnp.asarray(tokens[:, :20]), pos[:, :20], cache)
    rest, _ = model(jnp.asarray(tokens[:, 20:]), pos[:, 20:], cache)
    assert rel_err(np.concatenate([first, rest], axis=1), full) <= 1e-5


@pytest.mark.parametrize("fmt", ["mistral", "hf"])
@pytest.mark.slow
def test_32_greedy_tokens_identical_f32(tiny_checkpoints, fmt):
    from mistral_jax import LLM, SamplingParams

    path = tiny_checkpoints[0] if fmt == "mistral" else tiny_checkpoints[1]
    hf = hf_model_from_dir(tiny_checkpoints[1])
    llm = LLM(model=str(path), dtype="float32", progress=False)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(5, 32768, size=n).tolist() for n in (5, 17, 40)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert out.outputs[0].token_ids == ref[0, len(p):].tolist()
