"""GGUF's simple block formats dequantized by XLA on the host CPU; the gguf package otherwise.

The gguf package's numpy dequantization (the reference: tests/test_gguf_file.py) took 1.5 s of
the default model's 2.3 s weight load on a 2-core CPU (Q4_1: numpy temporaries over groups of 16
rows). One fused XLA program per tensor shape reads each block once and writes f32 once, on
every core; its compilations stay in the persistent cache like the engine's.

Blocks of 32 values (ggml-common.h), little-endian:
- Q8_0: d (f16), 32 x int8 q:              v = d * q
- Q4_0: d (f16), 16 bytes of 4-bit q:      v = d * (q - 8)
- Q4_1: d (f16), m (f16), 16 bytes of q:   v = d * q + m
  4-bit q: byte j holds value j in its low nibble and value j + 16 in its high one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 32
# name -> (block bytes, scale fields (f16) before the quants)
FORMATS = {"Q8_0": (34, 1), "Q4_0": (18, 1), "Q4_1": (20, 2)}


def dequantize(raw: np.ndarray, kind) -> np.ndarray:
    """raw [..., n_blocks * block_bytes] uint8 of the ggml type `kind` (a GGMLQuantizationType)
    -> [..., n_blocks * 32] f32."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend in this process (JAX_PLATFORMS without cpu)
        cpu = None
    if kind.name not in FORMATS or cpu is None:
        from gguf.quants import dequantize as reference

        return reference(raw, kind)
    with jax.default_device(cpu):
        return np.asarray(_dequantize(np.ascontiguousarray(raw), kind.name))


@functools.partial(jax.jit, static_argnames="kind")
def _dequantize(raw, kind: str):
    block_bytes, n_scales = FORMATS[kind]
    blocks = raw.reshape(*raw.shape[:-1], -1, block_bytes)  # [..., n_blocks, block_bytes]
    scales = jax.lax.bitcast_convert_type(blocks[..., : 2 * n_scales].reshape(*blocks.shape[:-1], n_scales, 2),
                                          jnp.float16).astype(jnp.float32)  # [..., n_blocks, n_scales]
    d = scales[..., :1]
    qs = blocks[..., 2 * n_scales:]
    if kind == "Q8_0":
        values = d * jax.lax.bitcast_convert_type(qs, jnp.int8).astype(jnp.float32)
    else:
        q = jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(jnp.float32)  # [..., n_blocks, 32]
        values = d * (q - 8) if kind == "Q4_0" else d * q + scales[..., 1:]
    return values.reshape(*raw.shape[:-1], -1)
