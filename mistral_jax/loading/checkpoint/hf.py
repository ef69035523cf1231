"""Hugging Face format: config.json + model*.safetensors (Mistral and Llama architectures).

Names differ, and transformers' conversion script reorders each head's q/k rows: Mistral's
rotary rotates interleaved pairs (x0, x1), (x2, x3), ...; HF's rotate_half rotates (x_i, x_{i+d/2}),
so HF stores a head's rows as [even rows..., odd rows...]. We undo that to get canonical rows.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mistral_jax.config import HF_KEYS, ModelConfig, read_json
from mistral_jax.loading.checkpoint.base import (
    Checkpoint,
    CheckpointError,
    rename_to_canonical,
    safetensors_entries,
    safetensors_header,
)
from mistral_jax.loading.checkpoint.quantization import parse_compressed_tensors

SUPPORTED_MODEL_TYPES = ("mistral", "llama")
INDEX = "model.safetensors.index.json"

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm": "attention_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
# Older Llama conversions saved the rotary frequencies as a buffer; the model computes them.
_KNOWN_EXTRA = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def canonical_name(hf_name: str) -> str:
    """HF tensor name -> canonical name (unknown names unchanged, to fail validation)."""
    return rename_to_canonical(hf_name, _GLOBAL_NAMES, _LAYER, _LAYER_NAMES)


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's q/k row order -> Mistral's, along axis 0: per head, rows [x_0..x_{d/2-1}, x_{d/2}..x_{d-1}]
    become interleaved pairs (x_0, x_{d/2}), (x_1, x_{d/2+1}), ..."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files: those the index names, else model.safetensors, else model-*-of-*."""
    index = directory / INDEX
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(f, str) for f in weight_map.values())):
            raise CheckpointError(f'{index}: no "weight_map" of tensor names to file names. Fix: re-download it')
        files = [directory / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not (f.exists() or f.is_symlink()):  # a broken link is reported when read, as one
                raise CheckpointError(f"{index} lists {f.name}, which does not exist. Fix: download it too")
        return files
    single = directory / "model.safetensors"
    if single.exists() or single.is_symlink():
        return [single]
    return sorted(directory.glob("model-*-of-*.safetensors"))


class HFCheckpoint(Checkpoint):
    format = "hf"

    def __init__(self, directory: Path):
        config_path = directory / "config.json"
        hf_config = read_json(config_path)
        model_type = hf_config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(f'{config_path}: "model_type" is {model_type!r}, expected one of '
                                  f"{SUPPORTED_MODEL_TYPES}. Fix: load a checkpoint of a supported architecture")
        config = ModelConfig.from_hf_config(hf_config, source=config_path)
        super().__init__(directory, config, config_path, HF_KEYS)
        if "quantization_config" in hf_config:
            try:
                self.quantization = parse_compressed_tensors(hf_config["quantization_config"], str(config_path))
            except (AttributeError, TypeError):  # a part of it that is not the JSON object it should be
                raise CheckpointError(f"{config_path}: quantization_config is malformed (a part of it is not a "
                                      "JSON object). Fix: re-download it, or re-export the checkpoint") from None
        self.files = weight_files(directory)
        if not self.files:
            raise CheckpointError(
                f"{directory}: has config.json but no weights: looked for model.safetensors, or "
                f"model-0000N-of-0000M.safetensors with {INDEX}"
            )
        for file in self.files:  # each file's layout, from its header: a damaged one fails here, naming itself
            safetensors_header(file)

    def _rename(self, hf_name: str) -> str | None:
        if _KNOWN_EXTRA.match(hf_name) or (hf_name == "lm_head.weight" and self.config.tied_embeddings):
            return None  # a tied checkpoint may still carry a copy of the embedding as lm_head
        return canonical_name(hf_name)

    def _unpermute(self, name: str, w: np.ndarray) -> np.ndarray:
        # An FP8 weight's scale rows [out, 1] follow its weight's rows. The permutation acts within
        # each head, so a slice of whole heads (a tp shard) is un-permuted on its own.
        if name.endswith(("attention.wq.weight", "attention.wq.weight_scale",
                          "attention.wk.weight", "attention.wk.weight_scale")):
            if w.shape[0] % self.config.head_dim:
                raise ValueError(f"{name}: a slice of {w.shape[0]} rows is not whole heads of {self.config.head_dim}")
            return unpermute_rotary(w, w.shape[0] // self.config.head_dim)
        return w

    def _entries(self, stack):
        for file in self.files:
            yield from safetensors_entries(stack, file, self._rename, self._unpermute)
