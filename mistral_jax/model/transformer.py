"""The Mistral decoder in Flax NNX.

tokens -> embedding -> n_layers x [RMSNorm -> GQA attention (rotary) -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> output head -> logits.

Layout choices (why):
- Linear weights keep the checkpoints' [out, in] layout (split per head where it helps the
  einsums), so loading is a reshape, never a transpose, and FP8 kernels get the [N, K]
  operand they want.
- q, k and v are one weight, grouped by kv head (Attention): loading writes each checkpoint
  tensor into its part (weights.py).
- q/k rows are in Mistral's original order: rotary acts on interleaved pairs (2i, 2i+1).
- The layers' parameters are stacked on a leading `layers` axis and applied with `lax.scan`,
  so a 56-layer model compiles as fast as a 1-layer one.
- Every parameter carries `logical_axes`; sharding.py maps them to the mesh.
- A projection's weight is an `nnx.Param` (16-bit) or an `Fp8Weight` (W8A8), chosen once here
  (`_projection`); projections.py runs the product its type calls for, so nothing below tests
  for quantization or picks a kernel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mistral_jax.config import ModelConfig
from mistral_jax.model.kernels import QUANTIZATIONS
from mistral_jax.model.projections import Fp8Param, Fp8Weight, fused_input, is_input_major, linear, swiglu
from mistral_jax.runtime.sharding import constrain

__all__ = ["Transformer", "DecoderLayer", "Attention", "MLP", "RMSNorm", "QUANTIZATIONS", "qkv_slots"]


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = "normal") -> nnx.Param:
    """A parameter with its logical axes. Random init is for tests and benchmarks only:
    real weights come from a checkpoint."""
    assert len(shape) == len(axes), (shape, axes)
    value = jnp.ones(shape, dtype) if init == "ones" else _random_normal(rngs.params(), shape, shape[-1], dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


def _random_normal(key, shape, fan_in: int, dtype) -> jax.Array:
    """The random init: normal with std fan_in^-1/2, drawn in f32."""
    return (jax.random.normal(key, shape, jnp.float32) * fan_in**-0.5).astype(dtype)


def _projection(rngs, shape, axes, dtype, quantization: str | None, fp8_impl: str, n_in: int = 1):
    """A projection's weight [..., out..., in...]: an nnx.Param, or with quantization="fp8" an
    Fp8Weight (scale [..., out...]) multiplied by fp8_matmul's `fp8_impl`. n_in: how many
    trailing axes are the input (2 for wo's [embed, heads, head_dim])."""
    if quantization != "fp8":
        return _param(rngs, shape, axes, dtype)
    from pallas_kernels.fp8_matmul import quantize_weight

    # Random fp8 weights (tests, benchmarks): `_param`'s distribution, drawn and quantized one
    # block of rows at a time, one scale per row. The whole stacked weight in f32 would need
    # 4x its 16-bit size in temporaries.
    k, rows = math.prod(shape[-n_in:]), math.prod(shape[:-n_in])
    block = math.gcd(rows, 4096)
    key = rngs.params()

    def draw(i):  # -> w_q [block, k] e4m3, scale [block]
        return quantize_weight(_random_normal(jax.random.fold_in(key, i), (block, k), shape[-1], dtype))

    w_q, scale = jax.lax.map(draw, jnp.arange(rows // block))
    return Fp8Weight(w_q.reshape(shape), scale.reshape(shape[:-n_in]), axes, fp8_impl)


def _read_in_place(quantized: bool):
    """nnx filter: what the layer loop hands every layer whole, with the layer index, instead of
    a slice: FP8 weights (see Transformer.hidden) and, in an FP8 model, the layer norms' scales,
    which the FP8 quantizing kernel reads in place (projections.fused_input)."""
    def keep(path, variable) -> bool:
        return isinstance(variable, Fp8Param) or (quantized and len(path) > 1 and str(path[-2]).endswith("_norm"))
    return keep


def _transposed(arrays: tuple[jax.Array, ...], orders: tuple[tuple[int, ...], ...]) -> tuple[jax.Array, ...]:
    """Each array transposed by its order, in one program; a NamedSharding's spec moves along."""
    def moved(a, order):
        sharding = a.sharding
        if not isinstance(sharding, jax.sharding.NamedSharding):
            return sharding
        spec = tuple(sharding.spec) + (None,) * (a.ndim - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*(spec[i] for i in order)))

    fn = jax.jit(lambda xs: tuple(jnp.transpose(x, o) for x, o in zip(xs, orders)),
                 out_shardings=tuple(moved(a, o) for a, o in zip(arrays, orders)))
    return fn(arrays)


def rotary_phases(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) of position * theta^(-2i/head_dim), each [batch, seq, 1, head_dim/2] f32.

    Computed once per forward pass and shared by every layer's q and k (inside the layer loop
    they were one more kernel per layer)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [head_dim/2]
    angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv_freq  # [b, s, d/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def rotary(x: jax.Array, phases: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by rotary_phases' angles.

    x: [batch, seq, heads, head_dim]."""
    cos, sin = phases
    d = x.shape[-1]
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], d // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, stack: tuple[int, ...] = ()):
        axes = ("layers",) * len(stack) + ("embed",)
        self.scale = _param(None, (*stack, cfg.dim), axes, dtype, init="ones")
        self.eps = cfg.norm_eps

    def __call__(self, x, layer=None, into=()):
        """rms_norm(x) [batch, seq, dim], in the form the projections `into` take it (FP8 ones:
        quantized per token in the same kernel). The scale is [dim], or every layer's
        [layers, dim] (_read_in_place), then `layer` picks."""
        return fused_input(x, into, norm=self.scale[...], eps=self.eps, layer=layer)


class _Projections(nnx.Module):
    """What Attention and MLP share: their projection weights, named in N_IN."""

    N_IN: dict[str, int] = {}  # each projection's input dims (its weight's last ones)

    @property
    def input_major(self) -> bool:
        """Whether the 16-bit weights are stored [(layers,) in..., out...] (to_input_major)."""
        weights = [getattr(self, name) for name in self.N_IN]
        return any(not isinstance(w, Fp8Weight) and is_input_major(w) for w in weights)

    def input_major_moves(self) -> list[tuple[nnx.Param, tuple[int, ...]]]:
        """(param, axis order) for each 16-bit weight [(layers,) out..., in...] to be stored
        [(layers,) in..., out...] (Transformer.to_input_major); none for FP8 weights, which stay
        as their kernel reads them, nor once done."""
        moves = []
        for name, n_in in self.N_IN.items():
            param = getattr(self, name)
            if isinstance(param, Fp8Weight) or is_input_major(param):
                continue
            ndim = param[...].ndim
            lead = sum(a == "layers" for a in param.get_metadata()["logical_axes"])  # the layer axis stays first
            moves.append((param, (*range(lead), *range(ndim - n_in, ndim), *range(lead, ndim - n_in))))
        return moves


def qkv_slots(group: int) -> dict[str, slice]:
    """Where Attention.wqkv [kv_heads, group + 2, ...] holds each projection on its group axis:
    a kv head's `group` query heads, then its k, then its v (loaders and converters use this too)."""
    return {"q": slice(0, group), "k": slice(group, group + 1), "v": slice(group + 1, group + 2)}


class Attention(_Projections):
    N_IN = {"wqkv": 1, "wo": 2}

    def __init__(self, cfg: ModelConfig, dtype, rngs, stack: tuple[int, ...] = (),
                 quantization: str | None = None, fp8_impl: str = "auto"):
        L = ("layers",) * len(stack)
        h, kv, d, e = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
        quant = dict(quantization=quantization, fp8_impl=fp8_impl)
        # q, k and v are one weight: per kv head, its group of g = h // kv query heads, then its
        # k and its v ([kv_heads, g + 2, head_dim, embed]). One product at decode where three
        # were bound by per-launch cost (docs/performance.md), and tp splits it by kv head, as it
        # splits the cache.
        self.wqkv = _projection(rngs, (*stack, kv, h // kv + 2, d, e), (*L, "kv_heads", "qkv", "head_dim", "embed"),
                                dtype, **quant)
        self.wo = _projection(rngs, (*stack, e, h, d), (*L, "embed", "q_heads", "head_dim"), dtype, **quant, n_in=2)

    def __call__(self, x, positions, phases, cache, layer):
        # x: [batch, seq, embed] -> qkv: [batch, seq, kv_heads, g + 2, head_dim] -> q: [batch, seq,
        # q_heads, head_dim] (query head i uses kv head i // g), k/v: [batch, seq, kv_heads, head_dim]
        qkv = linear("bse,kgde->bskgd", x, self.wqkv, layer)
        slots = qkv_slots(qkv.shape[3] - 2)
        q, k, v = (qkv[:, :, :, slots[p]] for p in "qkv")
        q = q.reshape(*qkv.shape[:2], -1, qkv.shape[-1])
        k, v = k[:, :, :, 0], v[:, :, :, 0]
        q = constrain(rotary(q, phases), ("batch", "seq", "q_heads", "head_dim"))
        k = constrain(rotary(k, phases), ("batch", "seq", "kv_heads", "head_dim"))
        out, cache = cache.attend(layer, q, k, v, positions)  # [batch, seq, q_heads, head_dim]
        return linear("bshd,ehd->bse", out, self.wo, layer), cache


class MLP(_Projections):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    N_IN = {"w1": 1, "w3": 1, "w2": 1}

    def __init__(self, cfg: ModelConfig, dtype, rngs, stack: tuple[int, ...] = (),
                 quantization: str | None = None, fp8_impl: str = "auto"):
        L = ("layers",) * len(stack)
        quant = dict(quantization=quantization, fp8_impl=fp8_impl)
        self.w1 = _projection(rngs, (*stack, cfg.hidden_dim, cfg.dim), (*L, "mlp", "embed"), dtype, **quant)
        self.w3 = _projection(rngs, (*stack, cfg.hidden_dim, cfg.dim), (*L, "mlp", "embed"), dtype, **quant)
        self.w2 = _projection(rngs, (*stack, cfg.dim, cfg.hidden_dim), (*L, "embed", "mlp"), dtype, **quant)

    def __call__(self, x, layer=None):
        h = swiglu(x, self.w1, self.w3, layer, into=self.w2)  # [batch, seq, hidden]
        return linear("bsf,ef->bse", h, self.w2, layer)


class DecoderLayer(nnx.Module):
    """One transformer block; built with `stack=(n_layers,)` it holds every layer's weights."""

    def __init__(self, cfg: ModelConfig, dtype, rngs, stack: tuple[int, ...] = (), **quant):
        self.attention_norm = RMSNorm(cfg, dtype, stack)
        self.attention = Attention(cfg, dtype, rngs, stack, **quant)
        self.ffn_norm = RMSNorm(cfg, dtype, stack)
        self.feed_forward = MLP(cfg, dtype, rngs, stack, **quant)

    def __call__(self, x, positions, phases, cache, layer):
        # x: [batch, seq, embed]. Each norm hands its output in the form the next projections take.
        h = self.attention_norm(x, layer, into=(self.attention.wqkv,))
        h, cache = self.attention(h, positions, phases, cache, layer)
        x = x + h
        h = self.ffn_norm(x, layer, into=(self.feed_forward.w1, self.feed_forward.w3))
        x = x + self.feed_forward(h, layer)
        return constrain(x, ("batch", "seq", "embed")), cache


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None,
                 quantization: str | None = None, fp8_impl: str = "auto"):
        """quantization: None (16/32-bit projections) or "fp8" (see QUANTIZATIONS); embeddings,
        norms and the output head always stay in `dtype`. fp8_impl: the fp8_matmul impl every
        Fp8Weight runs (kernels.Kernels.fp8)."""
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={quantization!r} is not supported; use one of {QUANTIZATIONS}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        self.quantization = quantization
        self.tok_embeddings = _param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), dtype)
        self.layers = DecoderLayer(cfg, dtype, rngs, stack=(cfg.n_layers,), quantization=quantization,
                                   fp8_impl=fp8_impl)
        self.norm = RMSNorm(cfg, dtype)
        if not cfg.tied_embeddings:
            self.output = _param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), dtype)

    head_input_major = False  # the output head stored [embed, vocab] (to_input_major)

    def to_input_major(self) -> Transformer:
        """The layers' 16-bit projections stored [(layers,) in..., out...] instead of the
        checkpoints' [(layers,) out..., in...], and the output head [embed, vocab], where the
        backend's product runs faster so (kernels.Kernels.input_major): for serving, not for
        saving. Each weight keeps its sharding and logical axes, moved with its dims, and is
        marked `input_major` (projections.is_input_major); one program transposes them all (so
        for a moment they are held twice). A tied head is the embedding table itself: the
        lookup then takes columns, which costs less than the head's product gains
        (docs/performance.md)."""
        modules = (self.layers.attention, self.layers.feed_forward)
        moves = [move for m in modules for move in m.input_major_moves()]
        if not self.head_input_major:
            moves.append((self.tok_embeddings if self.cfg.tied_embeddings else self.output, (1, 0)))
        if moves:
            new = _transposed(tuple(p[...] for p, _ in moves), tuple(order for _, order in moves))
            for (param, order), value in zip(moves, new):
                axes = param.get_metadata()["logical_axes"]
                param.value = value
                param.set_metadata(logical_axes=tuple(axes[i] for i in order), input_major=True)
            self.head_input_major = True
        return self

    def __call__(self, tokens, positions, cache, logits_at=None):
        """tokens, positions: [batch, seq] (position -1 = padding); cache: a KV cache.

        logits_at: optional [batch, k] indices into seq; logits are computed only there (a long
        prefill needs the last position's, not a [seq, vocab] slab).
        Returns (logits [batch, seq or k, vocab] f32, cache).
        """
        x, cache = self.hidden(tokens, positions, cache)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        return self.logits(x), cache

    def hidden(self, tokens, positions, cache):
        """The decoder's output before the final norm: (x [batch, seq, dim], cache)."""
        table = self.tok_embeddings[...]  # [vocab, embed], or [embed, vocab] as a tied input-major head
        x = jnp.moveaxis(table[:, tokens], 0, -1) if self._tied_input_major() else table[tokens]
        x = constrain(x, ("batch", "seq", "embed"))
        # The scan slices each layer's parameters out of the stacks. FP8 weights stay whole
        # and their kernel reads layer i in place: a Pallas call cannot take a slice as a view,
        # so XLA would copy every layer's weight first (16-bit weights go to XLA's own dot,
        # which reads the slice in place).
        graphdef, whole, stacked = nnx.split(self.layers, _read_in_place(self.quantization is not None), ...)
        phases = rotary_phases(positions, self.cfg.head_dim, self.cfg.rope_theta)
        cache = cache.prepare(tokens.shape[1], self.cfg.n_heads)  # the same for every layer: once, here

        def one_layer(carry, layer_params):
            x, cache, i = carry
            x, cache = nnx.merge(graphdef, whole, layer_params)(x, positions, phases, cache, i)
            return (x, cache, i + 1), None

        (x, cache, _), _ = jax.lax.scan(one_layer, (x, cache, jnp.int32(0)), stacked, length=self.cfg.n_layers)
        return x, cache

    def logits(self, x):
        """hidden() rows x [batch, k, dim] -> logits [batch, k, vocab] f32 (final norm, output head)."""
        x = self.norm(x)
        head = self.tok_embeddings if self.cfg.tied_embeddings else self.output
        eq = "bse,ev->bsv" if self.head_input_major else "bse,ve->bsv"
        logits = jnp.einsum(eq, x, head[...], preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab"))

    def _tied_input_major(self) -> bool:
        return self.cfg.tied_embeddings and self.head_input_major
