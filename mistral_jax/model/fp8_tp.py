"""FP8 projections on a tp mesh: the Pallas kernel once per shard, under `shard_map`.

XLA cannot partition a Pallas call, and its own fp8 dot is the slow path at decode sizes
(docs/performance.md), so each device runs the kernel on its own part of the weight:

- column-parallel (wqkv, w1, w3: the output axis split over tp): every device multiplies
  the whole x by its rows of w; y comes out split like those rows. A layer's w1 and w3 share
  one launch per shard, as on one device (q, k, v are one weight already).
- row-parallel (wo, w2: the input axis split): x arrives split the same way. A token's scale
  needs the max over its whole row, so each device takes its part's max and a pmax over tp
  gives all of them the row's scale; each quantizes its part with it (exactly what one device
  quantizing the whole row would do), multiplies, and a psum adds the f32 partial products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pallas_kernels.fp8_matmul import fp8_matmul, fp8_matmul_group, quantize_rows

TP = "tp"


def fp8_linear_tp(x: jax.Array, w: jax.Array, w_scale: jax.Array, layer, *, split: str, mesh: Mesh,
                  impl: str, out_dtype) -> jax.Array:
    """fp8_matmul(x [m, k], w [n, k] or stacked [layers, n, k] at `layer`) with w split over the
    mesh's tp axis along its output rows (split="out") or its input columns (split="in")."""
    if split == "out":
        return fp8_linear_group_tp(x, (w,), (w_scale,), layer, mesh=mesh, impl=impl, out_dtype=out_dtype)[0]
    if split != "in":
        raise ValueError(f"split={split!r}: 'out' (column-parallel) or 'in' (row-parallel)")
    stacked = layer is not None
    lead = (None,) if stacked else ()

    def local(x, w, s, layer):  # x [m, k/tp], w [.., n, k/tp] -> partial y [m, n], summed
        x_q, x_scale = quantize_rows(x, row_max=lambda amax: jax.lax.pmax(amax, TP))
        y = fp8_matmul(x_q, w, s, layer=layer if stacked else None, x_scale=x_scale, impl=impl,
                       out_dtype=jnp.float32)
        return jax.lax.psum(y, TP).astype(out_dtype)

    in_specs = (P(None, TP), P(*lead, None, TP), P(*lead, None), P())
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(None, None),
                         check_vma=False)(x, w, w_scale, _layer_index(layer))


def fp8_linear_group_tp(x: jax.Array, ws, w_scales, layer, *, mesh: Mesh, impl: str, out_dtype) -> tuple:
    """Column-parallel projections of one x (a layer's q, k, v; w1, w3; or just one): every
    device multiplies the whole x [m, k] by its rows of each weight [.., n_g/tp, k], all of them
    in one kernel launch per shard where the kernel groups (fp8_matmul_group). y_g [m, n_g] comes
    out split like the rows."""
    stacked, g = layer is not None, len(ws)
    lead = (None,) if stacked else ()

    def local(x, layer, *weights_then_scales):
        return fp8_matmul_group(x, weights_then_scales[:g], weights_then_scales[g:],
                                layer=layer if stacked else None, impl=impl, out_dtype=out_dtype)

    in_specs = (P(None, None), P(), *(P(*lead, TP, None),) * g, *(P(*lead, TP),) * g)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(P(None, TP),) * g,
                         check_vma=False)(x, _layer_index(layer), *ws, *w_scales)


def _layer_index(layer) -> jax.Array:
    return jnp.asarray(0 if layer is None else layer, jnp.int32)
