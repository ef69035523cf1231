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
# 2: q, k and v as one parameter, attention.wqkv (model.Attention). 1: three, wq / wk / wv; still
# restored, joined on the devices after the read.
VERSION = 2


def is_orbax_dir(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


class OrbaxCheckpoint(Checkpoint):
    format = "Orbax"
    whole = True  # read whole into the model's shardings (read), not streamed (entries)

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
        raise CheckpointError(f"{self.path}: an Orbax checkpoint is read whole (weights.load_weights), not streamed")

    def entries(self, progress: bool = True):
        raise CheckpointError(f"{self.path}: an Orbax checkpoint is read whole (weights.load_weights), not streamed")

    def read(self, target: dict) -> dict:
        """The saved arrays, each read into the sharding of its target: `target` is the nested
        dict of jax.ShapeDtypeStructs (with shardings) in the saved layout (weights.saved_params:
        Transformer's attribute paths, an FP8 weight's scale beside it as `<name>_scale`); a
        saved dtype differing from the target's is cast. Every process reads only the slices its
        devices hold."""
        import orbax.checkpoint as ocp

        target = jax.tree.map(lambda t: t, target)  # the version-1 rewrite below edits a copy
        fused = _separate_qkv(target["layers"]["attention"], self.config) if self.version == 1 else {}
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore((self.path / WEIGHTS).absolute(), target)
        _join_qkv(restored["layers"]["attention"], fused)
        return restored


def save(model, dst: Path, saved_dtype) -> None:
    """Write `model`'s parameters (any mesh; weights.saved_params) and the marker; tokenizer files
    are the caller's."""
    import orbax.checkpoint as ocp

    from mistral_jax.loading.weights import saved_params

    state = saved_params(model)  # refuses a model moved for serving, before anything is written
    dst.mkdir(parents=True, exist_ok=True)
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
