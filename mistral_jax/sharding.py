"""Logical axes -> mesh axes, declared once.

Every parameter and activation is annotated with logical axis names (`embed`, `q_heads`, ...).
`LOGICAL_RULES` maps each name to a mesh axis (or None = replicated). Changing the parallelism
layout means changing this table, not the model. One device is simply a mesh of size one.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Mesh axes: `dp` splits the batch, `tp` splits heads / MLP columns / vocabulary.
MESH_AXES = ("dp", "tp")

LOGICAL_RULES: dict[str, str | None] = {
    "batch": "dp",
    "seq": None,
    "embed": None,
    "vocab": "tp",
    "q_heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "mlp": "tp",
    "layers": None,
    "cache_seq": None,
}

Axes = Sequence[str | None]

_current_mesh: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("mesh", default=None)


def make_mesh(dp: int = 1, tp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if dp * tp > len(devices):
        raise ValueError(f"mesh dp={dp} x tp={tp} needs {dp * tp} devices, only {len(devices)} present")
    return Mesh(np.array(devices[: dp * tp]).reshape(dp, tp), MESH_AXES)


def logical_spec(axes: Axes) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names (None = not sharded)."""
    unknown = [a for a in axes if a is not None and a not in LOGICAL_RULES]
    if unknown:
        raise KeyError(f"unknown logical axes {unknown}; declare them in LOGICAL_RULES")
    return PartitionSpec(*(LOGICAL_RULES[a] if a is not None else None for a in axes))


def named_sharding(mesh: Mesh, axes: Axes) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes))


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """Activation constraints inside traced code refer to this mesh."""
    token = _current_mesh.set(mesh)
    try:
        yield mesh
    finally:
        _current_mesh.reset(token)


def current_mesh() -> Mesh | None:
    return _current_mesh.get()


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Annotate an activation with its logical axes; a no-op without a mesh or on one device."""
    mesh = _current_mesh.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes))
