"""FP8 projections on a tp mesh: the Pallas kernel once per shard, under `shard_map`.

XLA cannot partition a Pallas call, and its own fp8 dot is the slow path at decode sizes
(benchmarks/NOTES.md), so each device runs the kernel on its own part of the weight:

- column-parallel (wq, wk, wv, w1, w3: the output axis split over tp): every device multiplies
  the whole x by its rows of w; y comes out split like those rows.
- row-parallel (wo, w2: the input axis split): x arrives split the same way. A token's scale
  needs the max over its whole row, so each device takes its part's max and a pmax over tp
  gives all of them the row's scale; each quantizes its part with it (exactly what one device
  quantizing the whole row would do), multiplies, and a psum adds the f32 partial products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels.fp8_matmul import fp8_matmul, quantize_rows

TP = "tp"


def fp8_linear_tp(x: jax.Array, w: jax.Array, w_scale: jax.Array, layer, *, split: str, mesh: Mesh,
                  impl: str, out_dtype) -> jax.Array:
    """fp8_matmul(x [m, k], w [n, k] or stacked [layers, n, k] at `layer`) with w split over the
    mesh's tp axis along its output rows (split="out") or its input columns (split="in")."""
    stacked = layer is not None
    lead = (None,) if stacked else ()
    layer = jnp.asarray(layer if stacked else 0, jnp.int32)

    def kernel(x, w, s, layer, **kw):
        return fp8_matmul(x, w, s, layer=layer if stacked else None, impl=impl, **kw)

    if split == "out":
        def local(x, w, s, layer):  # x [m, k], w [.., n/tp, k] -> y [m, n/tp]
            return kernel(x, w, s, layer, out_dtype=out_dtype)

        specs = (P(None, None), P(*lead, TP, None), P(*lead, TP), P()), P(None, TP)
    elif split == "in":
        def local(x, w, s, layer):  # x [m, k/tp], w [.., n, k/tp] -> partial y [m, n], summed
            x_q, x_scale = quantize_rows(x, row_max=lambda amax: jax.lax.pmax(amax, TP))
            y = kernel(x_q, w, s, layer, x_scale=x_scale, out_dtype=jnp.float32)
            return jax.lax.psum(y, TP).astype(out_dtype)

        specs = (P(None, TP), P(*lead, None, TP), P(*lead, None), P()), P(None, None)
    else:
        raise ValueError(f"split={split!r}: 'out' (column-parallel) or 'in' (row-parallel)")
    in_specs, out_specs = specs
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(x, w, w_scale, layer)
