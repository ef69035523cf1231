"""Orbax checkpoints: the model's parameters as saved from device, restored straight into a mesh.

    DST/mistral_jax.json   format marker, ModelConfig, dtype, quantization
    DST/weights/           the Orbax checkpoint of the parameter tree (attribute paths of Transformer)
    DST/tokenizer files    copied from the source (GGUF: tokenizer.json + tokenizer_config.json)

Restoring reads, on every process, only the slices its devices hold (Orbax + TensorStore),
straight into the target shardings: no host holds the model, and any mesh works, whatever the
mesh it was saved from. FP8 projections stay e4m3 with their scales.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from mistral_jax.config import ModelConfig, read_json
from mistral_jax.loading.checkpoint.base import Checkpoint, CheckpointError

MARKER = "mistral_jax.json"
WEIGHTS = "weights"
FORMAT = "mistral_jax-orbax"
# 2: q, k and v as one parameter, attention.wqkv (model.Attention). 1 (before 2026-12-04): three,
# wq / wk / wv; still restored, joined on the devices after the read.
VERSION = 2


def is_orbax_dir(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


class OrbaxCheckpoint(Checkpoint):
    format = "Orbax"

    def __init__(self, path: Path):
        meta = read_json(path / MARKER)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path / MARKER}: format {meta.get('format')!r}, expected {FORMAT!r}")
        self.version = meta.get("version", 1)
        if self.version > VERSION:
            raise CheckpointError(f"{path / MARKER}: format version {self.version}, newer than this mistral_jax "
                                  f"reads ({VERSION}): upgrade mistral_jax, or convert the source again with this one")
        if not (path / WEIGHTS).is_dir():
            raise CheckpointError(f"{path}: {MARKER} but no {WEIGHTS}/ directory: an unfinished conversion? "
                                  "Run python -m mistral_jax.convert SRC DST again")
        if not isinstance(meta.get("config"), dict):
            raise CheckpointError(f'{path / MARKER}: no "config" object. '
                                  "Fix: run python -m mistral_jax.convert SRC DST again")
        super().__init__(path, ModelConfig.from_fields(meta["config"], source=path / MARKER), path / MARKER)
        self.quantization = meta.get("quantization")

    def tensors(self, progress: bool = True):
        raise CheckpointError(f"{self.path}: an Orbax checkpoint is restored whole (restore_model), not streamed")

    def restore(self, dtype, mesh, quantization: str | None = None, fp8_impl: str = "auto"):
        """The Transformer, each array read into its NamedSharding on `mesh` (cast to `dtype`
        where the saved one differs; FP8 projections and their scales keep their saved dtypes)."""
        import orbax.checkpoint as ocp
        from flax import nnx

        from mistral_jax.loading.weights import _sharding, abstract_model

        if quantization == "fp8" and self.quantization != "fp8":
            raise CheckpointError(f"{self.path}: saved without FP8; quantization='fp8' needs an FP8 conversion: "
                                  "python -m mistral_jax.convert SRC DST --quantization fp8")
        model = abstract_model(self.config, dtype, quantization=self.quantization, fp8_impl=fp8_impl)
        graphdef, state = nnx.split(model)
        target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=_sharding(mesh, v)),
                              state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        target = nnx.to_pure_dict(target)
        fused = _separate_qkv(target["layers"]["attention"], self.config) if self.version == 1 else {}
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore((self.path / WEIGHTS).absolute(), target)
        _join_qkv(restored["layers"]["attention"], fused)
        nnx.replace_by_pure_dict(state, restored)
        return nnx.merge(graphdef, state)


def save(model, dst: Path, saved_dtype) -> None:
    """Write `model`'s parameters (any mesh) and the marker; tokenizer files are the caller's."""
    import orbax.checkpoint as ocp
    from flax import nnx

    if model.layers.attention.input_major or model.layers.feed_forward.input_major or model.head_input_major:
        raise ValueError("this model's projections are stored [in, out] for serving on this backend "
                         "(Transformer.to_input_major); save the model as loaded from its checkpoint "
                         "(mistral_jax.convert does)")

    dst.mkdir(parents=True, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((dst / WEIGHTS).absolute(), state, force=True)
    # Written last: a directory with the marker is a finished checkpoint.
    meta = dict(format=FORMAT, version=VERSION, config=dataclasses.asdict(model.cfg),
                dtype=jnp.dtype(saved_dtype).name, quantization=model.quantization)
    (dst / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def _separate_qkv(attention: dict, cfg: ModelConfig) -> dict:
    """Version 1: replaces the attention's wqkv (and wqkv_scale) restore targets in place by
    wq, wk, wv ones ([layers, heads, ...], split by head as wqkv is); returns the replaced."""
    fused = {}
    for name in ("wqkv", "wqkv_scale"):
        if name not in attention:
            continue
        t = fused[name] = attention.pop(name)  # [layers, kv_heads, g + 2, ...]
        spec = tuple(t.sharding.spec) + (None,) * (t.ndim - len(t.sharding.spec))
        sharding = NamedSharding(t.sharding.mesh, PartitionSpec(*spec[:2], *spec[3:]))
        for part, heads in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads), ("wv", cfg.n_kv_heads)):
            attention[name.replace("wqkv", part)] = jax.ShapeDtypeStruct((t.shape[0], heads, *t.shape[3:]), t.dtype,
                                                                         sharding=sharding)
    return fused


def _join_qkv(attention: dict, fused: dict) -> None:
    """Version 1: the restored wq, wk, wv of `attention` joined into wqkv in place (on the
    devices, into the sharding of `fused`'s targets)."""

    from mistral_jax.model.transformer import qkv_slots

    def join(wq, wk, wv):  # [layers, heads, ...] -> [layers, kv_heads, g + 2, ...] (model.qkv_slots)
        layers, kv = wk.shape[:2]
        parts = {p: w.reshape(layers, kv, -1, *w.shape[2:]) for p, w in zip("qkv", (wq, wk, wv))}
        slots = qkv_slots(parts["q"].shape[2])
        return jnp.concatenate([parts[p] for p in sorted("qkv", key=lambda p: slots[p].start)], axis=2)

    for name, t in fused.items():
        parts = [attention.pop(name.replace("wqkv", p)) for p in ("wq", "wk", "wv")]
        attention[name] = jax.jit(join, out_shardings=t.sharding)(*parts)
