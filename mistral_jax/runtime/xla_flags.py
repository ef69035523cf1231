"""XLA flags the engine sets before JAX starts its backend (the user's own XLA_FLAGS win). Each
one's measurements are in docs/performance.md ("XLA on GPUs: flags").

--xla_gpu_enable_triton_gemm=false: XLA's Triton GEMM path runs the decode-shaped products
(a few rows against a large weight) well below the weight-read rate that cuBLAS reaches, and
prefill slower too. The flag only concerns GPUs; CPU and TPU ignore it.

--xla_disable_hlo_passes=dot-merger: XLA's DotMerger joins dots that share an operand (a layer's
k and v projections of the same x) by concatenating their weights at run time, in every step: a
copy of weights per layer per step, which costs more than the merged product saves. FP8
projections are Pallas kernels, not dots.

--xla_gpu_enable_cub_radix_sort=false: XLA:GPU sorts large arrays (the sampler's top-k / top-p
sort over the vocabulary) with CUB's radix sort, a custom call that a CUDA graph cannot hold; the
conditional around it (the sampler's "all rows greedy?" branch) then runs as a host thunk that
waits for the device in every step, so the host can no longer prepare the next step while the
device runs this one. XLA's own sort kernels run instead (only in steps that sort at all).

XLA_PYTHON_CLIENT_MEM_FRACTION=0.90: JAX's GPU allocator takes 75% of device memory by default,
and `gpu_memory_utilization` is a fraction of what the allocator may hold, so the default left
the KV cache about half the room it could have. Much higher leaves the CUDA driver too little
to instantiate CUDA graphs. The user's own setting wins.
"""

import os

DEFAULT_FLAGS = {"--xla_gpu_enable_triton_gemm": "false", "--xla_disable_hlo_passes": "dot-merger",
                 "--xla_gpu_enable_cub_radix_sort": "false"}


DEFAULT_ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90"}


def apply_default_xla_flags() -> None:
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f"{k}={v}" for k, v in DEFAULT_FLAGS.items() if k not in current]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
