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

from ..config import ModelConfig
from .base import Checkpoint, CheckpointError

MARKER = "mistral_jax.json"
WEIGHTS = "weights"
FORMAT = "mistral_jax-orbax"


def is_orbax_dir(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


class OrbaxCheckpoint(Checkpoint):
    format = "Orbax"

    def __init__(self, path: Path):
        meta = json.loads((path / MARKER).read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path / MARKER}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if not (path / WEIGHTS).is_dir():
            raise CheckpointError(f"{path}: {MARKER} but no {WEIGHTS}/ directory: an unfinished conversion? "
                                  "Run python -m mistral_jax.convert SRC DST again")
        super().__init__(path, ModelConfig(**meta["config"]))
        self.quantization = meta.get("quantization")

    def tensors(self, progress: bool = True):
        raise CheckpointError(f"{self.path}: an Orbax checkpoint is restored whole (restore_model), not streamed")

    def restore(self, dtype, mesh, quantization: str | None = None, fp8_impl: str = "auto"):
        """The Transformer, each array read into its NamedSharding on `mesh` (cast to `dtype`
        where the saved one differs; FP8 projections and their scales keep their saved dtypes)."""
        import orbax.checkpoint as ocp
        from flax import nnx

        from ..weights import _sharding, abstract_model

        if quantization == "fp8" and self.quantization != "fp8":
            raise CheckpointError(f"{self.path}: saved without FP8; quantization='fp8' needs an FP8 conversion: "
                                  "python -m mistral_jax.convert SRC DST --quantization fp8")
        model = abstract_model(self.config, dtype, quantization=self.quantization, fp8_impl=fp8_impl)
        graphdef, state = nnx.split(model)
        target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=_sharding(mesh, v)),
                              state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore((self.path / WEIGHTS).absolute(), nnx.to_pure_dict(target))
        nnx.replace_by_pure_dict(state, restored)
        return nnx.merge(graphdef, state)


def save(model, dst: Path, saved_dtype) -> None:
    """Write `model`'s parameters (any mesh) and the marker; tokenizer files are the caller's."""
    import orbax.checkpoint as ocp
    from flax import nnx

    dst.mkdir(parents=True, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((dst / WEIGHTS).absolute(), state, force=True)
    # Written last: a directory with the marker is a finished checkpoint.
    meta = dict(format=FORMAT, version=1, config=dataclasses.asdict(model.cfg),
                dtype=jnp.dtype(saved_dtype).name, quantization=model.quantization)
    (dst / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
