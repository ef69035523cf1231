"""W8A8 FP8 matmul as a Pallas TPU kernel; spec: `fp8_matmul.py`.

Design. Activations are quantized per row by the same jnp step as the reference
(`quantize_rows`, bit-identical; the row amax spans all of K, which one grid step never sees).
x_q, w and the scales are zero-padded outside the kernel to block multiples (zero k columns
contribute exact zeros; padded rows / columns are sliced off), so the kernel has no masks.
Grid (m blocks, n blocks, k blocks), k innermost and "arbitrary": an f32 VMEM scratch
accumulates dot(x_q, w.T) across k; the last k step applies both scales to the f32 sum and
casts once to out_dtype. The blocks are upcast to bf16 before the dot (e4m3 values are exact in
bf16 and their products exact in f32), so chips without an fp8 MXU (v5e) run it too.
Weights whose n, k are already multiples of the blocks (pad them at load time) are not copied.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .fp8_matmul import quantize_rows

__all__ = ["fp8_matmul_tpu", "plan"]


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


def _kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, acc_ref):
    # x_ref: [bm, bk] e4m3, xs_ref: [bm, 1] f32, w_ref: [bn, bk] e4m3, ws_ref: [1, bn] f32,
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
def _fp8_matmul(x, w, w_scale, *, out_dtype, interpret, bm, bn, bk):
    m, k = x.shape
    n = w.shape[0]
    mp, np_, kp = _round_up(m, bm), _round_up(n, bn), _round_up(k, bk)
    x_q, x_scale = quantize_rows(x)  # [m, k] e4m3, [m, 1] f32
    x_q = jnp.pad(x_q, ((0, mp - m), (0, kp - k)))
    x_scale = jnp.pad(x_scale, ((0, mp - m), (0, 0)))
    w = jnp.pad(w, ((0, np_ - n), (0, kp - k)))  # no-op for block-aligned weights
    ws = jnp.pad(w_scale.astype(jnp.float32), (0, np_ - n))[None, :]  # [1, Np]
    cp = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    out = pl.pallas_call(
        _kernel,
        grid=(mp // bm, np_ // bn, kp // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kb: (i, kb)),
                  pl.BlockSpec((bm, 1), lambda i, j, kb: (i, 0)),
                  pl.BlockSpec((bn, bk), lambda i, j, kb: (j, kb)),
                  pl.BlockSpec((1, bn), lambda i, j, kb: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kb: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=cp(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret_arg(interpret),
        name="fp8_matmul_tpu",
    )(x_q, x_scale, w, ws)
    return out[:m, :n]


def fp8_matmul_tpu(x: jax.Array, w: jax.Array, w_scale: jax.Array, *, out_dtype=jnp.bfloat16,
                   interpret: bool = False, **blocks) -> jax.Array:
    """y [m, n] = quant(x [m, k]) @ (w [n, k] e4m3 * w_scale [n]).T through Pallas TPU.
    `interpret=True` runs in TPU interpret mode (CPU). `blocks`: bm / bn / bk overrides."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or w_scale.shape != (w.shape[0],):
        raise ValueError(f"fp8 matmul shapes: x {x.shape}, w {w.shape} (want [n, k]), "
                         f"w_scale {w_scale.shape} (want [n])")
    if w.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"w must be float8_e4m3fn, got {w.dtype}")
    cfg = {**plan(x.shape[0], w.shape[0], x.shape[1]), **blocks}
    return _fp8_matmul(x, w, w_scale, out_dtype=jnp.dtype(out_dtype), interpret=bool(interpret),
                       **cfg)
