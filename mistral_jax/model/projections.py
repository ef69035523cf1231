"""Every projection of the model; its weight's type picks the product.

A projection weight is one of two types, fixed when the model is built (Transformer's
`quantization`) and never tested for anywhere else:

- `nnx.Param` (16/32-bit): values [(layers,) out..., in...], the checkpoints' layout, or
  [(layers,) in..., out...] once moved for serving (its `input_major` metadata; see
  Transformer.to_input_major). XLA's dot.
- `Fp8Weight` (W8A8): e4m3 values [(layers,) out..., in...] and one f32 scale per output
  channel [(layers,) out...], multiplied by pallas_kernels.fp8_matmul's `impl` (kernels.py
  chooses it) on the 2-D view [tokens, in] x [out, in], the activations quantized per token.

    y = linear(eq, x, w, layer)                 x [batch, seq, in...] -> y [batch, seq, out...]
    ys = linears(eq, x, (w1, w3), layer)        one x, several weights: one launch where it can
    h = fused_input(x, into, norm=..., ...)     the op producing x, in the form `into` takes it
    h = swiglu(x, w1, w3, layer, into=w2)       silu(x @ w1) * (x @ w3), in the form w2 takes it

FP8 specifics, all here:
- stacked weights [layers, out..., in...] are read at the layer index in place (a Pallas call
  cannot take a slice as a view; see Transformer.hidden);
- on a tp mesh the Pallas kernels run once per shard (fp8_tp.py);
- x may come quantized per token already (`QuantizedRows`), by the kernel that also ran the op
  producing it (the RMSNorm; SwiGLU's silu(gate) * up), where that saves kernels and costs no
  copy (`_fused_impl`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mistral_jax.model.kernels import fp8_per_shard, prefers_input_major
from mistral_jax.runtime.sharding import LOGICAL_RULES, constrain, current_mesh, mesh_size
from pallas_kernels.activations import rms_norm, silu_mul

__all__ = ["Fp8Param", "Fp8Weight", "QuantizedRows", "linear", "linears", "fused_input", "swiglu",
           "is_input_major", "prefers_input_major"]


class Fp8Param(nnx.Param):
    """An Fp8Weight's arrays. Their own type so that the layer loop can hand them to every layer
    whole (Transformer.hidden: the kernel reads the layer in place)."""


class Fp8Weight(nnx.Module):
    """A projection weight quantized W8A8: `quant` [(layers,) out..., in...] float8_e4m3fn and
    `scale` [(layers,) out...] f32, one per output channel (w = quant * scale). `impl`: the
    fp8_matmul implementation that multiplies by it (kernels.Kernels.fp8).

    Its arrays flatten in the order (quant, scale), the order of the former `w` and `w_scale`
    parameters, so a model's state keeps its leaf order."""

    def __init__(self, quant: jax.Array, scale: jax.Array, axes: tuple[str | None, ...], impl: str = "auto"):
        n_in = quant.ndim - scale.ndim
        self.quant = Fp8Param(quant, logical_axes=tuple(axes))
        self.scale = Fp8Param(scale, logical_axes=tuple(axes[:-n_in]))
        self.impl = impl


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedRows:
    """An FP8 projection's input already quantized per token, by the kernel that also ran the op
    producing it (fp8_matmul.quantize_input: the RMSNorm, or SwiGLU's silu(gate) * up): one
    launch where XLA would run several small kernels at every decode step."""

    q: jax.Array  # [batch, seq, in] float8_e4m3fn
    scale: jax.Array  # [batch, seq, 1] f32
    dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True))  # the projections' output dtype

    @property
    def shape(self):
        return self.q.shape


def is_input_major(param: nnx.Param) -> bool:
    """Whether a 16-bit weight is stored [(layers,) in..., out...] (Transformer.to_input_major)."""
    return bool(param.get_metadata().get("input_major", False))


# --------------------------------------------------------------------------------------------
# Products
# --------------------------------------------------------------------------------------------


def linear(eq: str, x: jax.Array | QuantizedRows, w: nnx.Param | Fp8Weight,
           layer: jax.Array | None = None) -> jax.Array:
    """x [batch, seq, in...] times w -> [batch, seq, out...]: the einsum `eq` (written for the
    [out..., in...] layout) on a 16-bit weight, the W8A8 kernel on an Fp8Weight. `layer` picks
    the layer of an Fp8Weight that holds every layer (one rank more than `eq` says)."""
    return linears(eq, x, (w,), layer)[0]


def linears(eq: str, x: jax.Array | QuantizedRows, weights, layer: jax.Array | None = None) -> list[jax.Array]:
    """linear() of one x with several weights (a layer's w1 and w3): FP8 ones in one kernel
    launch where the kernel can (decode's small projections are bound by per-launch cost), also
    per shard when tp splits all of them column-parallel; 16-bit ones one einsum each."""
    if not all(isinstance(w, Fp8Weight) for w in weights):
        return [_dense(eq, x, w[...], is_input_major(w)) if not isinstance(w, Fp8Weight) else linear(eq, x, w, layer)
                for w in weights]
    stacked = weights[0].quant[...].ndim == len(eq.split(",")[1].split("->")[0]) + 1
    return _fp8_group(x, weights, layer if stacked else None)


def _dense(eq: str, x: jax.Array, weight: jax.Array, input_major: bool = False) -> jax.Array:
    """A 16-bit projection. On XLA:CPU (prefers_input_major) it takes the 2-D view, [in, out]
    for an input-major weight, else [out, in]: that dot with two output dims (q: [heads,
    head_dim]) or two contracted ones (o) ran several times slower (docs/performance.md).
    Other backends keep the einsum (cuBLAS and the TPU handle it)."""
    ins, w_sub = eq.split("->")[0].split(",")
    n_in = len(ins) - 2  # x: [batch, seq, in...]; weight: [out..., in...] (or [in..., out...])
    k = math.prod(x.shape[2:])
    x2 = x.reshape(*x.shape[:2], k)
    if input_major:
        y = jnp.einsum("bsi,io->bso", x2, weight.reshape(k, -1))
        return y.reshape(*x.shape[:2], *weight.shape[n_in:])
    if not prefers_input_major():
        return jnp.einsum(eq, x, weight)
    assert w_sub.endswith(ins[2:]), f"{eq}: the weight's last dims must be x's input dims"
    y = jnp.einsum("bsi,oi->bso", x2, weight.reshape(-1, k))
    return y.reshape(*x.shape[:2], *weight.shape[: weight.ndim - n_in])


def _fp8_group(x: jax.Array | QuantizedRows, weights: tuple[Fp8Weight, ...], layer) -> list[jax.Array]:
    """FP8 products of one x [batch, seq, in] (or QuantizedRows) with `weights`, each
    [(layers,) out..., in...] (with `layer`: the stacks, read at `layer` in place)."""
    from pallas_kernels.fp8_matmul import fp8_matmul_group

    x2, x_scale, (b, s), dtype = _tokens(x)
    impl = weights[0].impl
    mesh = current_mesh()
    views = [_kernel_view(w, layer) for w in weights]
    ws, w_scales = [v[0] for v in views], [v[1] for v in views]
    if mesh_size(mesh, "tp") == 1 or not fp8_per_shard(impl):  # the jnp twins: XLA partitions them
        ys = fp8_matmul_group(x2, ws, w_scales, layer=layer, x_scale=x_scale, impl=impl, out_dtype=dtype)
    elif all(_tp_split(w) == "out" for w in weights):
        from mistral_jax.model.fp8_tp import fp8_linear_group_tp

        assert x_scale is None, "fp8_tp quantizes x itself (_fused_impl is None on a tp mesh)"
        ys = fp8_linear_group_tp(x2, ws, w_scales, layer, mesh=mesh, impl=impl, out_dtype=dtype)
    else:
        return [_fp8_one(x, w, layer) for w in weights]
    return [y.reshape(b, s, *v[2]) for y, v in zip(ys, views)]


def _fp8_one(x: jax.Array | QuantizedRows, w: Fp8Weight, layer) -> jax.Array:
    """One FP8 product; on a tp mesh the Pallas kernels run once per shard (fp8_tp.py), split
    on the side tp splits (the weight's logical axes); the jnp twins are left to XLA's
    partitioner."""
    from pallas_kernels.fp8_matmul import fp8_matmul

    x2, x_scale, (b, s), dtype = _tokens(x)
    q, q_scale, out_shape = _kernel_view(w, layer)
    mesh = current_mesh()
    split = _tp_split(w) if fp8_per_shard(w.impl) else None
    if split and mesh_size(mesh, "tp") > 1:
        from mistral_jax.model.fp8_tp import fp8_linear_tp

        assert x_scale is None, "fp8_tp quantizes x itself (_fused_impl is None on a tp mesh)"
        y = fp8_linear_tp(x2, q, q_scale, layer, split=split, mesh=mesh, impl=w.impl, out_dtype=dtype)
    else:
        y = fp8_matmul(x2, q, q_scale, layer=layer, x_scale=x_scale, impl=w.impl, out_dtype=dtype)
    return y.reshape(b, s, *out_shape)


def _tokens(x) -> tuple[jax.Array, jax.Array | None, tuple[int, int], jnp.dtype]:
    """x [batch, seq, in...] or QuantizedRows -> (x [tokens, in], x_scale [tokens, 1] or None,
    (batch, seq), the output dtype)."""
    b, s = x.shape[:2]
    if isinstance(x, QuantizedRows):
        return x.q.reshape(b * s, -1), x.scale.reshape(b * s, 1), (b, s), x.dtype
    return x.reshape(b * s, -1), None, (b, s), x.dtype


def _kernel_view(w: Fp8Weight, layer):
    """An Fp8Weight [(layers,) out..., in...] as the kernel's w [(layers,) n, k], its scale as
    w_scale [(layers,) n], and the out... shape to give y back."""
    quant, scale = w.quant[...], w.scale[...]
    if layer is None:
        return quant.reshape(scale.size, -1), scale.reshape(-1), scale.shape
    num_layers = scale.shape[0]
    return (quant.reshape(num_layers, -1, quant.size // scale.size), scale.reshape(num_layers, -1),
            scale.shape[1:])


def _tp_split(w: Fp8Weight) -> str | None:
    """Which side of a projection the tp axis splits, from its weight's logical axes
    [(layers,) out..., in...]: "out", "in", or None (tp splits neither)."""
    axes = tuple(w.quant.logical_axes)
    n_in = w.quant[...].ndim - w.scale[...].ndim
    on_tp = lambda names: any(LOGICAL_RULES.get(a) == "tp" for a in names)  # noqa: E731
    return "out" if on_tp(axes[:-n_in]) else "in" if on_tp(axes[-n_in:]) else None


# --------------------------------------------------------------------------------------------
# The ops that produce a projection's input, fused with its quantization where it pays
# --------------------------------------------------------------------------------------------


def fused_input(x: jax.Array, into, *, norm: jax.Array | None = None, eps: float = 0.0,
                layer: jax.Array | None = None) -> jax.Array | QuantizedRows:
    """h = rms_norm(x, norm, eps) [batch, seq, in] (x itself without `norm`) in the form the
    projections `into` take it: quantized per token by the kernel that normalizes (QuantizedRows)
    where they are FP8 and that fuses (_fused_impl), else h. With `layer`, a norm [layers, in]
    holds every layer's scale and layer `layer` applies."""
    impl = _fused_impl(x, into)
    stacked = norm is not None and norm.ndim == 2
    if impl is not None:
        return _quantized_rows(x, impl, norm=norm, eps=eps, layer=layer if stacked else None)
    if norm is None:
        return x
    return rms_norm(x, jax.lax.dynamic_index_in_dim(norm, layer, keepdims=False) if stacked else norm, eps)


def swiglu(x: jax.Array | QuantizedRows, w1, w3, layer: jax.Array | None, *, into) -> jax.Array | QuantizedRows:
    """SwiGLU's hidden activation silu(x @ w1) * (x @ w3) [batch, seq, hidden], in the form the
    projection `into` (w2) takes it. FP8 weights that fuse: quantized per token, on the GPU's
    decode path both products and silu_mul in one kernel (fp8_matmul.fp8_swiglu)."""
    impl = _fused_impl(x, (w1, w3, into))
    if impl is not None:
        from pallas_kernels.fp8_matmul import fp8_swiglu

        x2, x_scale, (b, s), dtype = _tokens(x)
        (q1, s1, _), (q3, s3, _) = _kernel_view(w1, layer), _kernel_view(w3, layer)
        q, scale = fp8_swiglu(x2, q1, q3, s1, s3, layer=layer, x_scale=x_scale, impl=impl, out_dtype=dtype)
        return QuantizedRows(q.reshape(b, s, -1), scale.reshape(b, s, 1), dtype)
    gate, up = linears("bse,fe->bsf", x, (w1, w3), layer)
    impl = _fused_impl(up, (into,))
    if impl is not None:  # silu(gate) * up inside the quantizer
        return _quantized_rows(up, impl, gate=gate)
    return constrain(silu_mul(gate, up), ("batch", "seq", "mlp"))


def _fused_impl(x: jax.Array, into) -> str | None:
    """The fp8_matmul impl that quantizes x [batch, seq, in] for the projections `into` together
    with the op producing x, or None where that does not pay: unless all of them are FP8, on one
    tp shard (with tp > 1, fp8_tp quantizes each shard's part with a row max across shards), and
    no kernel pads x's rows (quantizing inside the product pads in the same launch; quantized
    before, x would be copied once more: fp8_matmul.pads_rows)."""
    from pallas_kernels.fp8_matmul import pads_rows

    if not into or not all(isinstance(w, Fp8Weight) for w in into) or mesh_size(current_mesh(), "tp") > 1:
        return None
    m = x.shape[0] * x.shape[1]
    for w in into:  # stacked: quant [layers, out..., in...], scale [layers, out...]
        n, k = math.prod(w.scale.shape[1:]), math.prod(w.quant.shape[len(w.scale.shape):])
        if pads_rows(m, n, k, w.impl):
            return None
    return into[0].impl


def _quantized_rows(x: jax.Array, impl: str, *, norm: jax.Array | None = None, eps: float = 0.0,
                    gate: jax.Array | None = None, layer: jax.Array | None = None) -> QuantizedRows:
    """x [batch, seq, in] -> QuantizedRows of x, rms_norm(x, norm, eps) or silu_mul(gate, x);
    with `layer`, norm is every layer's [layers, in] and layer `layer` applies."""
    from pallas_kernels.fp8_matmul import quantize_input

    b, s, k = x.shape
    q, scale = quantize_input(x.reshape(b * s, k), norm=norm, eps=eps,
                              gate=None if gate is None else gate.reshape(b * s, k), layer=layer, impl=impl)
    return QuantizedRows(q.reshape(b, s, k), scale.reshape(b, s, 1), x.dtype)
