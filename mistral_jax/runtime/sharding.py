"""Logical axes -> mesh axes, declared once.

Every parameter and activation is annotated with logical axis names (`embed`, `q_heads`, ...).
`LOGICAL_RULES` maps each name to a mesh axis (or None = replicated). Changing the parallelism
layout means changing this table, not the model. One device is simply a mesh of size one.

Meshes come from one option, `parse_mesh("dp=2,tp=4")` (LLM(mesh=...), CLI --mesh).

- `tp` splits attention heads (q and kv), MLP columns and the vocabulary (embedding, output head,
  logits). The KV cache pages are split by kv head, so each device holds its heads' pages.
  `check_mesh` refuses, before any weight is read, a tp that does not divide n_heads,
  n_kv_heads, hidden_dim or vocab_size (no silent replication: the Pallas attention kernels run
  per tp shard and need whole GQA groups on each device).
- Sampling takes the logits as tp splits them: greedy argmax, log-softmax and the top-k of
  logprobs run on each shard with small merges (`sampling.top_k_over_vocab`); only the top-k /
  top-p filters sort the whole vocabulary (an all-gather of [rows, vocab], in their own branch,
  taken only by batches that ask for them).
- `dp` maps the logical `batch` axis. The paged engine packs every token of a step into ONE row
  (tokens [1, T]), so its batch axis has size 1 and `constrain` replicates it: with dp > 1 each
  of the dp groups holds a full tp-sharded copy of the weights and KV cache and computes the same
  step (correct, no faster; a dp group is a replica, useful as the building block of multi-host
  data parallelism, not a speed-up within one engine). An activation dimension that its mesh
  axis does not divide is replicated the same way, never padded.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

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
    "qkv": None,  # Attention.wqkv's [q heads of a group..., k, v] axis: whole on every device
    "head_dim": None,
    "mlp": "tp",
    "layers": None,
    "cache_seq": None,
}

Axes = Sequence[str | None]

_current_mesh: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("mesh", default=None)


def make_mesh(dp: int = 1, tp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    for name, size in (("dp", dp), ("tp", tp)):
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"mesh axis {name}={size!r} is invalid: sizes are integers >= 1")
    if dp * tp > len(devices):
        platform = devices[0].platform if devices else "?"
        raise ValueError(
            f"mesh dp={dp} x tp={tp} needs {dp * tp} devices, but {len(devices)} {platform} device(s) are "
            f"present: use a mesh of at most {len(devices)} devices (e.g. tp={len(devices)}), or run where more "
            "devices are visible (CPU: jax.config.update('jax_num_cpu_devices', N) before JAX starts)")
    return Mesh(np.array(devices[: dp * tp]).reshape(dp, tp), MESH_AXES)


def parse_mesh(spec: str | Mesh | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """"tp=4", "dp=2,tp=4" (or "dp=2 tp=4"; an axis left out has size 1) -> Mesh.
    None or "" is one device; a Mesh passes through."""
    if isinstance(spec, Mesh):
        return spec
    sizes: dict[str, int] = {}
    for part in (spec or "").replace(" ", ",").split(","):
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES:
            raise ValueError(f"mesh {spec!r}: unknown axis {name!r}; the axes are {MESH_AXES}, "
                             "written like 'tp=4' or 'dp=2,tp=4'")
        if name in sizes:
            raise ValueError(f"mesh {spec!r}: axis {name!r} is given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh {spec!r}: {part!r} needs an integer size, e.g. '{name}=2'") from None
    return make_mesh(devices=devices, **sizes)


def mesh_size(mesh: Mesh | None, axis: str) -> int:
    return 1 if mesh is None else mesh.shape.get(axis, 1)


def check_mesh(cfg, mesh: Mesh) -> None:
    """Refuse a mesh whose tp does not divide the model's split dimensions (before loading)."""
    tp = mesh_size(mesh, "tp")
    dims = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "hidden_dim": cfg.hidden_dim,
            "vocab_size": cfg.vocab_size}
    bad = {name: n for name, n in dims.items() if n % tp}
    if bad:
        fits = [t for t in range(1, tp) if all(n % t == 0 for n in dims.values())]
        what = ", ".join(f"{name}={n}" for name, n in bad.items())
        raise ValueError(
            f"mesh tp={tp} cannot split this model: {what} not divisible by {tp} (tp splits attention heads, "
            f"kv heads, MLP columns and the vocabulary). Use tp in {fits} (e.g. tp={fits[-1]}), and dp for the rest")


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
    # A dimension its mesh axis does not divide (the paged engine's one packed row on dp) is replicated.
    spec = [a if a is None or n % mesh.shape[a] == 0 else None for a, n in zip(logical_spec(axes), x.shape)]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))
