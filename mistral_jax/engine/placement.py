"""Where a step's arrays live: host arrays onto the mesh, device results back to the host.

One process: the step's host arrays go to the jitted call as NumPy arrays (the call moves them,
far cheaper than a jax.device_put of the tree: docs/performance.md). Several processes
(multi-host): each runs the same engine and builds the same host arrays; they are placed
replicated, each process giving its own (identical) copy.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class Placement:
    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.multiprocess = jax.process_count() > 1
        self.replicated_sharding = NamedSharding(mesh, PartitionSpec())

    def replicated(self, x) -> jax.Array:
        """Placed as the step's outputs are, so feeding them back does not recompile."""
        if self.multiprocess:  # each process gives its own (identical) copy: no cross-process check
            return jax.make_array_from_process_local_data(self.replicated_sharding, np.asarray(x))
        return jax.device_put(x, self.replicated_sharding)

    def to_mesh(self, tree):
        """Host arrays (identical on every process) -> what a program can take: one process, the
        NumPy arrays themselves; several, replicated arrays."""
        if self.multiprocess:
            return jax.tree.map(self.replicated, tree)
        return tree

    def to_host(self, tree):
        """Device results -> NumPy. Replicated arrays are read from a local copy; anything else
        is gathered from every process."""
        if not self.multiprocess:
            return jax.device_get(tree)
        from jax.experimental import multihost_utils

        def get(x):
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))

        return jax.tree.map(get, tree)


def shared_seed() -> int:
    """Process 0's random seed, on every process (multi-process runs)."""
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.random.default_rng().integers(2**31, dtype=np.int32)))
