"""GGUF (llama.cpp) files, memory-mapped: config from the metadata, tensors dequantized one at a
time, or only the part a device holds (quantized blocks are read by rows and whole blocks).

Layout: GGUF records ggml's dims (ne: innermost first), so a Linear weight's numpy shape is the
reverse, [out, in] -- the canonical layout. llama.cpp's converter undoes Hugging Face's rotary
row permutation for the llama architecture (ggml's normal rope rotates adjacent pairs), so q/k
rows are already in Mistral's interleaved order: checked in tests/test_checkpoint.py against the
state dict transformers reads from the same file.
"""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np

from mistral_jax.config import ModelConfig, gguf_keys
from mistral_jax.gguf_file import open_gguf
from mistral_jax.loading.checkpoint.base import Checkpoint, CheckpointError, Entry, rename_to_canonical

# Architectures whose q/k rows are stored in the interleaved (canonical) order.
SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_LAYER_NAMES = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")
_INTEGER_TYPES = ("I8", "I16", "I32", "I64")


def canonical_name(gguf_name: str) -> str:
    """GGUF tensor name -> canonical name (unknown names unchanged, to fail validation)."""
    return rename_to_canonical(gguf_name, _GLOBAL_NAMES, _LAYER, _LAYER_NAMES)


def read_tensor(tensor, shape: tuple[int, ...], index: tuple[slice, ...] = ()) -> np.ndarray:
    """A GGUF tensor as an array of `shape` (or only its part `index`, slices of that shape):
    float types as stored, quantized ones dequantized to f32.

    A quantized tensor is stored as rows of blocks (`block` values in `block_bytes` bytes, along
    the innermost axis), so a part is read by itself: its rows, and within them the bytes of the
    blocks its columns cover (a tp shard's columns are whole blocks; others are cut after)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    from mistral_jax.loading.checkpoint.gguf_dequant import dequantize

    if tensor.tensor_type in (Q.F32, Q.F16, Q.F64):
        return np.array(tensor.data.reshape(shape)[index]) if index else tensor.data.reshape(shape)
    if tensor.tensor_type == Q.BF16:
        data = tensor.data.view(ml_dtypes.bfloat16).reshape(shape)
        return np.array(data[index]) if index else data
    if not index:
        return dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    block, block_bytes = GGML_QUANT_SIZES[tensor.tensor_type]
    raw = tensor.data.reshape(*shape[:-1], -1)  # [..., blocks * block_bytes] u8
    cols = index[-1].indices(shape[-1]) if len(index) == len(shape) else (0, shape[-1], 1)
    first, last = cols[0] // block, -(-cols[1] // block)  # the blocks the columns touch
    part = raw[(*index[:len(shape) - 1], slice(first * block_bytes, last * block_bytes))]
    values = dequantize(np.ascontiguousarray(part), tensor.tensor_type)  # [..., (last - first) * block]
    return values[..., cols[0] - first * block: cols[1] - first * block: cols[2]]


class GGUFCheckpoint(Checkpoint):
    format = "gguf"

    def __init__(self, file: Path):
        self.file = open_gguf(file)  # parsed once (the tokenizer shares it); tensors memory-mapped
        meta = self.file.metadata
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f'{file}: GGUF "general.architecture" is {arch!r}, expected one of '
                                  f"{SUPPORTED_ARCHITECTURES}. Fix: load a GGUF of a supported architecture")
        tensors = {t.name: t for t in self.file.tensors}
        embedding = tensors.get("token_embd.weight")
        if embedding is None or len(embedding.shape) != 2:
            raise CheckpointError(f"{file}: no 2-D tensor 'token_embd.weight' (the embedding). Fix: re-download it, "
                                  "or convert the model again with llama.cpp's convert_hf_to_gguf.py")
        config = ModelConfig.from_gguf_metadata(meta, vocab_size=int(embedding.shape[1]),
                                                tied_embeddings="output.weight" not in tensors, source=file)
        super().__init__(file, config, file, gguf_keys(arch))

    def _entries(self, stack):
        for t in self.file.tensors:
            shape = tuple(int(n) for n in reversed(t.shape))  # ggml's ne, innermost first
            dtype = t.tensor_type.name
            yield Entry(
                self.path, t.name, canonical_name(t.name), shape, dtype,
                kind="other" if dtype in _INTEGER_TYPES else "float",  # quantized types dequantize to float
                nbytes=int(t.n_bytes),
                read=lambda t=t, shape=shape: read_tensor(t, shape),
                read_slice=lambda index, t=t, shape=shape: read_tensor(t, shape, index),
            )
