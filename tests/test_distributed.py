"""Multi-process runs on one machine: two processes joined by jax.distributed (CPU collectives:
gloo), 4 CPU devices each, one mesh over all 8, give the tokens of one process.

Each worker is this file run as a script (`python test_distributed.py worker ...`); every
subprocess has a timeout and is killed if the test fails.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
WORKER_TIMEOUT_S = 300
LOCAL_DEVICES = 4

# (prompt ids, sampling settings): greedy, greedy with a penalty, seeded sampling.
REQUESTS = [
    ([1, 415, 5565, 302, 4843, 349], dict(temperature=0.0, max_tokens=8)),
    ([1, 22557, 28725], dict(temperature=0.0, max_tokens=6, repetition_penalty=1.3)),
    ([1, 6526, 7103, 28747, 13, 1014], dict(temperature=0.8, top_p=0.9, max_tokens=7, seed=3)),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spanning_mesh(devices):
    """dp x tp = 4 x 2 over 8 devices, each tp pair across the two processes (devices i and i + 4),
    so the model's tp collectives cross processes. Built here: the mesh options are sharding.py's."""
    from jax.sharding import Mesh

    from mistral_jax.runtime.sharding import MESH_AXES

    return Mesh(np.array(devices).reshape(2, 4).T, MESH_AXES)


def generate_tokens(model_dir, mesh) -> list[list[int]]:
    from mistral_jax import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", mesh=mesh, num_pages=64, max_num_seqs=4, progress=False)
    prompts = [{"prompt_token_ids": ids} for ids, _ in REQUESTS]
    outs = llm.generate(prompts, [SamplingParams(**sp) for _, sp in REQUESTS])
    return [o.outputs[0].token_ids for o in outs]


def worker(model_dir: str, address: str, num_processes: int, process_id: int, out: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)  # before the backend starts
    from mistral_jax.runtime import distributed

    distributed.initialize(address, num_processes, process_id, timeout_s=60)
    assert jax.process_count() == num_processes and len(jax.local_devices()) == LOCAL_DEVICES
    tokens = generate_tokens(model_dir, spanning_mesh(jax.devices()))
    Path(out).write_text(json.dumps({"tokens": tokens, "main": distributed.is_main_process()}))


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def run_workers(model_dir, tmp_path, n: int = 2) -> list[dict]:
    address = f"127.0.0.1:{free_port()}"
    procs, outs = [], []
    try:
        for i in range(n):
            outs.append(tmp_path / f"out{i}.json")
            log = open(tmp_path / f"log{i}.txt", "w")
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "worker", str(model_dir), address, str(n), str(i), str(outs[-1])],
                cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:  # a failed or timed-out test leaves no process behind
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join(f"--- process {i} ---\n" + (tmp_path / f"log{i}.txt").read_text()[-3000:] for i in range(n))
    assert all(p.returncode == 0 for p in procs), logs
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.slow
def test_two_processes_generate_like_one(tiny_checkpoints, tmp_path):
    import jax

    mistral_dir, _, _ = tiny_checkpoints
    results = run_workers(mistral_dir, tmp_path)
    expected = generate_tokens(mistral_dir, spanning_mesh(jax.devices()))  # one process, the same 8-device mesh
    assert [r["main"] for r in results] == [True, False]
    for r in results:
        assert r["tokens"] == expected


@pytest.mark.slow
def test_init_timeout_is_a_clear_error(tmp_path):
    """A worker whose coordinator never comes fails fast, naming the address and the fix."""
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    code = ("from mistral_jax.runtime import distributed\n"
            f"distributed.initialize({address!r}, num_processes=2, process_id=1, timeout_s=2)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode != 0
    assert "DistributedInitError" in proc.stderr and f"no coordinator at {address} after 2s" in proc.stderr
    assert "Start process 0" in proc.stderr


def test_single_process_is_untouched():
    from mistral_jax.runtime import distributed

    assert distributed.initialize() is False  # nothing given, nothing in the environment
    assert distributed.is_main_process()


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        model_dir, address, n, i, out = sys.argv[2:]
        worker(model_dir, address, int(n), int(i), out)
