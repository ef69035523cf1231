"""Every projection of the model: a 16-bit einsum, or the FP8 W8A8 kernel.

FP8 projections run on the 2-D view [tokens, in] x [out, in] through pallas_kernels.fp8_matmul:
- stacked weights [layers, out..., in...] are read at the layer index in place (a Pallas call
  cannot take a slice as a view; see Transformer.__call__);
- on a tp mesh the kernel runs once per shard (fp8_tp.py);
- x may come quantized per token already (`QuantizedRows`), by the kernel that also ran the op
  producing it (the RMSNorm; SwiGLU's silu(gate) * up), where that saves kernels and costs no
  copy (`fuses_quantization`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mistral_jax.runtime.sharding import LOGICAL_RULES, current_mesh, mesh_size


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


def quantized_rows(x: jax.Array, impl: str, *, norm: jax.Array | None = None, eps: float = 0.0,
                   gate: jax.Array | None = None, layer: jax.Array | None = None) -> QuantizedRows:
    """x [batch, seq, in] -> QuantizedRows of x, rms_norm(x, norm, eps) or silu_mul(gate, x);
    with `layer`, norm is every layer's [layers, in] and layer `layer` applies."""
    from pallas_kernels.fp8_matmul import quantize_input

    b, s, k = x.shape
    q, scale = quantize_input(x.reshape(b * s, k), norm=norm, eps=eps,
                              gate=None if gate is None else gate.reshape(b * s, k), layer=layer, impl=impl)
    return QuantizedRows(q.reshape(b, s, k), scale.reshape(b, s, 1), x.dtype)


def swiglu_rows(x: jax.Array | QuantizedRows, w1: tuple[jax.Array, jax.Array], w3: tuple[jax.Array, jax.Array],
                impl: str, layer: jax.Array | None = None) -> QuantizedRows:
    """SwiGLU's silu(x @ w1) * (x @ w3), quantized per token for an FP8 w2: x [batch, seq, in] (or
    QuantizedRows), w1, w3 FP8 (weight [(layers,) hidden, in], scale [(layers,) hidden]); with
    `layer`, stacks read in place. On the GPU's decode path one kernel runs both products and
    silu_mul (fp8_matmul.fp8_swiglu). One tp shard only (see fuses_quantization)."""
    from pallas_kernels.fp8_matmul import fp8_swiglu

    x2, x_scale, (b, s), dtype = _tokens(x)
    (w1, s1, _), (w3, s3, _) = _kernel_view(*w1, layer), _kernel_view(*w3, layer)
    q, scale = fp8_swiglu(x2, w1, w3, s1, s3, layer=layer, x_scale=x_scale, impl=impl, out_dtype=dtype)
    return QuantizedRows(q.reshape(b, s, -1), scale.reshape(b, s, 1), dtype)


def fuses_quantization(x: jax.Array, impl: str, *projections) -> bool:
    """Whether stacked projections (weight [layers, out..., in...], scale [layers, out...] or
    None) of x [batch, seq, in] take QuantizedRows: all FP8, on one tp shard (with tp > 1,
    fp8_tp quantizes each shard's part with a row max across shards), and no kernel pads x's
    rows (quantizing inside the product pads in the same launch; quantized before, x would be
    copied once more: fp8_matmul.pads_rows)."""
    from pallas_kernels.fp8_matmul import pads_rows

    if any(sc is None for _, sc in projections) or mesh_size(current_mesh(), "tp") > 1:
        return False
    m = x.shape[0] * x.shape[1]
    return not any(pads_rows(m, sc.size // sc.shape[0], w.size // sc.size, impl)
                   for w, sc in projections)


def _tokens(x) -> tuple[jax.Array, jax.Array | None, tuple[int, int], jnp.dtype]:
    """x [batch, seq, in...] or QuantizedRows -> (x [tokens, in], x_scale [tokens, 1] or None,
    (batch, seq), the output dtype)."""
    b, s = x.shape[:2]
    if isinstance(x, QuantizedRows):
        return x.q.reshape(b * s, -1), x.scale.reshape(b * s, 1), (b, s), x.dtype
    return x.reshape(b * s, -1), None, (b, s), x.dtype


def prefers_input_major(platform: str | None = None) -> bool:
    """Whether 16-bit projections run faster stored [in..., out...] (x @ w) than as checkpoints
    store them, [out..., in...] (x @ w.T): on XLA:CPU. Its product at 8 rows with [out, in]
    weights ran ~50 GFLOP/s; stored [in, out] the default model's batch-8 decode went 109 -> 128
    tok/s (engine against engine, 12 alternating rounds, each round 1.14-1.23x in the machine's
    quiet stretches), batch 1 within 2% (probes/probe_cpu_io_layout.py, benchmarks/NOTES.md).
    GPUs and TPUs run the checkpoints' layout (cuBLAS and the TPU take either)."""
    return (platform or jax.default_backend()) == "cpu"


def linear(eq: str, x: jax.Array | QuantizedRows, weight: jax.Array, scale: jax.Array | None, impl: str = "auto",
           layer: jax.Array | None = None, axes: tuple[str | None, ...] = (), input_major: bool = False) -> jax.Array:
    """Every projection: x [batch, seq, in...] times weight [out..., in...] -> [batch, seq, out...]
    (16-bit weights stored `input_major`: weight [in..., out...], the same product).

    16-bit weights: the einsum `eq`. FP8 weights (scale [out...] given): the W8A8 kernel on the
    2-D view [tokens, in] x [out, in], activations quantized per token inside it (or before it:
    x as QuantizedRows). With `layer`, an FP8 weight is the whole stack [layers, out..., in...]
    (scale [layers, out...]) and the kernel reads that layer in place (see Transformer.__call__).

    On a mesh with tp > 1 the Pallas kernels run once per shard (fp8_tp.py); which side tp
    splits comes from the weight's logical `axes`. The jnp twins ("reference", "xla") are left
    to XLA's partitioner."""
    if scale is None:
        return _dense(eq, x, weight, input_major)
    from pallas_kernels.fp8_matmul import fp8_matmul

    x2, x_scale, (b, s), dtype = _tokens(x)
    w, w_scale, out_shape = _kernel_view(weight, scale, layer)
    mesh = current_mesh()
    split = _tp_split(axes[-weight.ndim:], weight.ndim - scale.ndim) if impl not in ("reference", "xla") else None
    if split and mesh_size(mesh, "tp") > 1:
        from mistral_jax.model.fp8_tp import fp8_linear_tp

        assert x_scale is None, "fp8_tp quantizes x itself (fuses_quantization is False on a tp mesh)"
        y = fp8_linear_tp(x2, w, w_scale, layer, split=split, mesh=mesh, impl=impl, out_dtype=dtype)
    else:
        y = fp8_matmul(x2, w, w_scale, layer=layer, x_scale=x_scale, impl=impl, out_dtype=dtype)
    return y.reshape(b, s, *out_shape)


def _dense(eq: str, x: jax.Array, weight: jax.Array, input_major: bool = False) -> jax.Array:
    """A 16-bit projection. On XLA:CPU a dot with two output dims (q: [heads, head_dim]) or two
    contracted ones (o) ran 5-9x slower than the same product on a 2-D view (demo model, one
    token: q 0.43 -> 0.09 ms, o 0.51 -> 0.06 ms per layer), so there it takes the 2-D view,
    [in, out] for an input-major weight (prefers_input_major), else [out, in]. Other backends
    keep the einsum (cuBLAS and the TPU handle it; measured as it is)."""
    ins, w_sub = eq.split("->")[0].split(",")
    n_in = len(ins) - 2  # x: [batch, seq, in...]; weight: [out..., in...] (or [in..., out...])
    k = math.prod(x.shape[2:])
    x2 = x.reshape(*x.shape[:2], k)
    if input_major:
        y = jnp.einsum("bsi,io->bso", x2, weight.reshape(k, -1))
        return y.reshape(*x.shape[:2], *weight.shape[n_in:])
    if jax.default_backend() != "cpu":
        return jnp.einsum(eq, x, weight)
    assert w_sub.endswith(ins[2:]), f"{eq}: the weight's last dims must be x's input dims"
    y = jnp.einsum("bsi,oi->bso", x2, weight.reshape(-1, k))
    return y.reshape(*x.shape[:2], *weight.shape[: weight.ndim - n_in])


def linear_group(eq: str, x: jax.Array, weights, scales, impl: str = "auto", layer: jax.Array | None = None,
                 axes=None) -> list[jax.Array]:
    """linear() of one x [batch, seq, in] with one or several FP8 weights (a layer's q, k, v; or
    w1, w3): one kernel launch for all of them where the kernel can (decode's small projections
    are bound by per-launch cost), also per shard when tp splits all of them column-parallel."""
    from pallas_kernels.fp8_matmul import fp8_matmul_group

    x2, x_scale, (b, s), dtype = _tokens(x)
    mesh = current_mesh()
    views = [_kernel_view(w, sc, layer) for w, sc in zip(weights, scales)]
    ws, w_scales = [v[0] for v in views], [v[1] for v in views]
    if mesh_size(mesh, "tp") == 1 or impl in ("reference", "xla"):  # the twins: XLA partitions them
        ys = fp8_matmul_group(x2, ws, w_scales, layer=layer, x_scale=x_scale, impl=impl, out_dtype=dtype)
    elif all(_tp_split(a[-w.ndim:], w.ndim - sc.ndim) == "out" for w, sc, a in zip(weights, scales, axes)):
        from mistral_jax.model.fp8_tp import fp8_linear_group_tp

        assert x_scale is None, "fp8_tp quantizes x itself (fuses_quantization is False on a tp mesh)"
        ys = fp8_linear_group_tp(x2, ws, w_scales, layer, mesh=mesh, impl=impl, out_dtype=dtype)
    else:
        return [linear(eq, x, w, sc, impl, layer, a) for w, sc, a in zip(weights, scales, axes)]
    return [y.reshape(b, s, *v[2]) for y, v in zip(ys, views)]


def _kernel_view(weight: jax.Array, scale: jax.Array, layer):
    """An FP8 weight [(layers,) out..., in...] as the kernel's w [(layers,) n, k], its scale as
    w_scale [(layers,) n], and the out... shape to give y back."""
    if layer is None:
        return weight.reshape(scale.size, -1), scale.reshape(-1), scale.shape
    num_layers = scale.shape[0]
    return (weight.reshape(num_layers, -1, weight.size // scale.size), scale.reshape(num_layers, -1),
            scale.shape[1:])


def _tp_split(axes, n_in: int) -> str | None:
    """Which side of a projection the tp axis splits, from its weight's logical axes
    [(layers,) out..., in...]: "out", "in", or None (tp splits neither)."""
    on_tp = lambda names: any(LOGICAL_RULES.get(a) == "tp" for a in names)  # noqa: E731
    return "out" if on_tp(axes[:-n_in]) else "in" if on_tp(axes[-n_in:]) else None
