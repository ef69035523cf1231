"""Model parameters on devices: streamed from a checkpoint, or random for tests and benchmarks.

    model = load_model(checkpoint, config, dtype, mesh, kernels=kernels)   # the one entry

The canonical checkpoint names (checkpoint.py) mirror the model's attribute paths:
`layers.7.attention.wo.weight` is layer 7 of `model.layers.attention.wo`, `*norm.weight` is the
norm's `scale`, an FP8 projection's `*.weight_scale` [out, 1] is its Fp8Weight's `scale`
[out...] (and its `.weight`, the Fp8Weight's `quant`). The one exception: the checkpoints' q, k
and v projections are parts of one parameter, `attention.wqkv` (model.Attention), each written
into its part as it streams in.
A model built with quantization="fp8" takes FP8 weights as they are, and quantizes 16/32-bit
projection weights per output channel as they stream in.
An Orbax checkpoint (checkpoint.whole) is not streamed: it is read whole, each array straight
into its sharding (restore_weights), in the layout `saved_params` gives.
Each tensor goes from the file to its device buffer on its own, so host memory
holds about one tensor at a time, never the model. On a mesh, checkpoints are read per shard:
each device's slice is read from the file by itself (`jax.make_array_from_callback`; GGUF's
quantized tensors by rows and whole blocks of columns), so no host reads more than its devices
hold.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mistral_jax.config import ModelConfig
from mistral_jax.loading.checkpoint.base import CheckpointError, Entry
from mistral_jax.model.kernels import Kernels, choose_kernels
from mistral_jax.model.projections import Fp8Weight
from mistral_jax.model.transformer import Transformer, qkv_slots
from mistral_jax.runtime.sharding import check_mesh, logical_spec, make_mesh, use_mesh

_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)\.weight(_scale)?$")


def _path(model_name: str, scale: bool = False) -> tuple[str, ...]:
    parts = model_name.split(".")
    if parts[-1].endswith("norm"):
        return (*parts, "scale")
    return (*parts, "scale") if scale else tuple(parts)  # an FP8 projection's scale: its Fp8Weight's


# Checkpoint projections held as parts of one parameter, Attention.wqkv (model.qkv_slots).
_QKV_PARTS = {"wq": "q", "wk": "k", "wv": "v"}


def param_target(name: str) -> tuple[tuple[str, ...], int | None, str | None]:
    """Canonical tensor name -> (attribute path in Transformer, layer index or None, the part of
    the parameter it is: "q", "k", "v" of wqkv, or None for the whole)."""
    m = _LAYER_NAME.match(name)
    if m:
        *module, proj = m.group(2).split(".")
        part = _QKV_PARTS.get(proj) if module == ["attention"] else None
        target = "attention.wqkv" if part else m.group(2)
        return ("layers", *_path(target, m.group(3) is not None)), int(m.group(1)), part
    if not name.endswith(".weight"):
        raise KeyError(name)
    return _path(name[: -len(".weight")]), None, None


def _part(shape: tuple[int, ...], part: str | None) -> tuple[tuple[int, ...], int]:
    """A wqkv part's view of one layer's wqkv (or its scale) `shape` [kv_heads, g + 2, ...]:
    (the part's shape, where it starts on the group axis). None: the whole, at 0."""
    if part is None:
        return shape, 0
    slot = qkv_slots(shape[1] - 2)[part]
    return (shape[0], slot.stop - slot.start, *shape[2:]), slot.start


def _variable(model: nnx.Module, path: tuple[str, ...]) -> nnx.Variable:
    """The parameter at `path` (param_target's); a projection's weight in an FP8 model is its
    Fp8Weight's `quant`."""
    obj = model
    for attr in path:
        obj = getattr(obj, attr)
    return obj.quant if isinstance(obj, Fp8Weight) else obj


def param_sharding(mesh: Mesh, var: nnx.Variable, drop_layer_axis: bool = False) -> NamedSharding:
    """Where a parameter lives on `mesh`: its logical axes through sharding.LOGICAL_RULES
    (without the leading `layers` axis: one layer of a stack)."""
    axes = var.get_metadata()["logical_axes"]
    return NamedSharding(mesh, logical_spec(axes[1:] if drop_layer_axis else axes))


def abstract_model(cfg: ModelConfig, dtype, **quant) -> Transformer:
    """The model's structure with shapes only: nothing allocated. quant: Transformer's
    quantization and fp8_impl."""
    return nnx.eval_shape(lambda: Transformer(cfg, dtype, nnx.Rngs(0), **quant))


def load_model(checkpoint, config: ModelConfig | None = None, dtype=jnp.bfloat16, mesh: Mesh | None = None, *,
               progress: bool = True, quantization: str | None = None, kernels: Kernels | None = None,
               fp8_impl: str = "auto", seed: int = 0) -> Transformer:
    """The model to serve: random weights (checkpoint None: load_format "dummy"; then `config`
    gives the shapes), or the checkpoint's (load_weights: streamed, or an Orbax checkpoint read
    whole), on `mesh`'s devices; then stored in the layout the platform's products prefer
    (kernels.input_major). kernels: the engine's (model.kernels.choose_kernels; None: chosen for
    the default backend with `fp8_impl`). quantization="fp8": FP8 projections; an FP8
    checkpoint always loads so."""
    mesh = mesh or make_mesh()
    kernels = kernels or choose_kernels(mesh.devices.flat[0].platform, fp8=fp8_impl)
    if checkpoint is None:
        model = random_weights(config, dtype, mesh, seed=seed, quantization=quantization, fp8_impl=kernels.fp8)
    else:
        model = load_weights(checkpoint, dtype, mesh, progress=progress, quantization=quantization,
                             fp8_impl=kernels.fp8)
    return model.to_input_major() if kernels.input_major else model


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _zeros(shape, dtype, sharding):
    return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, value: jax.Array, layer: jax.Array, start: jax.Array) -> jax.Array:
    # stack: [layers, ...]; writes one layer in place (the buffer is donated), or, with value
    # smaller than a layer, a part of it from `start` on axis 1 of the layer (a wqkv part).
    index = [layer] + [jnp.int32(0)] * (stack.ndim - 1)
    if value.ndim > 1:
        index[2] = start
    return jax.lax.dynamic_update_slice(stack, value[None].astype(stack.dtype), index)


def _file_index(index: tuple[slice, ...], shape: tuple[int, ...], file_shape: tuple[int, ...]):
    """A slice of the parameter's view `shape` as a slice of the file's `file_shape` (the view
    splits file axes, e.g. wq [heads, head_dim, embed] of the file's [heads * head_dim, embed]).
    Exists when, within each file axis, only the outermost view axis is cut (whole heads);
    None otherwise."""
    out, i = [], 0
    for n in file_shape:
        group, size = [], 1
        while size < n:
            group.append(i)
            size *= shape[i]
            i += 1
        if size != n:
            return None
        if not group:  # a file axis of 1 (a scale's [out, 1])
            out.append(slice(None))
            continue
        cuts = [index[j].indices(shape[j]) for j in group]
        if any(c != (0, shape[j], 1) for c, j in zip(cuts[1:], group[1:])) or cuts[0][2] != 1:
            return None
        inner = math.prod(shape[j] for j in group[1:])
        out.append(slice(cuts[0][0] * inner, cuts[0][1] * inner))
    return tuple(out) if all(shape[j] == 1 for j in range(i, len(shape))) else None


def _to_device(entry: Entry, shape, dtype, sharding: NamedSharding) -> jax.Array:
    """One checkpoint tensor -> sharded device array of `shape` (the parameter's view of it);
    each device gets only its slice, read from the file alone where the format can."""
    whole = []  # read once, if a slice cannot be read by itself

    def read(index):
        file_index = _file_index(index, shape, entry.shape) if entry.read_slice else None
        if file_index is not None:
            return entry.read_slice(file_index).reshape([len(range(*s.indices(n))) for s, n in zip(index, shape)])
        if not whole:
            whole.append(entry.read().reshape(shape))
        return whole[0][index]

    out = jax.make_array_from_callback(shape, sharding, read)
    return out if dtype is None or out.dtype == dtype else out.astype(dtype)


@functools.partial(jax.jit, static_argnums=1)
def _quantize(w: jax.Array, scale_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Load-time quantization of one projection w [out..., in...] -> (e4m3 w, scale [out...])."""
    from pallas_kernels.fp8_matmul import quantize_weight

    w_q, scale = quantize_weight(w.reshape(math.prod(scale_shape), -1))  # [n, k]: one scale per row
    return w_q.reshape(w.shape), scale.reshape(scale_shape)


def _put(model, path, layer, value: jax.Array, start: int = 0) -> None:
    var = _variable(model, path)
    if layer is None:
        var.set_value(value)
    else:
        var.set_value(_set_layer(var[...], value, jnp.int32(layer), jnp.int32(start)))


def load_weights(
    checkpoint, dtype=jnp.bfloat16, mesh: Mesh | None = None, progress: bool = True,
    quantization: str | None = None, fp8_impl: str = "auto",
) -> Transformer:
    """A checkpoint (checkpoint.open_checkpoint(...)) into a model on `mesh`'s devices: streamed
    one tensor at a time, or, for a checkpoint saved whole (Orbax), restore_weights.
    quantization="fp8": FP8 projections; an FP8 checkpoint is always loaded so."""
    if getattr(checkpoint, "whole", False):
        return restore_weights(checkpoint, dtype, mesh, quantization=quantization, fp8_impl=fp8_impl)
    cfg = checkpoint.config
    mesh = mesh or make_mesh()
    check_mesh(cfg, mesh)  # before anything is read
    quantization = getattr(checkpoint, "quantization", None) or quantization
    model = abstract_model(cfg, dtype, quantization=quantization, fp8_impl=fp8_impl)
    # Stacked per-layer parameters start as zero buffers on device and are filled layer by layer.
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and path and path[0] == "layers":
            var.set_value(_zeros(var.shape, var.dtype, param_sharding(mesh, var)))
    for entry in checkpoint.entries(progress=progress):
        path, layer, part = param_target(entry.name)
        var = _variable(model, path)
        if layer is None:
            var.set_value(_to_device(entry, var.shape, var.dtype, param_sharding(mesh, var)))
            continue
        shape, start = _part(var.shape[1:], part)
        value = _to_device(entry, shape, None, param_sharding(mesh, var, True))  # the file's dtype
        if var.dtype == jnp.float8_e4m3fn and value.dtype != var.dtype:  # quantize at load
            scale_path = (*path, "scale")
            value, scale = _quantize(value, _part(_variable(model, scale_path).shape[1:], part)[0])
            _put(model, scale_path, layer, scale, start)
        _put(model, path, layer, value, start)
    return model


def restore_weights(checkpoint, dtype=jnp.bfloat16, mesh: Mesh | None = None, quantization: str | None = None,
                    fp8_impl: str = "auto") -> Transformer:
    """A checkpoint saved whole (Orbax) into a model on `mesh`: every array read straight into
    its sharding (cast to `dtype` where the saved one differs; FP8 weights keep their saved
    dtypes). Its FP8 weights were quantized when it was written: quantization="fp8" on a
    16-bit one is refused."""
    if quantization == "fp8" and checkpoint.quantization != "fp8":
        raise CheckpointError(f"{checkpoint.path}: saved without FP8; quantization='fp8' needs an FP8 conversion: "
                              "python -m mistral_jax.convert SRC DST --quantization fp8")
    mesh = mesh or make_mesh()
    model = abstract_model(checkpoint.config, dtype, quantization=checkpoint.quantization, fp8_impl=fp8_impl)
    graphdef, state = nnx.split(model)
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=param_sharding(mesh, v)),
                          state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    like = nnx.to_pure_dict(target)
    restored = checkpoint.read(_as_saved(like))
    nnx.replace_by_pure_dict(state, _from_saved(restored, like))
    return nnx.merge(graphdef, state)


def saved_params(model: Transformer) -> dict:
    """The model's parameters as checkpoints are saved whole (Orbax): a nested dict of its
    attribute paths, with an FP8 weight `wo` as `wo` (e4m3) and `wo_scale` beside it. Refused
    for a model whose weights were moved for serving (to_input_major)."""
    if model.layers.attention.input_major or model.layers.feed_forward.input_major or model.head_input_major:
        raise ValueError("this model's projections are stored [in, out] for serving on this backend "
                         "(Transformer.to_input_major); save the model as loaded from its checkpoint "
                         "(mistral_jax.convert does)")
    return _as_saved(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _is_fp8(node) -> bool:
    """An Fp8Weight in a pure dict (nnx.to_pure_dict): {"quant": ..., "scale": ...}."""
    return isinstance(node, dict) and set(node) == {"quant", "scale"}


def _as_saved(tree: dict) -> dict:
    out = {}
    for name, node in tree.items():
        if _is_fp8(node):
            out[name], out[name + "_scale"] = node["quant"], node["scale"]
        else:
            out[name] = _as_saved(node) if isinstance(node, dict) else node
    return out


def _from_saved(saved: dict, like: dict) -> dict:
    """_as_saved's inverse, in the structure of `like` (the model's pure dict)."""
    out = {}
    for name, node in like.items():
        if _is_fp8(node):
            out[name] = {"quant": saved[name], "scale": saved[name + "_scale"]}
        else:
            out[name] = _from_saved(saved[name], node) if isinstance(node, dict) else saved[name]
    return out


def random_weights(cfg: ModelConfig, dtype=jnp.bfloat16, mesh: Mesh | None = None, seed: int = 0,
                   quantization: str | None = None, fp8_impl: str = "auto") -> Transformer:
    """Random parameters generated directly on the devices (real-shape benchmarks need no files).
    quantization="fp8": random projections of the same distribution, quantized per output channel."""
    mesh = mesh or make_mesh()
    check_mesh(cfg, mesh)
    quant = dict(quantization=quantization, fp8_impl=fp8_impl)
    abstract = abstract_model(cfg, dtype, **quant)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = jax.tree.map(
        lambda v: param_sharding(mesh, v), abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        with use_mesh(mesh):
            return nnx.state(Transformer(cfg, dtype, nnx.Rngs(seed), **quant))

    return nnx.merge(graphdef, init())
