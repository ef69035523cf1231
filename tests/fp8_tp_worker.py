"""One process of a two-process tp=2 FP8 run (test_fp8_tp_gpu.py starts two, one per GPU):
joins through jax.distributed, builds the same random FP8 model on the mesh over both processes'
GPUs and writes the greedy tokens of the batch-1 and batch-64 runs (process 0) as JSON.

    python tests/fp8_tp_worker.py IMPL OUT.json   (JAX_COORDINATOR_ADDRESS etc. in the environment)
"""

import json
import sys

from mistral_jax.runtime import distributed

distributed.initialize()  # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID

import jax  # noqa: E402

from mistral_jax.loading.weights import random_weights  # noqa: E402
from mistral_jax.runtime.sharding import parse_mesh  # noqa: E402

from helpers.fp8_tp import CFG, DTYPE, SEED, greedy, prompts  # noqa: E402

impl, out = sys.argv[1], sys.argv[2]
mesh = parse_mesh("tp=2")
model = random_weights(CFG, DTYPE, mesh, seed=SEED, quantization="fp8", fp8_impl=impl)
result = {"b1": greedy(model, mesh, prompts(1, 512, 1))[0], "b64": greedy(model, mesh, prompts(64, 128, 2))[0],
          "processes": jax.process_count()}
if jax.process_index() == 0:
    with open(out, "w") as f:
        json.dump(result, f)
