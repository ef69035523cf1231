"""Tiny random checkpoints on disk, in Mistral's and in Hugging Face's format, holding the same weights
(and in GGUF, for the loader's checks).

The Hugging Face copy is produced by transformers itself (its model class saves it) and its q/k
rows are reordered by transformers' own `PermuteForRope` (the Mistral -> HF rotary permutation its
conversion mapping uses), not by code of ours, so reading it back checks our un-permutation.
(transformers 5 no longer ships convert_mistral_weights_to_hf.py; PermuteForRope is its successor.)
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from mistral_jax.config import ModelConfig
from mistral_jax.loading.checkpoint import expected_shapes

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def random_weights(cfg: ModelConfig, seed: int, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Canonical weights with sane activations: Linear ~ N(0, 0.05^2), norms ~ 1 + N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            w = 0.05 * rng.standard_normal(shape)
        weights[name] = w.astype(NP_DTYPES[dtype])
    return weights


def _split(names: list[str], shards: int) -> list[list[str]]:
    return [list(chunk) for chunk in np.array_split(np.array(names), shards)]


def make_tiny_mistral_checkpoint(directory, cfg: ModelConfig, seed: int, dtype: str = "float32",
                                 shards: int = 1) -> dict[str, np.ndarray]:
    """params.json + consolidated.safetensors (or consolidated-0000N-of-0000M.safetensors when
    shards > 1). Returns the canonical weights written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = random_weights(cfg, seed, dtype)
    (directory / "params.json").write_text(json.dumps(cfg.to_mistral_params(), indent=2))
    if shards == 1:
        save_file(weights, str(directory / "consolidated.safetensors"))
    else:
        for i, names in enumerate(_split(list(weights), shards)):
            file = directory / f"consolidated-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: weights[n] for n in names}, str(file))
    return weights


# Canonical name parts -> llama.cpp's GGUF tensor names (checkpoint/gguf.py reads them back).
_GGUF_GLOBAL = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                "output.weight": "output.weight"}
_GGUF_LAYER = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
               "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
               "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}


def make_tiny_gguf_checkpoint(file, cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """A llama-architecture .gguf of random f32 weights, written by the gguf package's writer:
    config metadata, no tokenizer. q/k rows stay in the canonical interleaved order, as
    llama.cpp's converter leaves them. Returns the canonical weights written."""
    import gguf

    weights = random_weights(cfg, seed)
    w = gguf.GGUFWriter(str(file), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    for name, array in weights.items():
        if name in _GGUF_GLOBAL:
            gguf_name = _GGUF_GLOBAL[name]
        else:
            _, layer, rest = name.split(".", 2)
            gguf_name = f"blk.{layer}.{_GGUF_LAYER[rest.removesuffix('.weight')]}.weight"
        w.add_tensor(gguf_name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def hf_config(cfg: ModelConfig):
    """A transformers config for `cfg`: MistralConfig, or LlamaConfig for tied embeddings (SmolLM2-style)."""
    import transformers

    common = dict(
        hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.hidden_dim,
        vocab_size=cfg.vocab_size, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tied_embeddings,
    )
    if cfg.tied_embeddings:
        return transformers.LlamaConfig(**common)
    return transformers.MistralConfig(sliding_window=None, **common)


def to_hf_state_dict(weights: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """Canonical weights -> HF names and q/k row order (as float32 torch tensors)."""
    import torch
    from transformers import PermuteForRope

    def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
        # transformers' interleaved -> rotate_half permutation; it reads the head count from a config.
        return PermuteForRope()._permute_for_rope(w, types.SimpleNamespace(num_attention_heads=n_heads))

    hf_names = {
        "attention_norm": "input_layernorm", "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
        "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
    }
    out = {}
    for name, w in weights.items():
        t = torch.from_numpy(np.asarray(w, np.float32))
        if name == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "norm.weight":
            out["model.norm.weight"] = t
        elif name == "output.weight":
            out["lm_head.weight"] = t
        else:
            _, layer, rest = name.split(".", 2)
            module = rest.removesuffix(".weight")
            if module == "attention.wq":
                t = permute(t, cfg.n_heads)
            elif module == "attention.wk":
                t = permute(t, cfg.n_kv_heads)
            out[f"model.layers.{layer}.{hf_names[module]}.weight"] = t
    if cfg.tied_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def make_tiny_hf_checkpoint(directory, canonical_weights: dict[str, np.ndarray], cfg: ModelConfig,
                            dtype: str = "float32", shards: int = 1) -> None:
    """The same weights as a Hugging Face checkpoint, saved by transformers (config.json +
    model.safetensors, or model-0000N-of-0000M.safetensors + index when shards > 1)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg))
    model.load_state_dict(to_hf_state_dict(canonical_weights, cfg), strict=True)
    model = model.to(getattr(torch, dtype))
    total = sum(w.size for w in canonical_weights.values()) * np.dtype(NP_DTYPES[dtype]).itemsize
    model.save_pretrained(directory, max_shard_size=total // shards + 1 if shards > 1 else "50GB")


def hf_model_from_dir(directory):
    """The transformers model of an HF checkpoint directory, in float32 and eval mode."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def make_tiny_fp8_hf_checkpoint(directory, hf_dir) -> None:
    """The HF checkpoint in `hf_dir` quantized by the compressed-tensors package to llm-compressor's
    FP8_DYNAMIC format (e4m3 weights + weight_scale [out, 1], dynamic per-token activations,
    lm_head ignored). The weight scales are amax/448 per output channel, which is what
    llm-compressor's min-max observer computes for this scheme (the package leaves the observer
    step to llm-compressor, which this fixture does not need)."""
    import torch
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme

    model = hf_model_from_dir(hf_dir)
    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                amax = module.weight.abs().amax(dim=1, keepdim=True)  # [out, 1]
                module.weight_scale.copy_((amax / 448.0).to(module.weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(directory)  # writes quantization_config into config.json


def hf_fp8_model_dequantized(directory):
    """transformers' own load of a compressed-tensors checkpoint, decompressed to f32 weights."""
    import torch
    import transformers

    qcfg = transformers.CompressedTensorsConfig(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, quantization_config=qcfg).eval()
