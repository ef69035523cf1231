"""Probe: accumulation error of the Triton kernel and of XLA's fp8 dot against the f32 reference
(max |y - ref| / max |ref|) as k grows to Mistral-Small-2501's w2 (k = 32768), on the GPU.

    PYTHONPATH=.:benchmarks python benchmarks/probes/probe_fp8_accumulation.py
"""
import sys

sys.path.insert(0, "tests")
import jax.numpy as jnp
import numpy as np
from test_fp8_matmul import make_inputs

from pallas_kernels.fp8_matmul import fp8_matmul_reference, fp8_matmul_xla
from pallas_kernels.fp8_matmul.triton import fp8_matmul_triton

F32 = jnp.float32
for m, k, n in [(1, 5120, 5120), (64, 16384, 5120), (1, 32768, 5120), (64, 32768, 5120), (4096, 32768, 5120)]:
    x, w, s = make_inputs(np.random.default_rng(k + m), m, k, n)
    ref = np.asarray(fp8_matmul_reference(x, w, s, out_dtype=F32), np.float64)
    e = {f.__name__: float(np.abs(np.asarray(f(x, w, s, out_dtype=F32), np.float64) - ref).max() / np.abs(ref).max())
         for f in (fp8_matmul_triton, fp8_matmul_xla)}
    print(m, k, n, e, flush=True)
