"""Orbax checkpoints (python -m mistral_jax.convert): converted, restored into a mesh, the same
model as the source, bit for bit; FP8 stays FP8; any mesh; clear errors."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mistral_jax.entrypoints.convert import convert, main
from mistral_jax.loading.checkpoint import CheckpointError, OrbaxCheckpoint, open_checkpoint
from mistral_jax.loading.weights import load_weights, param_sharding, saved_params
from mistral_jax.runtime.sharding import make_mesh

from helpers.checkpoints import make_tiny_fp8_hf_checkpoint
from helpers.models import V3_TOKENIZER, dense_logits


@pytest.fixture(scope="module")
def orbax_dir(tiny_checkpoints, tmp_path_factory):
    """The tiny f32 Mistral checkpoint, converted through the CLI."""
    dst = tmp_path_factory.mktemp("orbax") / "tiny"
    assert main([str(tiny_checkpoints[0]), str(dst), "--dtype", "float32"]) == 0
    return dst


@pytest.fixture(scope="module")
def source_logits(tiny_checkpoints, tokens):
    return dense_logits(load_weights(open_checkpoint(tiny_checkpoints[0]), jnp.float32, progress=False), tokens)


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_restore_gives_the_same_logits(orbax_dir, source_logits, tokens, tiny_cfg):
    ckpt = open_checkpoint(orbax_dir)
    assert isinstance(ckpt, OrbaxCheckpoint) and ckpt.config == tiny_cfg and ckpt.quantization is None
    assert (orbax_dir / "tokenizer.model.v3").is_file()
    np.testing.assert_array_equal(dense_logits(load_weights(ckpt, jnp.float32, make_mesh()), tokens), source_logits)


@pytest.mark.slow
def test_llm_loads_orbax_like_safetensors(orbax_dir, tiny_checkpoints):
    from mistral_jax import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=6)
    kw = dict(dtype="float32", num_pages=32, max_num_seqs=2, progress=False)
    ref = LLM(model=str(tiny_checkpoints[0]), **kw).generate(["Hello world"], params)[0]
    out = LLM(model=str(orbax_dir), **kw).generate(["Hello world"], params)[0]
    assert out.prompt_token_ids == ref.prompt_token_ids and out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_restore_onto_another_mesh(orbax_dir, tiny_checkpoints, source_logits, tokens):
    """Saved from one device, restored onto dp=2 x tp=2: every array carries the new mesh's
    sharding, and the logits are those of the safetensors load on that mesh."""
    mesh = make_mesh(dp=2, tp=2)
    model = load_weights(open_checkpoint(orbax_dir), jnp.float32, mesh)
    state = nnx.state(model, nnx.Param)
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        assert var[...].sharding == param_sharding(mesh, var)
    assert model.layers.attention.wqkv[...].sharding.spec[1] == "tp"  # heads really split
    logits = dense_logits(model, tokens)
    on_mesh = load_weights(open_checkpoint(tiny_checkpoints[0]), jnp.float32, mesh, progress=False)
    np.testing.assert_array_equal(logits, dense_logits(on_mesh, tokens))
    np.testing.assert_allclose(logits, source_logits, rtol=1e-5, atol=1e-5)  # only the sum order differs


def test_fp8_checkpoint_stays_fp8(tiny_checkpoints, tmp_path, tokens):
    """An FP8 (compressed-tensors) checkpoint converts to e4m3 weights + scales, restored as such."""
    src = tmp_path / "fp8"
    make_tiny_fp8_hf_checkpoint(src, tiny_checkpoints[1])
    shutil.copy(V3_TOKENIZER, src / "tokenizer.model.v3")
    dst = convert(src, tmp_path / "orbax", dtype="float32", progress=False)
    ckpt = open_checkpoint(dst)
    assert ckpt.quantization == "fp8"
    model = load_weights(ckpt, jnp.float32, make_mesh())
    ref = load_weights(open_checkpoint(src), jnp.float32, progress=False)
    assert model.layers.attention.wqkv.quant[...].dtype == jnp.float8_e4m3fn
    assert model.layers.feed_forward.w2.scale[...].shape == ref.layers.feed_forward.w2.scale[...].shape
    for a, b in zip(_params(model), _params(ref), strict=True):
        assert a.dtype == b.dtype
        assert np.array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    np.testing.assert_array_equal(dense_logits(model, tokens), dense_logits(ref, tokens))


def test_quantize_at_conversion(tiny_checkpoints, tmp_path, tokens):
    """--quantization fp8 on a 16/32-bit source: the model LLM(quantization="fp8") would load."""
    dst = convert(tiny_checkpoints[0], tmp_path / "q", dtype="float32", quantization="fp8", progress=False)
    model = load_weights(open_checkpoint(dst), jnp.float32, make_mesh())
    ref = load_weights(open_checkpoint(tiny_checkpoints[0]), jnp.float32, quantization="fp8", progress=False)
    assert model.layers.attention.wo.quant[...].dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(dense_logits(model, tokens), dense_logits(ref, tokens))


def test_fp8_wanted_from_a_16bit_conversion(orbax_dir):
    with pytest.raises(CheckpointError, match="--quantization fp8"):
        load_weights(open_checkpoint(orbax_dir), jnp.float32, make_mesh(), quantization="fp8")


def test_gguf_tokenizer_travels(tmp_path):
    """A GGUF file's tokenizer and chat template, written as tokenizer.json & co., read back the same."""
    from mistral_jax.loading.default_model import default_model_path
    from mistral_jax.tokenizer import HFTokenizer, load_tokenizer

    src = HFTokenizer.from_gguf(default_model_path())
    src.save(tmp_path)
    back = load_tokenizer(tmp_path)
    text = "Hello <|im_start|> world, ünïcode 123\n  spaces"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    assert back.encode(text) == src.encode(text) and back.encode(text, add_bos=False) == src.encode(text, add_bos=False)
    assert back.encode_chat(chat) == src.encode_chat(chat)
    assert back.stop_token_ids == src.stop_token_ids and (back.bos_id, back.eos_id) == (src.bos_id, src.eos_id)
    ids = src.encode(text)
    assert back.decode(ids) == src.decode(ids)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="Orbax checkpoint"):
        open_checkpoint(tmp_path)


def test_unfinished_or_foreign_orbax_dir(tmp_path, orbax_dir):
    broken = tmp_path / "broken"
    shutil.copytree(orbax_dir, broken)
    shutil.rmtree(broken / "weights")
    with pytest.raises(CheckpointError, match="no weights/ directory"):
        open_checkpoint(broken)
    meta = json.loads((orbax_dir / "mistral_jax.json").read_text())
    (broken / "mistral_jax.json").write_text(json.dumps(meta | {"format": "something-else"}))
    with pytest.raises(CheckpointError, match="expected 'mistral_jax-orbax'"):
        open_checkpoint(broken)
    (broken / "mistral_jax.json").write_text(json.dumps(meta | {"version": 99}))
    with pytest.raises(CheckpointError, match="format version 99, newer"):
        open_checkpoint(broken)


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_version_1_checkpoints_still_restore(tiny_checkpoints, tmp_path, tokens, tiny_cfg, quantization):
    """A conversion by an earlier mistral_jax (format version 1) held q, k, v as three arrays
    wq, wk, wv [layers, heads, ...]. Written here as such from the checkpoint's own tensors, it
    restores (on one device and on tp=2) to the model the source loads to."""
    import orbax.checkpoint as ocp

    src = tiny_checkpoints[0]
    ref = load_weights(open_checkpoint(src), jnp.float32, quantization=quantization, progress=False)
    state = saved_params(ref)  # the saved layout: an FP8 weight's scale as <name>_scale
    attention, weights = state["layers"]["attention"], tiny_checkpoints[2]
    for name in ("wqkv", "wqkv_scale"):
        attention.pop(name, None)
    for part, heads in (("wq", tiny_cfg.n_heads), ("wk", tiny_cfg.n_kv_heads), ("wv", tiny_cfg.n_kv_heads)):
        w = np.stack([weights[f"layers.{i}.attention.{part}.weight"] for i in range(tiny_cfg.n_layers)])
        w = w.reshape(tiny_cfg.n_layers, heads, tiny_cfg.head_dim, tiny_cfg.dim)  # [layers, heads, head_dim, embed]
        if quantization:
            from pallas_kernels.fp8_matmul import quantize_weight

            q, scale = quantize_weight(jnp.asarray(w.reshape(-1, tiny_cfg.dim)))
            attention[part] = q.reshape(w.shape)
            attention[part + "_scale"] = scale.reshape(w.shape[:-1])
        else:
            attention[part] = jnp.asarray(w)
    dst = tmp_path / "v1"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((dst / "weights").absolute(), state)
    (dst / "mistral_jax.json").write_text(json.dumps({
        "format": "mistral_jax-orbax", "version": 1, "config": dataclasses.asdict(tiny_cfg), "dtype": "float32",
        "quantization": quantization}))
    want = dense_logits(ref, tokens)
    for mesh in (make_mesh(), make_mesh(tp=2)):
        model = load_weights(open_checkpoint(dst), jnp.float32, mesh)
        for a, b in zip(_params(model), _params(ref), strict=True):
            np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
        np.testing.assert_allclose(dense_logits(model, tokens), want, rtol=1e-5, atol=1e-5)
