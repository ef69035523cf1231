"""W8A8 FP8 matmul as a Pallas TPU kernel; spec: `reference.py`.

Design. Activations are quantized per row by the same jnp step as the reference
(`quantize_rows`, bit-identical; the row amax spans all of K, which one grid step never sees).
x_q, w and the scales are zero-padded outside the kernel to block multiples (zero k columns
contribute exact zeros; padded rows / columns are sliced off), so the kernel has no masks.
Grid (m blocks, n blocks, k blocks), k innermost and "arbitrary": an f32 VMEM scratch
accumulates dot(x_q, w.T) across k; the last k step applies both scales to the f32 sum and
casts once to out_dtype. The blocks are upcast to bf16 before the dot (e4m3 values are exact in
bf16 and their products exact in f32), so chips without an fp8 MXU (v5e) run it too.
Weights whose n, k are already multiples of the blocks (pad them at load time) are not copied.
Stacked weights [layers, n, k] are read in place: the layer index is a scalar-prefetch operand
that the weight's index map uses, so no layer is sliced out (and copied) before the call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.fp8_matmul.common import check_stacked
from pallas_kernels.fp8_matmul.reference import quantize_unless

__all__ = ["fp8_matmul_tpu", "plan", "vmem_bytes"]


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _interpret_arg(interpret: bool):
    if not interpret:
        return False
    return pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True


def plan(m: int, n: int, k: int) -> dict:
    """Block sizes: 8-bit operands tile as (32, 128) on TPU, so bm is a multiple of 32 and
    bn, bk multiples of 128; caps keep the double-buffered blocks a few MiB of VMEM."""
    return dict(bm=min(256, _round_up(m, 32)), bn=min(512, _round_up(n, 128)),
                bk=min(512, _round_up(k, 128)))


def vmem_bytes(bm: int, bn: int, bk: int, out_dtype=jnp.bfloat16) -> int:
    """VMEM of one grid step: the double-buffered x, x-scale, w, w-scale and output blocks, the f32
    accumulator, and the bf16 copies of the x and w blocks the dot takes. Kept under each TPU
    generation's scoped VMEM limit by a test."""
    blocks = bm * bk + bm * 4 + bn * bk + bn * 4 + bm * bn * jnp.dtype(out_dtype).itemsize
    return 2 * blocks + bm * bn * 4 + 2 * (bm * bk + bn * bk)


def _kernel(layer_ref, x_ref, xs_ref, w_ref, ws_ref, o_ref, acc_ref):
    # layer_ref: [1] i32 in SMEM (used by the index maps), x_ref: [bm, bk] e4m3, xs_ref: [bm, 1] f32,
    # w_ref: [bn, bk] e4m3 (of layer layer_ref[0]), ws_ref: [1, bn] f32,
    # o_ref: [bm, bn] out_dtype, acc_ref: [bm, bn] f32 scratch.
    kb = pl.program_id(2)

    @pl.when(kb == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    x = x_ref[...].astype(jnp.bfloat16)
    w = w_ref[...].astype(jnp.bfloat16)
    acc_ref[...] += jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    @pl.when(kb == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = (acc_ref[...] * xs_ref[...] * ws_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "bm", "bn", "bk"))
def _fp8_matmul(x, x_scale, w, w_scale, layer, *, out_dtype, interpret, bm, bn, bk):
    # w: [layers, n, k], w_scale: [layers, n], layer: [] i32
    m, k = x.shape
    n = w.shape[1]
    mp, np_, kp = _round_up(m, bm), _round_up(n, bn), _round_up(k, bk)
    x_q, x_scale = quantize_unless(x, x_scale)  # [m, k] e4m3, [m, 1] f32
    x_q = jnp.pad(x_q, ((0, mp - m), (0, kp - k)))
    x_scale = jnp.pad(x_scale, ((0, mp - m), (0, 0)))
    w = jnp.pad(w, ((0, 0), (0, np_ - n), (0, kp - k)))  # no-op for block-aligned weights
    ws = jnp.pad(jax.lax.dynamic_index_in_dim(w_scale, layer, keepdims=False).astype(jnp.float32),
                 (0, np_ - n))[None, :]  # [1, Np], that layer's
    cp = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    squeezed = pl.Squeezed() if hasattr(pl, "Squeezed") else None  # the layer axis of w's block
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(mp // bm, np_ // bn, kp // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kb, layer_ref: (i, kb)),
                  pl.BlockSpec((bm, 1), lambda i, j, kb, layer_ref: (i, 0)),
                  pl.BlockSpec((squeezed, bn, bk), lambda i, j, kb, layer_ref: (layer_ref[0], j, kb)),
                  pl.BlockSpec((1, bn), lambda i, j, kb, layer_ref: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kb, layer_ref: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
    )
    out = pl.pallas_call(
        _kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=cp(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret_arg(interpret),
        name="fp8_matmul_tpu",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), x_q, x_scale, w, ws)
    return out[:m, :n]


def fp8_matmul_tpu(x: jax.Array, w: jax.Array, w_scale: jax.Array, *, layer=None, x_scale=None,
                   out_dtype=jnp.bfloat16, interpret: bool = False, **blocks) -> jax.Array:
    """y [m, n] = quant(x [m, k]) @ (w [n, k] e4m3 * w_scale [n]).T through Pallas TPU; or, with
    `layer`, w [layers, n, k] and w_scale [layers, n], layer `layer` read in place.
    x_scale [m, 1]: x is already e4m3 (see fp8_matmul).
    `interpret=True` runs in TPU interpret mode (CPU). `blocks`: bm / bn / bk overrides."""
    w, w_scale, layer = check_stacked(x, w, w_scale, layer)
    cfg = {**plan(x.shape[0], w.shape[1], x.shape[1]), **blocks}
    return _fp8_matmul(x, x_scale, w, w_scale, layer, out_dtype=jnp.dtype(out_dtype), interpret=bool(interpret),
                       **cfg)
