"""XLA flags the engine sets before JAX starts its backend (the user's own XLA_FLAGS win).

--xla_gpu_enable_triton_gemm=false: on an H100 (JAX 0.11.2) XLA's Triton GEMM path ran the
decode-shaped products of Mistral-Small-2501 at 0.98 TB/s of weights; cuBLAS ran them at
2.19 TB/s (batch-1 decode 47.9 -> 21.5 ms per step) and prefill 1.6x faster
(benchmarks/NOTES.md). The flag only concerns GPUs; CPU and TPU ignore it.
"""

import os

DEFAULT_FLAGS = {"--xla_gpu_enable_triton_gemm": "false"}


def apply_default_xla_flags() -> None:
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f"{k}={v}" for k, v in DEFAULT_FLAGS.items() if k not in current]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
