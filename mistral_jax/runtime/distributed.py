"""Multi-process (multi-host) runs: `jax.distributed` set up once, and who speaks.

Every process runs the same program on its own devices; the mesh spans all of them. Process 0
hosts the coordinator; the others connect to it. Settings come from arguments (EngineArgs'
coordinator_address, num_processes, process_id: the CLI's `--coordinator-address --num-processes
--process-id`), else the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`), else, with `auto=True` (EngineArgs' distributed, `--distributed`), from the
cluster itself: JAX detects Cloud TPU VMs / pods, Slurm, Open MPI.

A worker that cannot reach the coordinator would otherwise abort deep inside XLA (or wait for
minutes), so workers first wait for the coordinator's port themselves, up to `timeout_s`, and
fail with an error that names the address and the fix.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import jax

DEFAULT_TIMEOUT_S = 300  # EngineArgs.distributed_timeout's default too (tests/test_engine_args.py)
ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


class DistributedInitError(RuntimeError):
    """The processes of a multi-process run could not be joined."""


def _wait_for_port(address: str, timeout_s: float) -> None:
    """Block until something listens at host:port, or raise naming the address and the fix."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedInitError(
                    f"no coordinator at {address} after {timeout_s:g}s ({e}). Start process 0 (it hosts the "
                    f"coordinator) with the same --coordinator-address, check that {address} is process 0's "
                    "host and a port open between the hosts, and that every process has the same "
                    "--num-processes; raise the wait with --distributed-timeout") from None
            time.sleep(0.2)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join this process to a multi-process run, before any other JAX call; returns whether
    one was joined. Nothing given and nothing in the environment (and auto=False): a
    single-process run, nothing to do. Calling it again is a no-op."""
    if jax.distributed.is_initialized():
        return True
    given = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    for key, var in ENV.items():
        if given[key] is None and os.environ.get(var):
            given[key] = os.environ[var] if key == "coordinator_address" else int(os.environ[var])
    if given["coordinator_address"] is None and not auto:
        return False
    if None in given.values() and not auto:
        missing = [f"--{k.replace('_', '-')} ({ENV[k]})" for k, v in given.items() if v is None]
        raise DistributedInitError(f"a multi-process run needs {', '.join(missing)} as well, or --distributed "
                                   "to let JAX detect the cluster (TPU pods, Slurm, Open MPI)")
    if given["coordinator_address"] is not None and given["process_id"] not in (None, 0):
        _wait_for_port(given["coordinator_address"], timeout_s)
    where = given["coordinator_address"] or "detected by JAX"
    print(f"[process {given['process_id'] if given['process_id'] is not None else '?'}: joining "
          f"{given['num_processes'] or '?'} processes at coordinator {where}, up to {timeout_s:g}s]", file=sys.stderr)
    # From here a missing peer ends the process inside XLA after the timeout (it cannot be caught).
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None},
                               initialization_timeout=int(max(1, timeout_s)))
    return True


def is_main_process() -> bool:
    """Only process 0 prints, streams and writes files; every process computes."""
    return jax.process_index() == 0
